// fleetwave dashboard: follows /api/stream (server-sent events) and redraws from each snapshot.
//
// Everything shown comes from the coordinator's API as `fleetwave status -o json` prints it;
// nothing here computes a figure. Text written by nodes (ids, labels, reasons, messages) is put
// into the page with textContent only, never as markup. The operator token lives in this tab's
// sessionStorage and is sent as `Authorization: Bearer` on actions, never in a cookie.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "fleetwave.token";
const GATE_KINDS = new Set(["gate.passed", "gate.failed", "gate.inconclusive"]);

const view = { rollout: "", service: "", source: null, last: null, series: new Map() };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

const pct = (x) => (x === null || x === undefined ? "-" : (100 * x).toFixed(2) + "%");
const ms = (x) => (x === null || x === undefined ? "-" : Number(x).toFixed(1) + " ms");
const num = (x) => (x === null || x === undefined ? "-" : String(x));
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "-");
const stateCell = (s) => el("td", { class: "s-" + s, "data-state": s }, String(s).replaceAll("_", " "));

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 60 ? `${s.toFixed(0)}s ago` : s < 3600 ? `${(s / 60).toFixed(0)}m ago` : when(t);
}

// The notice shown is a snapshot's error (gone with the first snapshot without one), or the
// answer to something the operator did (an action, a token): that one stays until replaced.
let noticeOfSnapshot = false;

function notice(text, ok, ofSnapshot = false) {
  const n = $("#notice");
  n.textContent = text;
  n.className = ok ? "ok" : "";
  n.hidden = !text;
  noticeOfSnapshot = !!text && ofSnapshot;
}

// -- the live connection --------------------------------------------------------------------------
//
// EventSource reconnects by itself after a network error, but an HTTP error status ends it for
// good (readyState CLOSED): the coordinator's own 503 at its MAX_STREAMS, a proxy's 502 while
// the coordinator restarts. Then the page opens a new one after RETRY_FIRST_MS, doubling up to
// RETRY_MOST_MS while they fail, back to the first once a snapshot comes.

const RETRY_FIRST_MS = 1000;
const RETRY_MOST_MS = 30000;
const retry = { wait: RETRY_FIRST_MS, at: 0, timer: 0 };

function connect() {
  clearTimeout(retry.timer);
  retry.timer = 0;
  if (view.source) view.source.close();
  const q = new URLSearchParams();
  if (view.rollout) q.set("rollout", view.rollout);
  if (view.service) q.set("service", view.service);
  const source = new EventSource("/api/stream?" + q.toString());
  view.source = source;
  source.addEventListener("snapshot", (e) => {
    retry.wait = RETRY_FIRST_MS;
    live(true);
    draw(JSON.parse(e.data));
  });
  source.onopen = () => live(true);
  source.onerror = () => {
    if (source !== view.source) return; // one replaced meanwhile
    if (source.readyState !== EventSource.CLOSED) return live(false); // it retries by itself
    retry.at = Date.now() + retry.wait;
    retry.wait = Math.min(2 * retry.wait, RETRY_MOST_MS);
    countdown();
  };
}

function countdown() {
  const left = retry.at - Date.now();
  if (left <= 0) {
    live(false);
    connect();
    return;
  }
  const b = $("#live");
  b.textContent = `disconnected, retrying in ${Math.ceil(left / 1000)}s`;
  b.className = "badge off";
  retry.timer = setTimeout(countdown, left % 1000 || 1000); // at the next whole second
}

function live(on) {
  const b = $("#live");
  b.textContent = on ? "live" : "reconnecting";
  b.className = "badge " + (on ? "on" : "off");
}

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  view.rollout = h.get("rollout") || "";
  view.service = h.get("service") || "";
}

function choose(rollout) {
  const h = new URLSearchParams();
  if (rollout) h.set("rollout", rollout);
  if (view.service) h.set("service", view.service);
  const hash = h.toString();
  if (location.hash.slice(1) === hash) connect();
  else location.hash = hash; // hashchange reconnects: no reload
}

// -- drawing ------------------------------------------------------------------------------------

function draw(snap) {
  view.last = snap;
  $("#fleet").textContent = `fleet ${snap.fleet} · coordinator ${snap.coordinator} (${snap.role})` +
    (snap.writable ? "" : " · read-only: no --http-tokens");
  if (snap.error) notice(snap.error, false, true);
  else if (noticeOfSnapshot) notice("");
  const now = shownRollout();
  if (armed && (!now || now.id !== armed.id)) { // a second click would act on another rollout
    notice(`${armed.button.dataset.verb} of ${armed.id} was not sent: the page now shows ` +
      `${now ? now.id : "no rollout"}`);
    disarm();
  }
  drawNodes(snap.nodes);
  $("#nodes-more").textContent = snap.node_count > snap.nodes.length ?
    `${snap.nodes_online} of ${snap.node_count} nodes online` +
    (snap.nodes_unheard ? ` (${snap.nodes_unheard} not heard yet)` : "") +
    `; showing ${snap.nodes.length}, ` +
    "offline and cordoned ones first (fleetwave nodes lists every one)" : "";
  drawServices(snap.services);
  drawRollouts(snap.rollouts, snap.rollout);
  drawRollout(snap.rollout, snap.events);
}

function drawNodes(nodes) {
  const body = $("#nodes tbody");
  body.replaceChildren(...nodes.map((n) => {
    const services = Object.entries(n.services || {}).map(([name, s]) =>
      `${name}@${(s && s.version) || "?"}${s && s.healthy ? "" : " (unhealthy)"}`).join(" ");
    const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(",");
    return el("tr", { "data-node": n.id }, el("td", {}, n.id),
      stateCell(n.online ? "online" : n.unheard ? "not_heard_yet" : "offline"), el("td", {}, labels || "-"),
      el("td", {}, services || "-"),
      el("td", {}, n.cpu_percent === null ? "-" : n.cpu_percent.toFixed(0) + "%"),
      el("td", {}, n.mem_percent === null ? "-" : n.mem_percent.toFixed(0) + "%"),
      el("td", {}, ago(n.last_seen)));
  }));
}

function drawServices(services) {
  const sel = $("#service-filter");
  const have = [...sel.options].map((o) => o.value).slice(1).join(",");
  if (have === services.join(",")) return;
  sel.replaceChildren(el("option", { value: "" }, "all services"),
    ...services.map((s) => el("option", { value: s }, s)));
  sel.value = view.service;
}

function drawRollouts(rows, current) {
  const body = $("#rollouts tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr", { class: "pick" + (current && current.id === r.id ? " chosen" : ""),
      "data-rollout": r.id }, el("td", {}, r.id), el("td", {}, r.service), el("td", {}, r.version),
      el("td", {}, r.from_version || "-"), el("td", {}, r.strategy), stateCell(r.state),
      el("td", {}, `${Math.min(r.current_wave + 1, r.waves)}/${r.waves}`), el("td", {}, r.nodes),
      el("td", {}, r.started_by || "-"), el("td", {}, when(r.created)));
    tr.addEventListener("click", () => choose(r.id));
    return tr;
  }));
}

function gateText(g) {
  const parts = [];
  if (g.min_healthy !== null && g.min_healthy !== undefined) parts.push(`min-healthy ${pct(g.min_healthy)}`);
  if (g.max_error_rate !== null && g.max_error_rate !== undefined) parts.push(`max-error-rate ${pct(g.max_error_rate)}`);
  if (g.max_p99_ratio !== null && g.max_p99_ratio !== undefined) parts.push(`max-p99-ratio x${g.max_p99_ratio}`);
  if (g.max_mismatch_rate !== null && g.max_mismatch_rate !== undefined) parts.push(`max-mismatch-rate ${pct(g.max_mismatch_rate)}`);
  if (g.min_requests !== null && g.min_requests !== undefined) parts.push(`min-requests ${g.min_requests}`);
  return parts.length ? `gates: ${parts.join(", ")} (${g.analysis})` : "no traffic gates";
}

function drawRollout(st, events) {
  $("#rollout-empty").hidden = !!st;
  $("#rollout-body").hidden = !st;
  $("#rollout-id").textContent = st ? st.id : "";
  const state = $("#rollout-state");
  state.textContent = st ? st.state.replace("_", " ") : "";
  state.className = "state" + (st ? " s-" + st.state : "");
  state.setAttribute("data-state", st ? st.state : "");
  if (!st) return;
  $("#rollout-head").textContent = `${st.service} ${st.from_version || "(nothing)"} → ` +
    `${st.version} · ${st.strategy} · wave ${Math.min(st.current_wave + 1, st.waves.length)} of ` +
    `${st.waves.length} · phase ${st.phase} · bake ${st.bake}s · on failure ${st.on_failure}`;
  $("#rollout-reason").textContent = st.reason || "";
  const who = [["started by", st.started_by], ["paused by", st.paused_by],
    ["aborted by", st.aborted_by], ["rollback by", st.rollback_by]].filter(([, w]) => w);
  $("#rollout-who").textContent = who.map(([k, w]) => `${k} ${w}`).join(" · ");
  $("#rollout-gates").textContent = gateText(st.gates || {});
  const over = ["succeeded", "rolled_back", "failed", "aborted"].includes(st.state);
  for (const b of document.querySelectorAll("#actions button")) {
    const verb = b.dataset.verb;
    b.disabled = verb === "rollback" ? false : over ||
      (verb === "resume" && st.state !== "paused") || (verb === "pause" && st.state === "paused");
  }
  $("#waves tbody").replaceChildren(...st.waves.flatMap((w) => {
    const g = w.gates || {};
    const row = el("tr", { "data-wave": w.index }, el("td", {}, w.index + 1), stateCell(w.state),
      el("td", { title: w.nodes.join(", ") }, (w.node_count ?? w.nodes.length) > 3 ?
        `${w.node_count ?? w.nodes.length} nodes` : w.nodes.join(", ")),
      el("td", {}, w.weight + "%"),
      el("td", {}, g.requests === undefined ? "-" : `${g.requests}/${num(g.old_requests)}`),
      el("td", {}, `${pct(g.error_rate)}/${pct(g.old_error_rate)}`),
      el("td", {}, `${ms(g.p99_new_ms)}/${ms(g.p99_old_ms)}`),
      el("td", {}, g.p99_ratio === null || g.p99_ratio === undefined ? "-" : "x" + g.p99_ratio),
      el("td", {}, g.healthy === undefined ? "-" : `${g.healthy}/${g.nodes}`));
    // The gate's verdict in words, under its figures: what failed or was unsure, and why.
    const why = [...(g.reasons || [])];
    if (g.outcome && !["pass", w.state].includes(g.outcome)) why.unshift(g.outcome);
    return why.length ? [row, el("tr", { class: "why" }, el("td", {}), el("td", {
      class: "wrap reason", colSpan: 8 }, why.join("; ")))] : [row];
  }));
  // In the server's order: with more nodes than it sends, those in motion first (failed,
  // rolling back, offline, ...: coordinator/api/rollouts.py _shown), never re-sorted by id.
  $("#rollout-nodes tbody").replaceChildren(...Object.entries(st.nodes).map(([id, n]) =>
    el("tr", { "data-node": id }, el("td", {}, id), el("td", {}, n.version || "-"),
      stateCell(n.state), el("td", {}, n.healthy ? "yes" : "no"),
      el("td", {}, n.online ? "yes" : "no"), el("td", {}, n.wave === undefined ? "-" : n.wave + 1),
      el("td", {}, n.slot || "-"),
      el("td", {}, n.generation), el("td", { class: "wrap" }, n.reason || ""))));
  const shown = Object.keys(st.nodes).length;
  $("#rollout-nodes-more").textContent = !st.summarised && st.node_count > shown ?
    `showing ${shown} of ${st.node_count} nodes, those in motion first; ` +
    Object.entries(st.node_states || {}).sort().map(([k, v]) => `${k} ${v}`).join(", ") +
    ` (fleetwave status ${st.id} lists every one)` : "";
  const list = $("#events");
  const atEnd = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...events.map((e) => el("li", { "data-kind": e.kind },
    `${when(e.time)} `, el("span", { class: "kind" }, e.kind), ` ${e.message}`,
    el("span", { class: "by" }, e.who ? ` (by ${e.who})` : ""))));
  if (atEnd) list.scrollTop = list.scrollHeight;
  collect(st, events);
  drawCharts(st);
}

// -- the charts: the figures of every gate evaluation the page has seen, per version ---------------

function collect(st, events) {
  let points = view.series.get(st.id);
  if (!points) view.series.set(st.id, (points = new Map()));
  const add = (t, wave, g) => {
    if (!t || g.requests === undefined) return;
    points.set(`${wave}@${t}`, { t, wave, errNew: g.error_rate, errOld: g.old_error_rate,
      p99New: g.p99_new_ms, p99Old: g.p99_old_ms });
  };
  for (const e of events) if (GATE_KINDS.has(e.kind)) add(e.time, e.data.wave, e.data);
  for (const w of st.waves) {
    const g = w.gates || {};
    add(g.evidence_at || (w.finished && g.outcome !== "promoted" ? w.finished : 0), w.index, g);
  }
}

function drawCharts(st) {
  const points = [...(view.series.get(st.id) || new Map()).values()].sort((a, b) => a.t - b.t);
  const labels = [st.version, st.from_version || "old"];
  chart($("#chart-errors"), points, "errNew", "errOld", labels, 0.01, (v) => (100 * v).toFixed(1) + "%");
  chart($("#chart-p99"), points, "p99New", "p99Old", labels, 1, (v) => v.toFixed(0));
}

function chart(box, points, kNew, kOld, labels, floor, fmt) {
  const W = 420, H = 170, L = 44, R = 8, T = 18, B = 22;
  const vals = points.flatMap((p) => [p[kNew], p[kOld]]).filter((v) => v !== null && v !== undefined);
  box.replaceChildren();
  box.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  if (!points.length) {
    box.append(svg("text", { x: L + 8, y: H / 2 }, "no gate figures yet (they come with the bake)"));
    return;
  }
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
  const top = Math.max(...vals, floor) * 1.15;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => H - B - (v / top) * (H - T - B);
  box.append(svg("text", { x: 2, y: T + 4 }, fmt(top)), svg("text", { x: 2, y: H - B }, fmt(0)),
    svg("text", { x: L, y: H - 6 }, new Date(t0 * 1000).toLocaleTimeString()),
    svg("text", { x: W - R - 60, y: H - 6 }, new Date(t1 * 1000).toLocaleTimeString()));
  let wave = null;
  for (const p of points) {
    if (p.wave !== wave) {
      wave = p.wave;
      box.append(svg("line", { class: "wave", x1: x(p.t), y1: T, x2: x(p.t), y2: H - B }),
        svg("text", { x: x(p.t) + 2, y: T + 10 }, `w${wave + 1}`));
    }
  }
  [[kNew, "new", labels[0]], [kOld, "old", labels[1]]].forEach(([k, cls, label], i) => {
    const pts = points.filter((p) => p[k] !== null && p[k] !== undefined);
    if (pts.length > 1) box.append(svg("polyline", { class: cls, points: pts.map((p) => `${x(p.t)},${y(p[k])}`).join(" ") }));
    for (const p of pts) box.append(svg("circle", { class: cls, cx: x(p.t), cy: y(p[k]), r: 2.5 }));
    box.append(svg("text", { x: L + 8 + i * 140, y: 12, class: cls }, `■ ${label}`));
  });
}

// -- actions ------------------------------------------------------------------------------------
//
// An action goes to the rollout shown when the operator pressed its button (to that rollout's
// service, for a rollback), and is sent only if that rollout is still the one shown at the click.
// The page follows the newest rollout: another one may replace the one the operator looked at
// between the press and the click, or between the two clicks of Abort (draw() then disarms it).

const CONFIRM = new Set(["abort", "rollback"]);
const CONFIRM_MS = 5000;
let pressed = null; // {button, id, service}: the rollout shown when a button was pressed
let armed = null; // {button, id, service}: a first click of Abort or Roll back, awaiting the second
let disarmTimer = 0;

function shownRollout() {
  const st = view.last && view.last.rollout;
  return st ? { id: st.id, service: st.service } : null;
}

function press(b) {
  const st = shownRollout();
  pressed = st && { button: b, ...st };
}

function clicked(b) {
  const verb = b.dataset.verb;
  const now = shownRollout();
  const second = armed !== null && armed.button === b;
  const target = second ? armed : pressed && pressed.button === b ? pressed : now;
  pressed = null;
  disarm();
  if (!target) return;
  if (!now || now.id !== target.id) {
    notice(`${verb} of ${target.id} was not sent: the page now shows ${now ? now.id : "no rollout"}`);
    return;
  }
  // Abort and roll back take a second click within CONFIRM_MS: no outage from a slip.
  if (CONFIRM.has(verb) && !second) return arm(b, target);
  act(verb, target);
}

async function act(verb, target) {
  const url = verb === "rollback" ? `/api/services/${encodeURIComponent(target.service)}/rollback`
    : `/api/rollouts/${encodeURIComponent(target.id)}/${verb}`;
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  notice(`${verb} of ${target.id}: sending...`, true);
  let resp;
  try {
    resp = await fetch(url, { method: "POST", headers, body: "{}" });
  } catch (err) {
    notice(`${verb} was not sent: ${err.message}; the coordinator may be restarting, try again`);
    return;
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (err) {
    // Not the coordinator's answer (a proxy's 502 or 504 page, a server's plain 503): the
    // request was sent and may or may not have reached it.
    notice(`${verb} of ${target.id}: no answer from the coordinator (HTTP ${resp.status}` +
      `${resp.statusText ? " " + resp.statusText : ""}); it may or may not be carried out: ` +
      "look at the rollout before you try again");
    return;
  }
  if (resp.ok) notice(`${verb} of ${target.id}: done by ${body.who}`, true);
  else notice(`${verb} refused (${resp.status}): ${body.error}`);
}

function arm(b, target) {
  armed = { button: b, id: target.id, service: target.service };
  b.dataset.label = b.textContent;
  b.textContent = `Really ${b.textContent.toLowerCase()}?`;
  disarmTimer = setTimeout(disarm, CONFIRM_MS);
}

function disarm() {
  if (!armed) return;
  armed.button.textContent = armed.button.dataset.label;
  clearTimeout(disarmTimer);
  armed = null;
}

async function checkToken() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const who = $("#who");
  if (!token) {
    who.textContent = "read-only";
    return;
  }
  try {
    const resp = await fetch("/api/whoami", { headers: { Authorization: "Bearer " + token } });
    const body = await resp.json();
    if (resp.ok) {
      who.textContent = `operator: ${body.name}`;
      notice("");
    } else {
      who.textContent = "read-only";
      notice(`token refused (${resp.status}): ${body.error}`);
    }
  } catch (err) {
    notice(`cannot check the token: ${err.message}`);
  }
}

function start() {
  readHash();
  $("#auth").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("#token").value.trim();
    $("#token").value = "";
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    checkToken();
  });
  $("#token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    checkToken();
    notice("");
  });
  for (const b of document.querySelectorAll("#actions button")) {
    b.addEventListener("pointerdown", () => press(b));
    b.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") press(b);
    });
    b.addEventListener("click", () => clicked(b));
  }
  $("#service-filter").addEventListener("change", (e) => {
    view.service = e.target.value;
    choose("");
  });
  window.addEventListener("hashchange", () => {
    readHash();
    connect();
  });
  checkToken();
  connect();
}

document.addEventListener("DOMContentLoaded", start);
