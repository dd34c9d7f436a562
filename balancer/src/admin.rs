//! The admin HTTP API.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/healthz` | 200 while the process serves (liveness) |
//! | GET | `/readyz` | 200 when at least one backend is up, else 503 |
//! | GET | `/backends` | JSON: name, address, state, draining, last_rtt_ms, last_check, connections, consecutive_failures, last_error |
//! | GET | `/clients/{client_id}` | JSON: where the client would be placed now, and where it is connected |
//! | GET | `/metrics` | Prometheus text |
//! | POST | `/backends/{name}/drain` | stop new placements, move its clients at the eviction rate |
//! | POST | `/backends/{name}/undrain` | accept new placements again |
//! | POST | `/reload` | re-read the configuration file (as SIGHUP does) |
//! | GET | `/` | the status console (HTML) |
//! | GET | `/events` | JSON: recent health transitions, drains and session moves, newest first |
//! | GET | `/history` | JSON: per backend, `[unix_ms, connections, probe_rtt_ms]` a second for 5 minutes |
//!
//! Routing is a pure function ([`route`]) so tests call it without a socket.
//!
//! Who may call it ([`crate::http::Access`], `[admin] token_file` and
//! `allowed_hosts`): every POST needs the bearer token (without one
//! configured, POSTs are refused), and so does every read when the API is
//! not bound to loopback; `/healthz`, `/readyz` and the console's page are
//! always answered. A `Host` header that names neither a loopback address,
//! the API's own address nor an allowed host is refused (DNS rebinding), and
//! so is a POST from a browser page of another origin.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};
use mqlb_healthcheck::{HealthState, Outcome};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::Reply;
use crate::metrics::RejectReason;
use crate::select::Backend;
use crate::shared::Shared;

/// Serves the API until `shutdown`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    tracing::info!(
        address = listener.local_addr().ok().map(tracing::field::display),
        "admin API listening"
    );
    crate::http::serve(listener, shutdown, move |method, path, headers| {
        if let Some(access) = &shared.admin_access {
            if let Err(refused) = access.check(method, path, headers) {
                return refused;
            }
        }
        route(method, path, &shared)
    })
    .await
}

/// Answers one request.
pub fn route(method: &Method, path: &str, shared: &Shared) -> Reply {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, [""]) => Reply::html(crate::console::PAGE),
        (&Method::GET, ["events"]) => Reply::json(StatusCode::OK, shared.journal.events_json()),
        (&Method::GET, ["history"]) => Reply::json(StatusCode::OK, shared.journal.history_json()),
        (&Method::GET, ["healthz"]) => Reply::text(StatusCode::OK, "ok\n"),
        (&Method::GET, ["readyz"]) => {
            if shared.is_ready() {
                Reply::text(StatusCode::OK, "ready\n")
            } else {
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, "no backend is up\n")
            }
        }
        (&Method::GET, ["backends"]) => Reply::json(StatusCode::OK, backends_json(shared)),
        (&Method::GET, ["summary"]) => Reply::json(StatusCode::OK, summary_json(shared)),
        (&Method::GET, ["clients", id]) => {
            let id = percent_decode(id);
            let entries = shared.registry.find_client(&id);
            // Where it is (or, not connected, where the default pool would
            // place it: rules may look at more than the client ID).
            let pool = entries.first().map_or_else(
                || shared.config().balancer.default_pool.clone(),
                |e| Some(e.backend.pool.clone()),
            );
            let placed = pool.as_deref().and_then(|p| {
                shared
                    .backends
                    .candidates_in(p, id.as_bytes())
                    .first()
                    .map(|b| b.name.clone())
            });
            let rule = entries.first().and_then(|e| e.rule);
            let connected: Vec<String> = entries.iter().map(|e| e.backend.name.clone()).collect();
            Reply::json(
                StatusCode::OK,
                json!({
                    "client_id": id,
                    "placed_on": placed,
                    "pool": pool,
                    "rule": rule,
                    "address": entries.first().map(|e| e.address.to_string()),
                    "connected": !connected.is_empty(),
                    "connected_to": connected,
                }),
            )
        }
        (&Method::GET, ["metrics"]) => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4",
            body: render_metrics(shared),
        },
        (&Method::POST, ["reload"]) => match shared.reload_from_file() {
            Ok(r) => Reply::json(
                StatusCode::OK,
                json!({"added": r.added, "removed": r.removed, "needs_restart": r.needs_restart, "tls_reloaded": r.tls_reloaded}),
            ),
            Err(e) => Reply::json(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": e})),
        },
        (&Method::POST, ["backends", name, action @ ("drain" | "undrain")]) => {
            let ok = if *action == "drain" {
                shared.drain(name)
            } else {
                shared.undrain(name)
            };
            if ok {
                Reply::json(
                    StatusCode::OK,
                    json!({"backend": name, "draining": *action == "drain"}),
                )
            } else {
                Reply::json(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no backend named {name}")}),
                )
            }
        }
        (_, ["healthz" | "readyz" | "backends" | "summary" | "metrics" | "reload"])
        | (_, ["clients", _])
        | (_, ["backends", _, _]) => {
            Reply::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Decodes `%XX` escapes (client IDs may contain `/` or spaces).
fn percent_decode(s: &str) -> String {
    // On bytes, never on `&str` offsets: "%a" followed by a multi-byte
    // character must not split it (that panicked the connection task).
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn backends_json(shared: &Shared) -> serde_json::Value {
    // Grouped by pool, in configuration order within each.
    let mut set: Vec<Arc<Backend>> = shared.backends.snapshot().to_vec();
    set.sort_by(|a, b| a.pool.cmp(&b.pool));
    let list: Vec<serde_json::Value> = set
        .iter()
        .map(|b| {
            let report = b.health().map(|h| h.report());
            let last_rtt_ms = report.as_ref().and_then(|r| match &r.last_outcome {
                Some(Outcome::Up(rtt)) => Some(rtt.ping.as_secs_f64() * 1e3),
                _ => None,
            });
            let last_error = report.as_ref().and_then(|r| match &r.last_outcome {
                Some(o @ (Outcome::Down(_) | Outcome::Misconfigured(_))) => Some(o.summary()),
                _ => None,
            });
            let state = if b.is_draining() {
                "draining"
            } else {
                b.health_state().label()
            };
            json!({
                "name": b.name,
                "pool": b.pool,
                "address": b.address,
                "weight": b.weight,
                "state": state,
                "health": b.health_state().label(),
                "draining": b.is_draining(),
                "in_cluster_view": b.cluster_admin.as_ref().map(|_| !b.is_out_of_view()),
                // What the node last said on its /cluster (null when it is
                // not a cluster node or did not answer).
                "cluster": b.cluster_node().map(|v| json!({
                    "node": v.node,
                    "ready": v.ready,
                    "view": v.view,
                    "term": v.term,
                    "leader": v.leader,
                    "members": v.members,
                    "links": v.links.iter().map(|(peer, state)| json!({"peer": peer, "state": state})).collect::<Vec<_>>(),
                    "traffic": {
                        "clients": v.traffic.clients,
                        "sessions": v.traffic.sessions,
                        "subscriptions": v.traffic.subscriptions,
                        "retained": v.traffic.retained,
                        "messages_in": v.traffic.messages_in,
                        "messages_out": v.traffic.messages_out,
                        "dropped": v.traffic.dropped,
                        "messages_in_per_s": v.traffic.rates.map(|r| r.messages_in),
                        "messages_out_per_s": v.traffic.rates.map(|r| r.messages_out),
                        "dropped_per_s": v.traffic.rates.map(|r| r.dropped),
                    },
                })),
                "last_rtt_ms": last_rtt_ms,
                "last_check": report.as_ref().and_then(|r| r.last_check).map(rfc3339),
                "connections": b.active.load(Ordering::Relaxed),
                "forwarded": b.forwarded.load(Ordering::Relaxed),
                "connect_failures": b.connect_failures.load(Ordering::Relaxed),
                "bytes_to_backend": b.bytes.to_backend.load(Ordering::Relaxed),
                "bytes_to_client": b.bytes.to_client.load(Ordering::Relaxed),
                "consecutive_failures": report.as_ref().map_or(0, |r| r.consecutive_failures),
                "last_error": last_error,
                "last_transition_ms": match b.last_transition_ms.load(Ordering::Relaxed) {
                    0 => serde_json::Value::Null,
                    ms => json!(ms),
                },
                "connacks": connacks(b),
                "pending_connacks": b.pending_connacks.load(Ordering::Relaxed),
                "admission_rejected": serde_json::Value::Object(
                    crate::admission::Refusal::ALL
                        .iter()
                        .map(|r| (r.label().to_string(), json!(b.admission_refused.get(*r))))
                        .collect(),
                ),
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

/// The balancer as a whole, for the console's header and totals row: its
/// version and uptime, connections and bytes in total, the connection
/// rate (now, most, and the configured caps) and refusals by reason.
fn summary_json(shared: &Shared) -> serde_json::Value {
    let m = &shared.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let backends = shared.backends.snapshot();
    let sum = |f: &dyn Fn(&Backend) -> u64| backends.iter().map(|b| f(b)).sum::<u64>();
    let config = shared.config();
    let started = shared
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let uptime = shared.started.elapsed().map_or(0, |d| d.as_secs());
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_ms": started,
        "uptime_s": uptime,
        "connections": {
            "active": load(&m.active),
            "accepted": load(&m.accepted),
            "forwarded": load(&m.forwarded),
            "refused": m.rejected_total(),
            "max": shared.limit.max(),
        },
        "refused": serde_json::Value::Object(
            RejectReason::ALL
                .iter()
                .map(|r| (r.label().to_string(), json!(m.rejected(*r))))
                .collect(),
        ),
        "backend_errors": {
            "connect_failures": sum(&|b| load(&b.connect_failures)),
            "evictions": sum(&|b| load(&b.evictions)),
        },
        "bytes": {
            "to_backends": sum(&|b| load(&b.bytes.to_backend)),
            "to_clients": sum(&|b| load(&b.bytes.to_client)),
        },
        "rates": shared.journal.totals_json(),
        "limits": {
            "max_connections": shared.limit.max(),
            "backend_connect_rate": config.admission.backend_connect_rate,
            "per_ip_connect_rate": config.admission.per_ip_connect_rate,
            "per_ip_connections": config.admission.per_ip_connections,
        },
    })
}

/// CONNACK counts by reason name, only those seen.
fn connacks(b: &Backend) -> serde_json::Value {
    serde_json::Value::Object(
        b.connacks
            .iter()
            .enumerate()
            .filter_map(|(code, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| {
                    let rc = mqlb_protocol::ReasonCode(code as u8);
                    (rc.name().to_string(), json!(n))
                })
            })
            .collect(),
    )
}

/// RFC 3339 UTC timestamp with milliseconds (civil-from-days, no date crate).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A Prometheus label value, escaped as the text format requires (`\\`,
/// `\"` and `\n`): backend names come from configuration or DNS and may
/// hold any of them, and one unescaped quote breaks the whole scrape.
pub struct LabelValue<'a>(pub &'a str);

impl std::fmt::Display for LabelValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Writes a family's HELP and TYPE lines.
fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A family with one unlabelled sample.
fn single(o: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(o, name, kind, help);
    let _ = writeln!(o, "{name} {value}");
}

/// A family with one sample per backend.
fn per_backend(
    o: &mut String,
    backends: &[Arc<Backend>],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&Backend) -> u64,
) {
    family(o, name, kind, help);
    for b in backends {
        let _ = writeln!(
            o,
            "{name}{{backend=\"{}\"}} {}",
            LabelValue(&b.name),
            value(b)
        );
    }
}

/// The reason codes a CONNACK carries (MQTT 5.0 §3.2.2.2; a 3.x return
/// code is counted as its v5 equivalent).
const CONNACK_CODES: [u8; 22] = [
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];

/// Prometheus text exposition of every metric.
pub fn render_metrics(shared: &Shared) -> String {
    let m = &shared.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut o = String::new();
    single(
        &mut o,
        "mqlb_admin_refused_total",
        "counter",
        "Admin API requests refused: a missing or wrong token, a foreign Host, a cross-site POST.",
        shared.admin_access.as_ref().map_or(0, |a| load(&a.refused)),
    );
    family(
        &mut o,
        "mqlb_build_info",
        "gauge",
        "The running version (the value is always 1).",
    );
    let _ = writeln!(
        o,
        "mqlb_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    single(
        &mut o,
        "mqlb_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        load(&m.accepted),
    );
    single(
        &mut o,
        "mqlb_connections_active",
        "gauge",
        "Client connections open now.",
        load(&m.active),
    );
    single(
        &mut o,
        "mqlb_connections_forwarded_total",
        "counter",
        "Client connections handed to a backend.",
        load(&m.forwarded),
    );
    family(
        &mut o,
        "mqlb_tls_reloads_total",
        "counter",
        "TLS listener certificate re-reads after their files changed, by result (failed: the old certificate stays in service).",
    );
    let _ = writeln!(
        o,
        "mqlb_tls_reloads_total{{result=\"ok\"}} {}\nmqlb_tls_reloads_total{{result=\"failed\"}} {}",
        load(&m.tls_reloads),
        load(&m.tls_reload_failures)
    );
    family(
        &mut o,
        "mqlb_connect_rejected_total",
        "counter",
        "Connections refused before reaching a backend, by reason.",
    );
    for r in RejectReason::ALL {
        let _ = writeln!(
            o,
            "mqlb_connect_rejected_total{{reason=\"{}\"}} {}",
            r.label(),
            m.rejected(r)
        );
    }
    let backends = shared.backends.snapshot();
    let bs = backends.as_slice();
    per_backend(
        &mut o,
        bs,
        "mqlb_backend_connections_active",
        "gauge",
        "Client connections forwarded to the backend now.",
        |b| load(&b.active),
    );
    per_backend(
        &mut o,
        bs,
        "mqlb_backend_connections_total",
        "counter",
        "Client connections forwarded to the backend.",
        |b| load(&b.forwarded),
    );
    family(
        &mut o,
        "mqlb_backend_bytes_total",
        "counter",
        "Bytes relayed between the backend and its clients, by direction (counted as they are written).",
    );
    for b in bs {
        let name = LabelValue(&b.name);
        let _ = writeln!(
            o,
            "mqlb_backend_bytes_total{{backend=\"{name}\",direction=\"to_backend\"}} {}\nmqlb_backend_bytes_total{{backend=\"{name}\",direction=\"to_client\"}} {}",
            load(&b.bytes.to_backend),
            load(&b.bytes.to_client)
        );
    }
    per_backend(
        &mut o,
        bs,
        "mqlb_backend_connect_failures_total",
        "counter",
        "TCP connects to the backend that failed or timed out.",
        |b| load(&b.connect_failures),
    );
    per_backend(
        &mut o,
        bs,
        "mqlb_backend_draining",
        "gauge",
        "1 while an operator drains the backend.",
        |b| u64::from(b.is_draining()),
    );
    per_backend(
        &mut o,
        bs,
        "mqlb_evictions_total",
        "counter",
        "Clients closed to move them off a failed or drained backend.",
        |b| load(&b.evictions),
    );
    per_backend(
        &mut o,
        bs,
        "mqlb_backend_pending_connacks",
        "gauge",
        "CONNECTs forwarded and not yet answered by a CONNACK.",
        |b| b.pending_connacks.load(Ordering::Relaxed),
    );
    per_backend(
        &mut o,
        bs,
        "mqlb_backend_sessions_moving_total",
        "counter",
        "CONNECTs an mqlb node refused because the client's session was moving between nodes (not counted against its health).",
        |b| load(&b.sessions_moving),
    );
    family(
        &mut o,
        "mqlb_admission_rejected_total",
        "counter",
        "Clients refused by admission control, by cap and placed backend.",
    );
    for b in bs {
        for r in crate::admission::Refusal::ALL {
            let _ = writeln!(
                o,
                "mqlb_admission_rejected_total{{backend=\"{}\",reason=\"{}\"}} {}",
                LabelValue(&b.name),
                r.label(),
                b.admission_refused.get(r)
            );
        }
    }
    family(
        &mut o,
        "mqlb_backend_connack_total",
        "counter",
        "CONNACKs the backend sent clients, by v5 reason code.",
    );
    for b in bs {
        for (code, n) in b.connacks.iter().enumerate() {
            let n = load(n);
            // The codes a CONNACK can carry are always there (0 until
            // seen), so a dashboard shows 0, not "no data".
            if n > 0 || CONNACK_CODES.contains(&(code as u8)) {
                let rc = mqlb_protocol::ReasonCode(code as u8);
                let _ = writeln!(o, "mqlb_backend_connack_total{{backend=\"{}\",code=\"0x{code:02X}\",reason=\"{}\"}} {n}", LabelValue(&b.name), rc.name());
            }
        }
    }
    family(
        &mut o,
        "mqlb_backend_connect_latency_seconds",
        "histogram",
        "Client CONNECT to backend CONNACK.",
    );
    for b in bs {
        b.connect_latency.render(
            &mut o,
            "mqlb_backend_connect_latency_seconds",
            &format!("backend=\"{}\"", LabelValue(&b.name)),
        );
    }
    family(
        &mut o,
        "mqlb_backend_health",
        "gauge",
        "1 for the backend's current health state.",
    );
    for b in bs {
        let cur = b.health_state();
        for st in [
            HealthState::Unknown,
            HealthState::Up,
            HealthState::Down,
            HealthState::Misconfigured,
        ] {
            let _ = writeln!(
                o,
                "mqlb_backend_health{{backend=\"{}\",state=\"{}\"}} {}",
                LabelValue(&b.name),
                st.label(),
                u8::from(st == cur)
            );
        }
    }
    family(
        &mut o,
        "mqlb_backend_health_transitions_total",
        "counter",
        "Health state changes, by new state.",
    );
    for b in bs {
        for st in [
            HealthState::Up,
            HealthState::Down,
            HealthState::Misconfigured,
        ] {
            let _ = writeln!(
                o,
                "mqlb_backend_health_transitions_total{{backend=\"{}\",to=\"{}\"}} {}",
                LabelValue(&b.name),
                st.label(),
                b.transitions.get(st as usize).map_or(0, load)
            );
        }
    }
    family(
        &mut o,
        "mqlb_backend_probes_total",
        "counter",
        "Health probes, by result.",
    );
    for b in bs {
        for (r, n) in ["up", "down", "misconfigured"].iter().zip(&b.probes) {
            let _ = writeln!(
                o,
                "mqlb_backend_probes_total{{backend=\"{}\",result=\"{r}\"}} {}",
                LabelValue(&b.name),
                load(n)
            );
        }
    }
    family(
        &mut o,
        "mqlb_backend_probe_rtt_seconds",
        "histogram",
        "Probe PINGREQ to PINGRESP.",
    );
    for b in bs {
        b.probe_rtt.render(
            &mut o,
            "mqlb_backend_probe_rtt_seconds",
            &format!("backend=\"{}\"", LabelValue(&b.name)),
        );
    }
    crate::metrics::render_process(&mut o);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_795_672_408_123);
        assert_eq!(rfc3339(t), "2026-11-26T05:53:28.123Z");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(LabelValue("a\"b\\c\nd").to_string(), "a\\\"b\\\\c\\nd");
        assert_eq!(LabelValue("plain-b1").to_string(), "plain-b1");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        // A raw escape before a multi-byte character (it used to panic:
        // "not a char boundary"), and escapes cut short at the end.
        assert_eq!(percent_decode("%a\u{e9}"), "%a\u{e9}");
        assert_eq!(percent_decode("%\u{e9}"), "%\u{e9}");
        assert_eq!(percent_decode("x%4"), "x%4");
        assert_eq!(percent_decode("%c3%a9"), "\u{e9}");
    }
}
