//! The status consoles: one self-contained HTML page served at `GET /` on
//! the balancer's admin port ([`PAGE`]) and one on each broker node's
//! ([`NODE_PAGE`]). No build step and nothing fetched from elsewhere: each
//! page is a string in the binary, with a small inline script that polls
//! the admin API's JSON once a second and draws the charts as inline SVG,
//! each with one quantity, its unit on the axis and its time range.
//!
//! The balancer's page polls `/summary` (version, uptime, totals, rates and
//! caps), `/backends`, `/events` and `/history`. The drain and undrain
//! buttons POST from the page's own origin (a drain asks for confirmation
//! first); the admin API refuses POSTs from other origins (see
//! `http::cross_site`). In front of a bundled cluster (`cluster_admin` on
//! the backends) a Cluster panel shows the leader, view and term, and each
//! node's readiness, links and traffic, as the nodes answer on `/cluster`.
//!
//! A node's page polls its own `/status` (its `/cluster` answer, or a
//! one-node answer outside a cluster) and shows the same panel for that
//! one node, with its message rates over time.

/// The style and the script both pages share: escaping, timestamps, the
/// token prompt, number formats and the chart.
macro_rules! common {
    () => {
        r###"<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f6f7f9; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .5em; }
  .muted { color: #6b7280; }
  table { border-collapse: collapse; background: #fff; width: 100%; }
  th, td { text-align: left; padding: .45em .7em; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
  th { background: #eef0f4; font-weight: 600; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.totals td { font-weight: 600; background: #f3f4f6; }
  .state { font-weight: 600; }
  .up, .ready { color: #047857; } .down { color: #b91c1c; } .misconfigured { color: #b45309; }
  .draining { color: #6d28d9; } .unknown { color: #6b7280; }
  .warn { color: #b91c1c; font-weight: 600; }
  .tiles { display: flex; flex-wrap: wrap; gap: .6em; }
  .tile { background: #fff; border: 1px solid #e5e7eb; padding: .5em .8em; min-width: 9em; }
  .tile b { display: block; font-size: 1.25em; font-variant-numeric: tabular-nums; }
  button { font: inherit; padding: .2em .7em; margin-right: .3em; cursor: pointer; }
  .charts { display: flex; flex-wrap: wrap; gap: 1em; }
  .chart { background: #fff; border: 1px solid #e5e7eb; padding: .5em; }
  .chart svg { display: block; }
  .chart text { font: 10px system-ui, sans-serif; fill: #6b7280; }
  #events li { margin: .15em 0; }
  #lookup-result { font-family: ui-monospace, monospace; white-space: pre; }
</style>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
// Date and 24-hour time, local: "2026-12-06 14:03:07".
const stamp = (ms) => {
  const d = new Date(ms), p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
};
const ago = (ms) => {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? s + " s" : Math.round(s / 60) + " min";
};
const duration = (s) => s < 120 ? s + " s" : s < 7200 ? Math.floor(s / 60) + " min" :
  s < 172800 ? Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min" :
  Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h";
// 1234567 -> "1.23 M"; small numbers as they are.
const si = (v, digits = 3) => {
  if (v == null || !isFinite(v)) return "\u2013";
  const a = Math.abs(v);
  for (const [f, p] of [[1e9, " G"], [1e6, " M"], [1e3, " k"]])
    if (a >= f) return +(v / f).toPrecision(digits) + p;
  return String(+v.toPrecision(digits));
};
const bytes = (v) => v == null ? "\u2013" : Math.abs(v) < 1000 ? si(v) + " B" : si(v) + "B";
// The axis's top: the smallest 1, 2 or 5 times a power of ten at or above
// `v` (1 when there is nothing yet).
const nice = (v) => {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  return [1, 2, 5, 10].map((m) => m * p).find((n) => n >= v * (1 - 1e-9));
};
// Successive counter samples [[t_ms, value]] -> per-second rates.
const rates = (points) => points.slice(1).map(([t, v], i) => {
  const [t0, v0] = points[i];
  return [t, t > t0 ? Math.max(0, v - v0) / ((t - t0) / 1000) : 0];
});

// The admin token, asked for once (when the API first answers 401) and
// kept for this tab only.
let token = sessionStorage.getItem("mqlb-admin-token");
async function api(path, opts = {}) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = Object.assign({}, opts.headers,
      token ? {"Authorization": "Bearer " + token} : {});
    const r = await fetch(path, Object.assign({}, opts, {headers}));
    if (r.status !== 401 || attempt > 0) return r;
    const t = prompt("This admin API needs its token ([admin] token_file):");
    if (!t) return r;
    token = t.trim();
    sessionStorage.setItem("mqlb-admin-token", token);
  }
}

const COLOURS = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];

// One quantity per chart: `series` is [{name, points: [[t_ms, v]]}], drawn
// against a y axis from 0 in `unit` (formatted by `fmt`) and an x axis of
// the time the samples cover, ending now.
function chart(id, title, unit, series, fmt = si) {
  const W = 340, H = 120, L = 52, B = 18, T = 6, R = 8;
  const w = W - L - R, h = H - B - T;
  const all = series.flatMap((s) => s.points);
  const now = Date.now();
  const t0 = all.length ? Math.min(...all.map((p) => p[0])) : now - 60000;
  const t1 = Math.max(now, t0 + 1000);
  const max = nice(Math.max(0, ...all.map((p) => p[1])));
  const x = (t) => L + (t - t0) / (t1 - t0) * w, y = (v) => T + h - v / max * h;
  const span = Math.round((t1 - t0) / 1000);
  const lines = series.map((s, i) => s.points.length < 2 ? "" :
    `<polyline fill="none" stroke="${COLOURS[i % COLOURS.length]}" stroke-width="1.5" points="${
      s.points.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" ")}"/>`).join("");
  const legend = series.map((s, i) =>
    `<span style="color:${COLOURS[i % COLOURS.length]}">&#9632;</span> ${esc(s.name)}`).join(" ");
  return `<div class="chart" id="${esc(id)}" data-max="${max}" data-span-s="${span}">
    <b>${esc(title)}</b> <span class="muted">(${esc(unit)})</span>
    <svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)} in ${esc(unit)}">
      <rect x="${L}" y="${T}" width="${w}" height="${h}" fill="#fafafa" stroke="#e5e7eb"/>
      <line x1="${L}" x2="${L + w}" y1="${y(max / 2)}" y2="${y(max / 2)}" stroke="#eef0f4"/>
      <text x="${L - 4}" y="${T + 8}" text-anchor="end">${esc(fmt(max))}</text>
      <text x="${L - 4}" y="${y(max / 2) + 3}" text-anchor="end">${esc(fmt(max / 2))}</text>
      <text x="${L - 4}" y="${T + h}" text-anchor="end">0</text>
      <text x="${L}" y="${H - 4}">\u2212${esc(duration(span))}</text>
      <text x="${L + w / 2}" y="${H - 4}" text-anchor="middle">\u2212${esc(duration(Math.round(span / 2)))}</text>
      <text x="${L + w}" y="${H - 4}" text-anchor="end">now</text>
      ${lines}
    </svg>
    <div class="muted">${legend}</div></div>`;
}

// A node's links, one "peer: state" each, coloured.
const links = (ls) => (ls || []).map((l) =>
  `<span class="${l.state === "up" ? "up" : "down"}" data-peer="${esc(l.peer)}" data-link="${esc(l.state)}">${esc(l.peer)}: ${esc(l.state)}</span>`
).join("<br>") || "&ndash;";
const perSec = (v) => v == null ? "&ndash;" : si(v) + "/s";

// One row of a cluster table, from a node's own answer (with its rates),
// on the balancer's page and on the node's.
function nodeRow(name, c, leftOut) {
  const t = c.traffic || {};
  return `<tr data-node="${esc(name)}" data-ready="${c.ready}" data-view="${c.view}" data-term="${c.term}"
      data-sessions="${t.sessions}" data-clients="${t.clients}">
    <td>${esc(name)}</td>
    <td class="${c.ready ? "up" : "down"}">${c.ready ? "ready" : "not ready"}</td>
    <td class="num">${c.view}</td><td class="num">${c.term ?? "&ndash;"}</td><td>${esc(c.leader ?? "none")}</td>
    <td>${esc(c.members.join(", "))}${leftOut ? ` <span class="down">(left out of the view)</span>` : ""}</td>
    <td>${links(c.links)}</td>
    <td class="num">${t.clients ?? "&ndash;"}</td><td class="num">${t.sessions ?? "&ndash;"}</td>
    <td class="num">${t.subscriptions ?? "&ndash;"}</td><td class="num">${t.retained ?? "&ndash;"}</td>
    <td class="num">${perSec(t.messages_in_per_s)}</td><td class="num">${perSec(t.messages_out_per_s)}</td>
    <td class="num ${t.dropped ? "warn" : ""}">${t.dropped ?? "&ndash;"}${t.dropped_per_s ? ` (${perSec(t.dropped_per_s)})` : ""}</td></tr>`;
}
</script>
"###
    };
}

/// The balancer's console.
pub const PAGE: &str = concat!(
    r###"<!doctype html>
<html lang="en">
<head>
<title>mqlb console</title>
"###,
    common!(),
    r###"</head>
<body>
<h1>mqlb <span id="version" class="muted"></span></h1>
<div class="muted">balancer &middot; <span id="uptime"></span> &middot; <span id="updated">loading&hellip;</span></div>

<h2>Totals</h2>
<div class="tiles" id="totals"></div>

<section id="cluster-section" hidden>
<h2>Cluster</h2>
<div id="cluster-summary"></div>
<table>
  <thead><tr><th>node</th><th>ready</th><th class="num">view</th><th class="num">term</th><th>leader it knows</th>
  <th>members in its view</th><th>links to peers</th><th class="num">clients</th><th class="num">sessions</th>
  <th class="num">subscriptions</th><th class="num">retained</th><th class="num">messages in</th>
  <th class="num">messages out</th><th class="num">dropped</th></tr></thead>
  <tbody id="cluster"></tbody>
</table>
</section>

<h2>Backends</h2>
<table>
  <thead><tr><th>backend</th><th>state</th><th class="num">probe RTT</th><th class="num">connections</th>
  <th class="num">forwarded</th><th class="num">connect failures</th><th class="num">bytes to backend</th>
  <th class="num">bytes to clients</th><th>CONNACKs</th><th>since last transition</th><th></th></tr></thead>
  <tbody id="backends"></tbody>
</table>

<h2>Last minutes</h2>
<div class="charts" id="charts"></div>

<h2>Where is a client?</h2>
<form id="lookup"><input id="client" placeholder="client ID" size="30">
<button type="submit">look up</button></form>
<div id="lookup-result"></div>

<h2>Recent events</h2>
<ul id="events"></ul>

<script>
"use strict";
async function post(path) {
  const r = await api(path, {method: "POST"});
  if (!r.ok) alert(path + ": " + r.status + " " + (await r.text()));
  refresh();
}

function renderSummary(s, list) {
  $("version").textContent = s.version;
  $("uptime").textContent = "up " + duration(s.uptime_s) + " since " + stamp(s.started_ms);
  const c = s.connections, r = s.rates, l = s.limits;
  const refused = Object.entries(s.refused).filter(([, v]) => v > 0)
    .map(([k, v]) => esc(k) + " " + v).join(", ");
  const unavailable = list.reduce((n, b) =>
    n + (b.connacks.server_unavailable || 0) + (b.connacks.server_busy || 0), 0);
  const tile = (label, value, detail = "", cls = "", key = "") =>
    `<div class="tile" ${key ? `data-${key}="${esc(value)}"` : ""}><span class="muted">${label}</span>
     <b class="${cls}">${esc(value)}</b><span class="muted">${detail}</span></div>`;
  $("totals").innerHTML = [
    tile("connections now", c.active, "of at most " + si(c.max), "", "active"),
    tile("accepted", c.accepted, "in total", "", "accepted"),
    tile("connection rate", si(r.accept_rate) + "/s", "most " + si(r.max_accept_rate) + "/s" +
      (l.backend_connect_rate ? ", cap " + si(l.backend_connect_rate) + "/s per backend" : ", no cap")),
    tile("refused", c.refused, refused || "none", c.refused ? "warn" : "", "refused"),
    tile("server unavailable", unavailable, "CONNACKs from backends", unavailable ? "warn" : ""),
    tile("backend errors", s.backend_errors.connect_failures, "failed connects; " +
      s.backend_errors.evictions + " clients moved", s.backend_errors.connect_failures ? "warn" : ""),
    tile("bytes to backends", bytes(s.bytes.to_backends), "", "", "bytes-up"),
    tile("bytes to clients", bytes(s.bytes.to_clients), "", "", "bytes-down"),
  ].join("");
}

function renderBackends(list) {
  let total = {connections: 0, forwarded: 0, failures: 0, up: 0, down: 0};
  const rows = list.map((b) => {
    const acks = Object.entries(b.connacks || {}).map(([k, v]) =>
      `<span class="${/^server_(unavailable|busy)$/.test(k) ? "warn" : ""}">${esc(k)} ${v}</span>`).join(", ");
    const rtt = b.last_rtt_ms == null ? "&ndash;" : b.last_rtt_ms.toFixed(2) + " ms";
    const action = b.draining ? "undrain" : "drain";
    total.connections += b.connections; total.forwarded += b.forwarded;
    total.failures += b.connect_failures; total.up += b.bytes_to_backend; total.down += b.bytes_to_client;
    return `<tr data-backend="${esc(b.name)}">
      <td class="name">${esc(b.name)}<div class="muted">${esc(b.address)}</div></td>
      <td class="state ${esc(b.state)}">${esc(b.state)}${b.last_error ? `<div class="muted">${esc(b.last_error)}</div>` : ""}</td>
      <td class="rtt num">${rtt}</td>
      <td class="connections num">${b.connections}</td>
      <td class="num">${b.forwarded}</td>
      <td class="num ${b.connect_failures ? "warn" : ""}">${b.connect_failures}</td>
      <td class="num">${bytes(b.bytes_to_backend)}</td>
      <td class="num">${bytes(b.bytes_to_client)}</td>
      <td class="connacks">${acks || "&ndash;"}</td>
      <td class="since">${ago(b.last_transition_ms)}</td>
      <td><button data-action="${action}" data-name="${esc(b.name)}">${action}</button></td>
    </tr>`;
  });
  rows.push(`<tr class="totals" data-totals="1"><td>all ${list.length}</td><td></td><td></td>
    <td class="num" data-connections="${total.connections}">${total.connections}</td>
    <td class="num">${total.forwarded}</td><td class="num">${total.failures}</td>
    <td class="num">${bytes(total.up)}</td><td class="num">${bytes(total.down)}</td><td colspan="3"></td></tr>`);
  $("backends").innerHTML = rows.join("");
  for (const btn of document.querySelectorAll("#backends button")) {
    btn.onclick = () => {
      // Draining moves every client off the backend: ask first.
      if (btn.dataset.action === "drain" &&
          !confirm(`Drain ${btn.dataset.name}? Its clients are moved to other backends.`)) return;
      post(`/backends/${encodeURIComponent(btn.dataset.name)}/${btn.dataset.action}`);
    };
  }
}


// The bundled cluster, as its nodes answer on their /cluster (backends
// with cluster_admin): the leader most of them name, the newest view and
// term, how many are ready, and each node's own answer.
function renderCluster(list) {
  const nodes = list.filter((b) => b.in_cluster_view !== null && b.in_cluster_view !== undefined);
  $("cluster-section").hidden = nodes.length === 0;
  if (!nodes.length) return;
  const answers = nodes.map((b) => b.cluster).filter((c) => c);
  const votes = {};
  for (const c of answers) if (c.leader) votes[c.leader] = (votes[c.leader] || 0) + 1;
  const leader = Object.entries(votes).sort((a, b) => b[1] - a[1])[0]?.[0] ?? "none";
  const view = answers.length ? Math.max(...answers.map((c) => c.view)) : 0;
  const term = answers.length ? Math.max(...answers.map((c) => c.term || 0)) : 0;
  const ready = answers.filter((c) => c.ready).length;
  const sum = (k) => answers.reduce((n, c) => n + ((c.traffic || {})[k] || 0), 0);
  const s = $("cluster-summary");
  Object.assign(s.dataset, {leader, view, term, ready, nodes: nodes.length, sessions: sum("sessions")});
  s.innerHTML = `leader <b>${esc(leader)}</b> &middot; view <b>${view}</b> &middot; term <b>${term}</b> &middot;
    <b class="${ready === nodes.length ? "up" : "down"}">${ready} of ${nodes.length}</b> nodes ready &middot;
    ${sum("clients")} clients, ${sum("sessions")} sessions &middot;
    ${perSec(sum("messages_in_per_s"))} in, ${perSec(sum("messages_out_per_s"))} out`;
  $("cluster").innerHTML = nodes.map((b) => b.cluster ? nodeRow(b.name, b.cluster, !b.in_cluster_view) :
    `<tr data-node="${esc(b.name)}"><td>${esc(b.name)}</td>
      <td class="down" colspan="13">no answer from ${esc(b.name)}'s admin API</td></tr>`).join("");
}

function renderCharts(history, summary) {
  const backends = Object.entries(history);
  const series = (i) => backends.map(([name, samples]) =>
    ({name, points: samples.filter((s) => s[i] != null).map((s) => [s[0], s[i]])}));
  const sumRate = (i) => {
    // Each backend's counter as a rate, then summed at each instant.
    const byT = new Map();
    for (const [, samples] of backends)
      for (const [t, v] of rates(samples.map((s) => [s[0], s[i]])))
        byT.set(t, (byT.get(t) || 0) + v);
    return [...byT.entries()].sort((a, b) => a[0] - b[0]);
  };
  const totals = summary.rates.samples;
  $("charts").innerHTML = [
    chart("chart-connections", "Connections per backend", "connections", series(1)),
    chart("chart-rtt", "Probe round trip per backend", "ms", series(2), (v) => si(v, 2)),
    chart("chart-rate", "New connections", "connections/s", [
      {name: "accepted", points: rates(totals.map((s) => [s[0], s[1]]))},
      {name: "refused", points: rates(totals.map((s) => [s[0], s[2]]))}]),
    chart("chart-bytes", "Traffic", "bytes/s", [
      {name: "to backends", points: sumRate(4)}, {name: "to clients", points: sumRate(5)}],
      (v) => bytes(v)),
  ].join("");
}

function renderEvents(events) {
  $("events").innerHTML = events.length ? events.slice(0, 50).map((e) =>
    `<li><span class="muted">${stamp(e.at_ms)}</span>
     <b>${esc(e.kind)}</b> ${esc(e.backend)}: ${esc(e.detail)}</li>`).join("")
    : `<li class="muted">none yet</li>`;
}

async function refresh() {
  try {
    const [s, b, e, h] = await Promise.all(
      ["/summary", "/backends", "/events", "/history"].map((p) => api(p).then((r) => r.json())));
    renderSummary(s, b); renderCluster(b); renderBackends(b); renderEvents(e); renderCharts(h, s);
    $("updated").textContent = "updated " + stamp(Date.now());
    document.body.dataset.ready = "1";
  } catch (err) {
    $("updated").textContent = "admin API unreachable: " + err;
  }
}

$("lookup").onsubmit = async (ev) => {
  ev.preventDefault();
  const id = $("client").value;
  const r = await api("/clients/" + encodeURIComponent(id));
  $("lookup-result").textContent = JSON.stringify(await r.json(), null, 2);
};

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"###
);

/// A broker node's console: its own `/cluster` answer as the balancer's
/// cluster panel shows it, with its message rates over the last minutes
/// (kept by the page, which computes them from successive answers).
pub const NODE_PAGE: &str = concat!(
    r###"<!doctype html>
<html lang="en">
<head>
<title>mqlb node console</title>
"###,
    common!(),
    r###"</head>
<body>
<h1>mqlb node <span id="node"></span> <span id="version" class="muted"></span></h1>
<div class="muted">broker node &middot; <span id="updated">loading&hellip;</span>
&middot; <a href="/metrics">metrics</a></div>

<h2>This node</h2>
<div id="node-summary"></div>
<table>
  <thead><tr><th>node</th><th>ready</th><th class="num">view</th><th class="num">term</th><th>leader it knows</th>
  <th>members in its view</th><th>links to peers</th><th class="num">clients</th><th class="num">sessions</th>
  <th class="num">subscriptions</th><th class="num">retained</th><th class="num">messages in</th>
  <th class="num">messages out</th><th class="num">dropped</th></tr></thead>
  <tbody id="cluster"></tbody>
</table>

<h2>Membership</h2>
<div id="membership" class="muted"></div>

<h2>Last minutes</h2>
<div class="charts" id="charts"></div>

<script>
"use strict";
// Answers kept for the charts: [t_ms, messages_in, messages_out, dropped].
const samples = [];
let last = null;


async function refresh() {
  try {
    const c = await api("/status").then((r) => r.json());
    const now = Date.now(), t = c.traffic;
    if (last && now > last[0]) {
      const dt = (now - last[0]) / 1000;
      t.messages_in_per_s = Math.max(0, t.messages_in - last[1]) / dt;
      t.messages_out_per_s = Math.max(0, t.messages_out - last[2]) / dt;
      t.dropped_per_s = Math.max(0, t.dropped - last[3]) / dt;
    }
    last = [now, t.messages_in, t.messages_out, t.dropped];
    samples.push(last);
    if (samples.length > 300) samples.shift();
    $("node").textContent = c.node;
    $("version").textContent = c.version;
    const s = $("node-summary");
    Object.assign(s.dataset, {node: c.node, leader: c.leader ?? "none", view: c.view, term: c.term,
      ready: c.ready, links: (c.links || []).filter((l) => l.state === "up").length});
    s.innerHTML = `leader <b>${esc(c.leader ?? "none")}</b> &middot; view <b>${c.view}</b> &middot;
      term <b>${c.term}</b> &middot; <b class="${c.ready ? "up" : "down"}">${c.ready ? "ready" : "not ready"}</b>
      &middot; ${(c.links || []).filter((l) => l.state === "up").length} of ${(c.links || []).length} peer links up`;
    $("cluster").innerHTML = nodeRow(c.node, c, false);
    $("membership").textContent = (c.membership || []).join(", ") || "not a cluster member";
    const pts = (i) => rates(samples.map((x) => [x[0], x[i]]));
    $("charts").innerHTML = [
      chart("chart-messages", "Messages", "messages/s", [{name: "in", points: pts(1)}, {name: "out", points: pts(2)}]),
      chart("chart-dropped", "Dropped", "messages/s", [{name: "dropped", points: pts(3)}]),
    ].join("");
    $("updated").textContent = "updated " + stamp(now);
    document.body.dataset.ready = "1";
  } catch (err) {
    $("updated").textContent = "admin API unreachable: " + err;
  }
}

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"###
);
