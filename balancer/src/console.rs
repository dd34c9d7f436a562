//! The status console: one self-contained HTML page served at `GET /` on
//! the admin port. No build step and nothing fetched from elsewhere: the
//! page is a string in the binary, with a small inline script that polls
//! the admin API's JSON endpoints (`/backends`, `/events`, `/history`) once
//! a second and draws the charts as inline SVG.
//!
//! The drain and undrain buttons POST from the page's own origin (a drain
//! asks for confirmation first); the admin API refuses POSTs from other
//! origins (see `admin::cross_site`). In front of a bundled cluster
//! (`cluster_admin` on the backends) a Cluster panel shows the leader, the
//! view and each node's readiness, as the nodes answer on `/cluster`.

/// The page.
pub const PAGE: &str = r###"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mqlb console</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f6f7f9; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .5em; }
  .muted { color: #6b7280; }
  table { border-collapse: collapse; background: #fff; width: 100%; }
  th, td { text-align: left; padding: .45em .7em; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
  th { background: #eef0f4; font-weight: 600; }
  .state { font-weight: 600; }
  .up { color: #047857; } .down { color: #b91c1c; } .misconfigured { color: #b45309; }
  .draining { color: #6d28d9; } .unknown { color: #6b7280; }
  button { font: inherit; padding: .2em .7em; margin-right: .3em; cursor: pointer; }
  .charts { display: flex; flex-wrap: wrap; gap: 1em; }
  .chart { background: #fff; border: 1px solid #e5e7eb; padding: .5em; }
  .chart svg { display: block; }
  #events li { margin: .15em 0; }
  #lookup-result { font-family: ui-monospace, monospace; white-space: pre; }
</style>
</head>
<body>
<h1>mqlb</h1>
<div class="muted">status console &middot; <span id="updated">loading&hellip;</span></div>

<section id="cluster-section" hidden>
<h2>Cluster</h2>
<div id="cluster-summary"></div>
<table>
  <thead><tr><th>node</th><th>ready</th><th>view</th><th>leader it knows</th><th>members in its view</th></tr></thead>
  <tbody id="cluster"></tbody>
</table>
</section>

<h2>Backends</h2>
<table>
  <thead><tr><th>backend</th><th>state</th><th>probe RTT</th><th>connections</th>
  <th>CONNACKs</th><th>since last transition</th><th></th></tr></thead>
  <tbody id="backends"></tbody>
</table>

<h2>Connections and probe RTT, last minutes</h2>
<div class="charts" id="charts"></div>

<h2>Where is a client?</h2>
<form id="lookup"><input id="client" placeholder="client ID" size="30">
<button type="submit">look up</button></form>
<div id="lookup-result"></div>

<h2>Recent events</h2>
<ul id="events"></ul>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const ago = (ms) => {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? s + " s" : Math.round(s / 60) + " min";
};

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

async function post(path) {
  const r = await api(path, {method: "POST"});
  if (!r.ok) alert(path + ": " + r.status + " " + (await r.text()));
  refresh();
}

function renderBackends(list) {
  $("backends").innerHTML = list.map((b) => {
    const acks = Object.entries(b.connacks || {}).map(([k, v]) => esc(k) + " " + v).join(", ");
    const rtt = b.last_rtt_ms == null ? "&ndash;" : b.last_rtt_ms.toFixed(2) + " ms";
    const action = b.draining ? "undrain" : "drain";
    return `<tr data-backend="${esc(b.name)}">
      <td class="name">${esc(b.name)}<div class="muted">${esc(b.address)}</div></td>
      <td class="state ${esc(b.state)}">${esc(b.state)}${b.last_error ? `<div class="muted">${esc(b.last_error)}</div>` : ""}</td>
      <td class="rtt">${rtt}</td>
      <td class="connections">${b.connections}</td>
      <td class="connacks">${acks || "&ndash;"}</td>
      <td class="since">${ago(b.last_transition_ms)}</td>
      <td><button data-action="${action}" data-name="${esc(b.name)}">${action}</button></td>
    </tr>`;
  }).join("");
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
// with cluster_admin): the leader most of them name, the newest view, how
// many are ready, and each node's own answer.
function renderCluster(list) {
  const nodes = list.filter((b) => b.in_cluster_view !== null && b.in_cluster_view !== undefined);
  $("cluster-section").hidden = nodes.length === 0;
  if (!nodes.length) return;
  const answers = nodes.map((b) => b.cluster).filter((c) => c);
  const votes = {};
  for (const c of answers) if (c.leader) votes[c.leader] = (votes[c.leader] || 0) + 1;
  const leader = Object.entries(votes).sort((a, b) => b[1] - a[1])[0]?.[0] ?? "none";
  const view = answers.length ? Math.max(...answers.map((c) => c.view)) : 0;
  const ready = answers.filter((c) => c.ready).length;
  const s = $("cluster-summary");
  s.dataset.leader = leader; s.dataset.view = view; s.dataset.ready = ready;
  s.dataset.nodes = nodes.length;
  s.innerHTML = `leader <b>${esc(leader)}</b> &middot; view <b>${view}</b> &middot;
    <b class="${ready === nodes.length ? "up" : "down"}">${ready} of ${nodes.length}</b> nodes ready`;
  $("cluster").innerHTML = nodes.map((b) => {
    const c = b.cluster;
    if (!c) return `<tr data-node="${esc(b.name)}"><td>${esc(b.name)}</td>
      <td class="down" colspan="4">no answer from ${esc(b.name)}'s admin API</td></tr>`;
    return `<tr data-node="${esc(b.name)}" data-ready="${c.ready}" data-view="${c.view}">
      <td>${esc(b.name)}</td>
      <td class="${c.ready ? "up" : "down"}">${c.ready ? "ready" : "not ready"}</td>
      <td>${c.view}</td><td>${esc(c.leader ?? "none")}</td>
      <td>${esc(c.members.join(", "))}${b.in_cluster_view ? "" : ` <span class="down">(left out of the view)</span>`}</td></tr>`;
  }).join("");
}

function line(points, w, h, max, colour) {
  if (points.length < 2) return "";
  const t0 = points[0][0], t1 = points[points.length - 1][0] || t0 + 1;
  const xy = points.map(([t, v]) =>
    `${((t - t0) / Math.max(1, t1 - t0) * w).toFixed(1)},${(h - (v / max) * h).toFixed(1)}`);
  return `<polyline fill="none" stroke="${colour}" stroke-width="1.5" points="${xy.join(" ")}"/>`;
}

function renderCharts(history) {
  const w = 320, h = 90;
  $("charts").innerHTML = Object.entries(history).map(([name, samples]) => {
    const conns = samples.map((s) => [s[0], s[1]]);
    const rtts = samples.filter((s) => s[2] != null).map((s) => [s[0], s[2]]);
    const maxC = Math.max(1, ...conns.map((p) => p[1]));
    const maxR = Math.max(0.001, ...rtts.map((p) => p[1]));
    const last = samples.length ? samples[samples.length - 1] : [0, 0, null];
    return `<div class="chart" data-backend="${esc(name)}"><b>${esc(name)}</b>
      <span class="muted">${last[1]} conn, max ${maxC}; RTT max ${maxR.toFixed(2)} ms</span>
      <svg width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img"
           aria-label="connections and probe RTT of ${esc(name)}">
        <rect width="${w}" height="${h}" fill="#fafafa"/>
        ${line(conns, w, h, maxC, "#2563eb")}${line(rtts, w, h, maxR, "#d97706")}
      </svg>
      <div class="muted"><span style="color:#2563eb">&#9632;</span> connections
      <span style="color:#d97706">&#9632;</span> probe RTT</div></div>`;
  }).join("");
}

// Date and 24-hour time, local: "2026-12-06 14:03:07".
const stamp = (ms) => {
  const d = new Date(ms), p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
};

function renderEvents(events) {
  $("events").innerHTML = events.length ? events.slice(0, 50).map((e) =>
    `<li><span class="muted">${stamp(e.at_ms)}</span>
     <b>${esc(e.kind)}</b> ${esc(e.backend)}: ${esc(e.detail)}</li>`).join("")
    : `<li class="muted">none yet</li>`;
}

async function refresh() {
  try {
    const [b, e, h] = await Promise.all(
      ["/backends", "/events", "/history"].map((p) => api(p).then((r) => r.json())));
    renderCluster(b); renderBackends(b); renderEvents(e); renderCharts(h);
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
"###;
