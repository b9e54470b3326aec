// mcp-tunnel live activity page. Every name shown here came from the network (tenants,
// subjects, sources, tools): text goes into the page only through textContent and
// new Option(), never through innerHTML.
"use strict";

(function () {
  /** Calls kept on the page (the relay keeps 500; a screenful or two is what a person reads). */
  const MAX_CALLS = 200;
  /** Rendering delay after an event: events in between are drawn together. */
  const RENDER_EVERY_MS = 100;

  const $ = (id) => document.getElementById(id);
  const state = {
    tenant: new URLSearchParams(location.search).get("tenant") || "",
    calls: [],
    fresh: 0,
    snapshot: null,
    source: null,
    pending: false,
  };

  // ---- small DOM helpers (text only) ----
  function el(tag, className, text, title) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (title) node.title = String(title);
    return node;
  }
  function cell(text, className, title) {
    const td = el("td", className, text, title || (text !== undefined ? text : ""));
    return td;
  }
  function badgeCell(text, kind, title) {
    const td = el("td", "", null, title);
    td.appendChild(el("span", "badge " + kind, text));
    return td;
  }
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }
  function show(id, visible) {
    $(id).hidden = !visible;
  }

  // ---- formatting ----
  const pad = (n, w) => String(n).padStart(w || 2, "0");
  function clock(ms) {
    const d = new Date(ms);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) +
      "." + pad(d.getMilliseconds(), 3);
  }
  function millis(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 10) return ms.toFixed(2);
    if (ms < 100) return ms.toFixed(1);
    return Math.round(ms).toLocaleString("en-US");
  }
  function latency(us) {
    return millis(us / 1000) + " ms";
  }
  function since(unixSeconds) {
    let s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
    if (s < 60) return s + " s ago";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min ago";
    const h = Math.floor(m / 60);
    if (h < 48) return h + " h " + (m % 60) + " min ago";
    return Math.floor(h / 24) + " days ago";
  }
  function count(n) {
    return Number(n).toLocaleString("en-US");
  }
  function outcomeText(call) {
    switch (call.outcome) {
      case "ok": return "ok";
      case "error": return call.code === null || call.code === undefined ? "error" : "error " + call.code;
      case "tool_error": return "tool error";
      case "tunnel_error": return "tunnel error";
      default: return call.outcome;
    }
  }

  // ---- rendering ----
  function renderTenants(tenants) {
    const select = $("tenant");
    const wanted = ["", ...tenants];
    if (state.tenant && !wanted.includes(state.tenant)) wanted.push(state.tenant);
    const have = Array.from(select.options, (o) => o.value);
    if (have.join("\u0000") !== wanted.join("\u0000")) {
      select.replaceChildren(...wanted.map((t) =>
        new Option(t === "" ? "all tenants" : t, t, t === state.tenant, t === state.tenant)));
    }
    select.value = state.tenant;
  }

  function renderTunnels(snap) {
    const rows = snap.tunnels.map((t) => {
      const tr = el("tr");
      tr.append(
        cell(t.tenant),
        cell(t.source),
        t.draining ? badgeCell("draining", "draining")
          : t.silent ? badgeCell("silent", "draining", "not heard from for " + millis(t.silent_ms) + " ms: new sessions go to another tunnel")
          : badgeCell("online", "online", "from " + t.remote),
        badgeCell(t.transport, t.transport === "quic" ? "quic" : "https"),
        cell(millis(t.rtt_ms) + " ms", "num"),
        cell(count(t.streams_active), "num", count(t.streams_opened) + " opened so far"),
        cell(since(t.connected_since_unix), "", t.connected_since),
      );
      return tr;
    });
    for (const o of snap.offline) {
      const tr = el("tr", "offline");
      tr.append(cell(o.tenant), cell(o.source), badgeCell("offline", "offline",
        "seen in calls, no tunnel serves it now"), cell("–"), cell("–", "num"), cell("–", "num"), cell("–"));
      rows.push(tr);
    }
    fill($("tunnels").tBodies[0], rows);
    show("tunnels-empty", rows.length === 0);
  }

  function renderTools(snap) {
    const rows = snap.tools.map((t) => {
      const tr = el("tr");
      const denied = cell(null, "num");
      denied.appendChild(el("span", t.denied > 0 ? "nonzero-deny" : "", count(t.denied)));
      const errors = cell(null, "num");
      errors.appendChild(el("span", t.errors > 0 ? "nonzero-error" : "", count(t.errors)));
      tr.append(
        cell(t.overflow ? "(other)" : t.tenant),
        cell(t.overflow ? "" : t.source),
        cell(t.overflow ? "keys past the table's bound" : t.tool, "mono name"),
        cell(count(t.calls), "num"),
        denied,
        errors,
        cell(millis(t.p50_ms), "num", t.window + " latencies"),
        cell(millis(t.p90_ms), "num", t.window + " latencies"),
        cell(millis(t.p99_ms), "num", t.window + " latencies"),
      );
      return tr;
    });
    fill($("tools").tBodies[0], rows);
    show("tools-empty", rows.length === 0);
  }

  function renderFigures(snap) {
    const online = snap.tunnels.filter((t) => !t.draining && !t.silent).length;
    $("fig-tunnels").textContent = count(online);
    $("fig-sessions").textContent = count(snap.sessions);
    $("fig-calls").textContent = count(snap.totals.calls);
    $("fig-denied").textContent = count(snap.totals.denied);
    $("fig-errors").textContent = count(snap.totals.errors);
  }

  function renderCalls() {
    const rows = state.calls.map((c, i) => {
      const failed = c.decision === "allow" && c.outcome !== "ok";
      const classes = [c.decision === "deny" ? "deny" : failed ? "error" : "", i < state.fresh ? "fresh" : ""];
      const tr = el("tr", classes.filter(Boolean).join(" "));
      const what = c.target ? c.target : c.method;
      tr.append(
        cell(clock(c.time_ms), "mono", new Date(c.time_ms).toISOString()),
        cell(c.tenant, "name"),
        cell(c.subject, "name"),
        cell(c.source, "name"),
        cell(what, "mono name", c.target ? c.method + " " + c.target : c.method),
        badgeCell(c.decision, c.decision === "deny" ? "deny" : "allow", c.rule),
        badgeCell(outcomeText(c), c.outcome === "ok" ? "ok" : "error",
          c.transport ? "via " + c.transport : "never reached a tunnel"),
        cell(latency(c.latency_us), "num"),
      );
      return tr;
    });
    state.fresh = 0;
    fill($("calls").tBodies[0], rows);
    show("calls-empty", rows.length === 0);
    $("calls-hint").textContent = rows.length ? "newest first, " + rows.length + " shown" : "";
  }

  function render() {
    state.pending = false;
    const snap = state.snapshot;
    if (snap) {
      renderTenants(Array.from(snap.tenants));
      renderFigures(snap);
      renderTunnels(snap);
      renderTools(snap);
    }
    renderCalls();
  }
  function schedule() {
    if (state.pending) return;
    state.pending = true;
    // At most one render per RENDER_EVERY_MS however many events arrive.
    setTimeout(render, RENDER_EVERY_MS);
  }

  function applySnapshot(snap) {
    state.snapshot = snap;
    state.calls = (snap.calls || []).slice(0, MAX_CALLS);
    state.fresh = 0;
  }

  // ---- the event stream ----
  function setStatus(kind, text) {
    const s = $("status");
    s.className = "status " + kind;
    s.textContent = text;
  }

  function connect() {
    if (state.source) state.source.close();
    const url = "activity/events" + (state.tenant ? "?tenant=" + encodeURIComponent(state.tenant) : "");
    const source = new EventSource(url);
    state.source = source;
    source.addEventListener("open", () => setStatus("live", "live"));
    source.addEventListener("error", () => {
      // EventSource reconnects by itself; a fresh snapshot follows when it does.
      setStatus(source.readyState === EventSource.CLOSED ? "down" : "connecting",
        source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
    });
    source.addEventListener("snapshot", (e) => {
      applySnapshot(JSON.parse(e.data));
      setStatus("live", "live");
      schedule();
    });
    source.addEventListener("refresh", (e) => {
      state.snapshot = JSON.parse(e.data);
      schedule();
    });
    source.addEventListener("calls", (e) => {
      const batch = JSON.parse(e.data); // oldest first
      batch.reverse();
      state.calls = batch.concat(state.calls).slice(0, MAX_CALLS);
      state.fresh = Math.min(MAX_CALLS, state.fresh + batch.length);
      schedule();
    });
  }

  function start() {
    $("tenant").addEventListener("change", (e) => {
      state.tenant = e.target.value;
      const url = new URL(location.href);
      if (state.tenant) url.searchParams.set("tenant", state.tenant);
      else url.searchParams.delete("tenant");
      history.replaceState(null, "", url);
      state.calls = [];
      state.snapshot = null;
      connect();
    });
    // The page arrives with a snapshot: show it at once, then go live.
    const initial = $("initial");
    let snap = null;
    try {
      snap = JSON.parse(initial ? initial.textContent : "null");
    } catch (e) {
      snap = null;
    }
    if (snap && snap.tenants) applySnapshot(snap);
    render();
    connect();
  }

  start();
})();
