//! `mqlb healthcheck`: an HTTP health endpoint backed by real MQTT probes,
//! for load balancers and orchestrators that can only fetch a URL (cloud
//! HTTP load balancers, Kubernetes HTTP probes). It replaces the static
//! "healthy" page people serve next to a broker, which says nothing about
//! MQTT.
//!
//! `GET /health` (or `/`) answers 200 when the latest probe found the broker
//! serving MQTT and 503 otherwise (including before the first probe), with a
//! JSON body: `{target, status, detail, rtt_ms, checked_at}`.

use std::sync::Arc;

use hyper::StatusCode;
use mqlb_healthcheck::{
    CheckSettings, Checker, HealthCell, HealthState, Observer, Outcome, Target, Transition,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use mqlb_balancer::http::Reply;

struct LogObserver;

impl Observer for LogObserver {
    fn on_probe(&self, _target: &str, _outcome: &Outcome) {}
    fn on_transition(&self, target: &str, t: Transition) {
        tracing::info!(
            target,
            from = t.from.label(),
            to = t.to.label(),
            "broker health changed"
        );
    }
}

/// The `/health` answer for the latest report.
pub fn health_reply(target: &str, cell: &HealthCell) -> Reply {
    let report = cell.report();
    let status = if report.state == HealthState::Up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let rtt_ms = match &report.last_outcome {
        Some(Outcome::Up(r)) => Some(r.ping.as_secs_f64() * 1e3),
        _ => None,
    };
    let body = json!({
        "target": target,
        "status": report.state.label(),
        "detail": report.last_outcome.as_ref().map(|o| o.summary()),
        "rtt_ms": rtt_ms,
        "checked_at": report.last_check.map(mqlb_balancer::admin::rfc3339),
    });
    Reply::json(status, body)
}

/// Probes `target` on `settings.interval` and serves `/health` on `listener`
/// until `shutdown`.
pub async fn run(
    target: String,
    listener: TcpListener,
    settings: CheckSettings,
    shutdown: CancellationToken,
) {
    let checker = Checker::spawn(
        &[Target {
            name: "target".into(),
            address: target.clone(),
            proxy: false,
            tls: None,
            websocket: settings.spec.websocket.clone(),
        }],
        &settings,
        &format!("hc{:06x}", fastrand::u32(..0xFF_FFFF)),
        Arc::new(LogObserver),
        shutdown.clone(),
    );
    let Some(cell) = checker.cell("target") else {
        return;
    };
    tracing::info!(address = listener.local_addr().ok().map(tracing::field::display), %target, "health endpoint listening");
    mqlb_balancer::http::serve(
        listener,
        shutdown,
        move |_method, path, _headers| match path {
            "/" | "/health" | "/healthz" => health_reply(&target, &cell),
            _ => Reply::json(StatusCode::NOT_FOUND, json!({"error": "not found"})),
        },
    )
    .await
}
