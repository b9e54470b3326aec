//! Finding the session an agent's `Mcp-Session-Id` names, on any relay of the fleet.
//!
//! The id is sealed ([`SessionClaims`]): a relay opens it, checks it is the caller's session
//! with this source, and uses the session it carries under that handle. When it carries none
//! (another relay opened the session, or this one restarted since), it resumes the session:
//! a new tunnel stream to the `connect` that holds the upstream session (or, for an HTTP
//! upstream, any `connect` of the source, which continues the upstream's own session from what
//! the id carries), and `connect` confirms before any message goes. The upstream sees no second
//! `initialize`. A session whose tunnel has gone silent moves the same way to a live tunnel
//! at its next request, so a `connect` killed without a word costs its sessions no more than
//! the calls in flight on it.

use std::sync::Arc;

use axum::http::HeaderMap;

use super::admission::{open_header, open_on};
use super::reply::AgentError;
use crate::govern::Identity;
use crate::relay::session::{Session, SessionClaims, Transport, new_stream_base};
use crate::relay::state::RelayState;
use crate::wire::{Era, SessionHandle};

/// Why no session could be found for an id.
#[derive(Debug)]
pub(super) enum Lost {
    /// No such session for this caller (never was, someone else's, or ended): the agent's
    /// answer is the `404` that makes it initialize again.
    NotFound,
    /// The session may live on, but no tunnel reaches its source now (every `connect` of it
    /// is reconnecting): the agent's requests get an error that says so, and the session id
    /// stays good.
    Unreachable(String),
    /// The relay is starting and no tunnel reaches the source here yet: the `connect` holding
    /// the session may not have attached again (see [`crate::relay::STARTUP_WINDOW`]).
    Starting,
    /// A session cap refused resuming it here.
    Cap(crate::relay::session::CapReached),
}

impl Lost {
    /// The answer to a GET or DELETE (no requests to answer one by one): `404`, or `503` while
    /// the source is unreachable or the relay is starting.
    pub(super) fn into_error(self) -> AgentError {
        match self {
            Lost::Unreachable(why) => AgentError::Unavailable(why),
            Lost::Starting => AgentError::Starting,
            Lost::NotFound | Lost::Cap(_) => AgentError::SessionNotFound,
        }
    }
}

/// The session `id` names, if it is `who`'s with `source`: carried here, or resumed.
pub(super) async fn find(
    state: &Arc<RelayState>,
    id: &str,
    who: &Identity,
    source: &str,
) -> Result<Arc<Session>, Lost> {
    let claims = SessionClaims::open(&state.fleet, id)
        .filter(|claims| claims.belongs_to(who, source))
        .ok_or(Lost::NotFound)?;
    if let Some(session) = state
        .sessions
        .get(&claims.handle, who, source, Transport::Streamable)
    {
        if !session.channel.tunnel_silent() || !claims.resumable.portable {
            return Ok(session);
        }
        // Its tunnel went silent (its `connect` may be dead): continue on a live one, which
        // any `connect` of the source can; failing that, stay (the tunnel may recover).
        return Ok(resume(state, who, source, claims, false)
            .await
            .unwrap_or(session));
    }
    resume(state, who, source, claims, false).await
}

/// Resumes the session of `claims` on a new tunnel stream: to the `connect` holding it, or,
/// unless `own_connect` (an answer only it keeps is picked up), to any that can take it over.
pub(super) async fn resume(
    state: &Arc<RelayState>,
    who: &Identity,
    source: &str,
    claims: SessionClaims,
    own_connect: bool,
) -> Result<Arc<Session>, Lost> {
    let portable = claims.resumable.portable;
    let unreachable = || {
        Lost::Unreachable(format!(
            "source {source} is not connected to the relay right now (its tunnel is \
             reconnecting); the session continues once it is back"
        ))
    };
    let Some(tunnel) = state.registry.route_resumed(
        &who.tenant,
        source,
        claims.connect.as_deref(),
        portable && !own_connect,
    ) else {
        // Held only by a `connect` that is gone: so is the session (or the answer only it
        // kept). Unless this relay has just started, or that `connect`'s tunnels left a
        // moment ago (a network blip) and no new instance replaced it: then it may be back
        // soon. Any `connect` can take a portable session over once one is back.
        let reconnecting = claims
            .connect
            .as_deref()
            .is_some_and(|connect| state.registry.reconnecting(&who.tenant, connect));
        return Err(if state.starting.is_starting() {
            Lost::Starting
        } else if (portable && !own_connect) || reconnecting {
            unreachable()
        } else {
            Lost::NotFound
        });
    };
    let base = new_stream_base();
    let mut header = open_header(
        who,
        source,
        Era::Session,
        claims.handle.clone(),
        claims.version.clone(),
        &HeaderMap::new(),
    );
    header.session = Some(SessionHandle {
        handle: claims.handle.clone(),
        resume: true,
        upstream: Some(claims.resumable.clone()),
        stream: Some(base),
    });
    let channel = open_on(state, who, &tunnel, &header)
        .await
        .map_err(|_| unreachable())?;
    if let Err(e) = channel
        .resumed(state.governance().limits.open_stream_timeout())
        .await
    {
        tracing::info!(tenant = %who.tenant, source, session = %claims.handle, reason = %e, "session not resumed");
        // `connect` refused (it holds no such session): gone. Otherwise it did not answer, or
        // its tunnel broke meanwhile.
        return Err(if channel.closed_by_peer() {
            Lost::NotFound
        } else {
            unreachable()
        });
    }
    let session = Arc::new(Session::new(
        claims.handle.clone(),
        who,
        source,
        (channel, base),
        Transport::Streamable,
        &state.calls,
        state.task_binding(who, source),
    ));
    session.know_version(claims.version);
    tracing::info!(tenant = %who.tenant, subject = %who.subject, source, session = %session.id, "session resumed");
    metrics::counter!(crate::metrics::SESSIONS_RESUMED).increment(1);
    state
        .sessions
        .adopt(session, state.session_caps())
        .map_err(Lost::Cap)
}
