//! The status console: one self-contained HTML page served at `GET /` on
//! the admin port. No build step and nothing fetched from elsewhere: the
//! page is a string in the binary, with a small inline script that polls
//! the admin API's JSON endpoints (`/backends`, `/events`, `/history`) once
//! a second and draws the charts as inline SVG.
//!
//! The drain and undrain buttons POST from the page's own origin; the admin
//! API refuses POSTs from other origins (see `admin::cross_site`).

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
    btn.onclick = () => post(`/backends/${encodeURIComponent(btn.dataset.name)}/${btn.dataset.action}`);
  }
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

function renderEvents(events) {
  $("events").innerHTML = events.length ? events.slice(0, 50).map((e) =>
    `<li><span class="muted">${new Date(e.at_ms).toLocaleTimeString()}</span>
     <b>${esc(e.kind)}</b> ${esc(e.backend)}: ${esc(e.detail)}</li>`).join("")
    : `<li class="muted">none yet</li>`;
}

async function refresh() {
  try {
    const [b, e, h] = await Promise.all(
      ["/backends", "/events", "/history"].map((p) => api(p).then((r) => r.json())));
    renderBackends(b); renderEvents(e); renderCharts(h);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
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
