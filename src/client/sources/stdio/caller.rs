//! Stateless agents that can be asked for input, of a bridged stdio source: a process of
//! the caller's own (see [`StdioSource::caller_pooled`]), initialized with the capabilities its
//! requests declare. A request its server sends in mid-call belongs to the one call in flight
//! there: the call waits ([`Parked`]), the agent gets `input_required`, and its retry takes the
//! call up again (see [`crate::mcp::bridge`]).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::pool::{AgentCall, Pooled, Waiter, cancelled};
use super::remap::remap_request;
use super::{StdioError, StdioSource};
use crate::client::sources::{Out, send_message};
use crate::mcp::bridge::{self, ServerRequest, input_capability};
use crate::mcp::jsonrpc::{codes, error_body};
use crate::wire::{Frame, OpenHeader};

/// A call of a caller's process whose server asked the client something in mid-call: the
/// agent got `input_required` with the handle this is kept under, and its retry carries the
/// answers. Meanwhile the process keeps working on the call, waiting for our answer.
pub(super) struct Parked {
    /// Our id of the call's request.
    id: u64,
    /// The server's request: its key in the `input_required` answer, and its id.
    asked: (String, Box<RawValue>),
}

/// Calls one caller's process keeps waiting for input at once.
const MAX_PARKED_PER_PROCESS: usize = 8;

/// Caller processes one stdio source runs for stateless agents that may be asked for input
/// (beyond them, such agents share the source's pooled process, where no server request
/// reaches them).
const MAX_CALLER_PROCESSES: usize = 8;

/// The key of a caller's own process: who, and what its requests declare.
fn caller_key(subject: &str, capabilities: &str) -> String {
    format!("{subject}\n{capabilities}")
}

impl StdioSource {
    /// The caller's own bridged process for requests declaring `capabilities` (its
    /// `initialize` declares them), started if there is none alive; `None` at
    /// [`MAX_CALLER_PROCESSES`] when none is idle to make room.
    /// The process a stateless request (`payload`) goes to, and the capabilities it
    /// declares when it may be asked for input there. The requests of an agent that can be
    /// asked for input go to its caller's own process when the source is `bridged`: it
    /// declares what the agent declares (so it lists what it would list that client), and a
    /// server request there can be tied to the one call in flight. Anything else, or past the
    /// cap, goes to the `shared` process, where none can.
    pub(super) async fn process_for(
        &self,
        header: &OpenHeader,
        payload: &[u8],
        bridged: bool,
        shared: Arc<Pooled>,
        limit: usize,
    ) -> Result<(Arc<Pooled>, Option<String>), StdioError> {
        let asks = bridged
            && ["elicitation", "sampling", "roots"]
                .iter()
                .any(|capability| bridge::declares_capability(payload, capability));
        if !asks {
            return Ok((shared, None));
        }
        let capabilities = bridge::declared_capabilities(payload);
        let own = self
            .caller_pooled(&header.subject, &capabilities, limit, &header.context)
            .await?;
        Ok((own.unwrap_or(shared), Some(capabilities)))
    }

    async fn caller_pooled(
        &self,
        subject: &str,
        capabilities: &str,
        limit: usize,
        context: &str,
    ) -> Result<Option<Arc<Pooled>>, StdioError> {
        let key = caller_key(subject, capabilities);
        let mut callers = self.callers.lock().await;
        if let Some(own) = callers.get(&key)
            && !own.exit.dead.is_cancelled()
        {
            return Ok(Some(own.clone()));
        }
        // Dropping the last handle stops a process: the dead, and those idle past the source's
        // idle time, go (looked at whenever a caller needs one).
        callers.retain(|_, own| !own.exit.dead.is_cancelled() && !own.idle_for(self.idle));
        if callers.len() >= MAX_CALLER_PROCESSES {
            let idle = callers
                .iter()
                .find(|(_, own)| own.is_idle())
                .map(|(key, _)| key.clone());
            match idle {
                // Dropping the last handle stops the process.
                Some(idle) => drop(callers.remove(&idle)),
                None => return Ok(None),
            }
        }
        let own = Pooled::start(self, limit, context, Some(capabilities)).await?;
        tracing::info!(source = %self.name, "a stdio process of its own for a caller whose requests may be asked for input");
        callers.insert(key, own.clone());
        Ok(Some(own))
    }

    /// Goes on with a call of a caller's process that waits for the agent's input (see
    /// [`Parked`]): the retry's answer goes to the process as the response to its request, and
    /// the call's answer to the retry, under its id.
    pub(super) async fn resume_parked(
        &self,
        header: &OpenHeader,
        (out, exchange): (&Out, u64),
        mine: &mut Vec<(Arc<Pooled>, u64)>,
        (payload, info, original_id): (&Bytes, &crate::mcp::MessageInfo, Box<RawValue>),
        (handle, retry): (String, bridge::Retry),
    ) {
        let capabilities = bridge::declared_capabilities(payload);
        let own = self
            .callers
            .lock()
            .await
            .get(&caller_key(&header.subject, &capabilities))
            .cloned();
        let found = own.and_then(|own| {
            let parked = own.parked.as_ref()?.lock().remove(&handle)?;
            Some((own, parked))
        });
        let Some((own, parked)) = found else {
            let reason = format!(
                "requestState names no call waiting at source {} (it expired, was answered, or \
                 its process ended): send the request again without it",
                self.name
            );
            let body = error_body(Some(&original_id), codes::INVALID_PARAMS, &reason);
            let _ = out.send(Frame::message(exchange, body)).await;
            let _ = out.send(Frame::end(exchange)).await;
            return;
        };
        let original_token = remap_request(payload, parked.id)
            .ok()
            .and_then(|(_, token)| token);
        let call = AgentCall {
            original_id,
            original_token,
            exchange,
            out: out.clone(),
            completes: info.method.clone(),
            declared: Some(capabilities),
        };
        let resumed = match own.waiters.lock().as_mut() {
            Some(waiters) => {
                waiters.insert(parked.id, Waiter::Agent(call));
                true
            }
            None => false,
        };
        if !resumed {
            let error = self.exited(own.exit.status());
            let body = error_body(info.id.as_deref(), error.code(), &error.to_string());
            let _ = out.send(Frame::message(exchange, body)).await;
            let _ = out.send(Frame::end(exchange)).await;
            return;
        }
        mine.push((own.clone(), parked.id));
        let (key, asked) = parked.asked;
        let reply = match retry.responses.get(&key) {
            Some(result) => bridge::response(&asked, result),
            None => error_body(
                Some(&asked),
                codes::INVALID_PARAMS,
                "the client's retry carried no answer to this request",
            ),
        };
        own.send(reply).await;
    }
}

/// Parks the only call in flight on a caller's own process when the process asks its client
/// something that call's agent declared it can answer (see [`Parked`]): the agent gets
/// `input_required`. False when it cannot be tied to one call, or has no room: the request is
/// answered as the shared process's are.
pub(super) async fn park(
    pooled: &Arc<Pooled>,
    line: &Bytes,
    method: Option<&str>,
    max_frame: usize,
) -> bool {
    let (Some(parked), Some(capability)) = (&pooled.parked, method.and_then(input_capability))
    else {
        return false;
    };
    let Some(request) = ServerRequest::parse(line) else {
        return false;
    };
    let (id, call) = {
        let mut waiters = pooled.waiters.lock();
        let Some(waiters) = waiters.as_mut() else {
            return false;
        };
        let mut agents = waiters
            .iter()
            .filter(|(_, waiter)| matches!(waiter, Waiter::Agent(_)));
        let (Some((&id, Waiter::Agent(call))), None) = (agents.next(), agents.next()) else {
            return false;
        };
        let declares = call.declared.as_deref().is_some_and(|declared| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(declared)
                .is_ok_and(|declared| declared.contains_key(capability))
        });
        if !declares || parked.lock().len() >= MAX_PARKED_PER_PROCESS {
            return false;
        }
        match waiters.insert(id, Waiter::Parked) {
            Some(Waiter::Agent(call)) => (id, call),
            _ => return false,
        }
    };
    let handle = crate::client::sources::waiting_handle();
    let key = request.id.get().trim().trim_matches('"').to_owned();
    let asked = (key.clone(), request.id.clone());
    parked.lock().insert(handle.clone(), Parked { id, asked });
    let waiting = Arc::downgrade(pooled);
    let expiring = handle.clone();
    tokio::spawn(async move {
        tokio::time::sleep(bridge::INPUT_WAIT).await;
        let Some(pooled) = waiting.upgrade() else {
            return;
        };
        let expired = pooled
            .parked
            .as_ref()
            .and_then(|p| p.lock().remove(&expiring));
        if let Some(expired) = expired {
            tracing::info!(source = %pooled.source, "a call waited {} s for its agent's input: cancelled", bridge::INPUT_WAIT.as_secs());
            let (_, asked) = expired.asked;
            pooled
                .send(error_body(
                    Some(&asked),
                    codes::INTERNAL_ERROR,
                    "the client did not answer in time",
                ))
                .await;
            if pooled.forget(expired.id) {
                pooled.send(cancelled(expired.id)).await;
            }
        }
    });
    let answer = bridge::input_required(&call.original_id, &[(key, &request)], &handle);
    let _ = send_message(&call.out, call.exchange, answer, max_frame, &pooled.source).await;
    let _ = call.out.send(Frame::end(call.exchange)).await;
    true
}
