//! Probing every target on an interval and publishing the result.
//!
//! Each target gets one task. The state it computes reaches readers through
//! a [`HealthCell`]: an atomic the data path loads on every placement, and an
//! `ArcSwap` report for the admin API. Passive signals from the data path go
//! in through a bounded channel with `try_send`, so the data path never waits
//! on the checker.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::probe::{probe, Outcome, ProbeSpec};
use crate::state::{HealthState, Thresholds, Tracker, Transition};

/// Probes of one target allowed in flight at once (each is bounded by its
/// step timeouts, so this only matters for very short intervals).
const MAX_IN_FLIGHT: usize = 8;

/// What and how often to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    /// Time between probes of one target.
    pub interval: Duration,
    /// Random delay before a target's first probe, at most this, so many
    /// balancers (or targets) do not probe in lockstep.
    pub jitter: Duration,
    /// Rise, fall and passive thresholds.
    pub thresholds: Thresholds,
    /// The probe itself; its client ID is a prefix, completed per target.
    pub spec: ProbeSpec,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            jitter: Duration::from_millis(250),
            thresholds: Thresholds::default(),
            spec: ProbeSpec {
                timeout: Duration::from_millis(500),
                ..ProbeSpec::default()
            },
        }
    }
}

/// A broker to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Name, for logs and the probe client ID.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// The broker expects a PROXY protocol header: probes send LOCAL.
    pub proxy: bool,
    /// TLS to the broker, as the data path uses it.
    pub tls: Option<crate::tls::TlsClient>,
    /// MQTT over WebSocket on this path, as the data path uses it.
    pub websocket: Option<String>,
}

/// The latest facts about one target, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Current state.
    pub state: HealthState,
    /// The latest probe outcome, if any.
    pub last_outcome: Option<Outcome>,
    /// When the latest probe finished.
    pub last_check: Option<SystemTime>,
    /// Consecutive failed probes.
    pub consecutive_failures: u32,
}

/// Receives probe results and transitions (metrics, evictions, logs).
pub trait Observer: Send + Sync + 'static {
    /// After every probe.
    fn on_probe(&self, target: &str, outcome: &Outcome);
    /// After a state change.
    fn on_transition(&self, target: &str, transition: Transition);
}

/// A target's published health.
#[derive(Debug)]
pub struct HealthCell {
    state: AtomicU8,
    report: ArcSwap<Report>,
    passive: mpsc::Sender<()>,
}

impl HealthCell {
    /// The state, as the data path reads it: one atomic load.
    pub fn state(&self) -> HealthState {
        HealthState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The latest report.
    pub fn report(&self) -> Arc<Report> {
        self.report.load_full()
    }

    /// Records a data-path failure (connect refused or timed out, CONNACK
    /// "server unavailable"). Never blocks; if the checker is behind, the
    /// signal is dropped, which only delays a passive mark-down.
    pub fn passive_failure(&self) {
        let _ = self.passive.try_send(());
    }

    fn publish(&self, report: Report) {
        self.state.store(report.state as u8, Ordering::Release);
        self.report.store(Arc::new(report));
    }
}

/// The running checks. Targets can be added and removed while running
/// (configuration reload); each target's task has its own stop token.
pub struct Checker {
    cells: Vec<(String, Arc<HealthCell>, CancellationToken)>,
    settings: CheckSettings,
    instance: String,
    observer: Arc<dyn Observer>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("targets", &self.cells.len())
            .finish()
    }
}

impl Checker {
    /// Starts one task per target, stopped by `shutdown`. `instance` makes
    /// probe client IDs unique per balancer: `mqlb-probe-{instance}-{target}`.
    pub fn spawn(
        targets: &[Target],
        settings: &CheckSettings,
        instance: &str,
        observer: Arc<dyn Observer>,
        shutdown: CancellationToken,
    ) -> Checker {
        let mut checker = Checker {
            cells: Vec::new(),
            settings: settings.clone(),
            instance: instance.to_string(),
            observer,
            shutdown,
        };
        for t in targets {
            checker.add(t);
        }
        checker
    }

    /// Starts checking one more target and returns its cell.
    pub fn add(&mut self, t: &Target) -> Arc<HealthCell> {
        let (tx, rx) = mpsc::channel(64);
        let cell = Arc::new(HealthCell {
            state: AtomicU8::new(HealthState::Unknown as u8),
            report: ArcSwap::from_pointee(Report {
                state: HealthState::Unknown,
                last_outcome: None,
                last_check: None,
                consecutive_failures: 0,
            }),
            passive: tx,
        });
        let mut spec = self.settings.spec.clone();
        spec.client_id = probe_client_id(&self.instance, &t.name);
        spec.proxy_local = t.proxy;
        spec.tls = t.tls.clone();
        spec.websocket = t.websocket.clone();
        let stop = self.shutdown.child_token();
        tokio::spawn(run_target(
            t.clone(),
            spec,
            self.settings.clone(),
            cell.clone(),
            rx,
            self.observer.clone(),
            stop.clone(),
        ));
        self.cells.push((t.name.clone(), cell.clone(), stop));
        cell
    }

    /// Stops checking a target.
    pub fn remove(&mut self, name: &str) {
        self.cells.retain(|(n, _, stop)| {
            if n == name {
                stop.cancel();
                false
            } else {
                true
            }
        });
    }

    /// The cell for a target name.
    pub fn cell(&self, name: &str) -> Option<Arc<HealthCell>> {
        self.cells
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, c, _)| c.clone())
    }
}

/// `mqlb-probe-{instance}-{target}`, trimmed to MQTT 3.1's 23-character
/// client-ID limit only when the instance asks for it (empty instance ⇒ an
/// empty ID, which the broker assigns).
pub fn probe_client_id(instance: &str, target: &str) -> String {
    if instance.is_empty() {
        return String::new();
    }
    format!("mqlb-probe-{instance}-{target}")
}

async fn run_target(
    target: Target,
    spec: ProbeSpec,
    settings: CheckSettings,
    cell: Arc<HealthCell>,
    mut passive: mpsc::Receiver<()>,
    observer: Arc<dyn Observer>,
    shutdown: CancellationToken,
) {
    let jitter_ms = settings.jitter.as_millis() as u64;
    let first = Duration::from_millis(if jitter_ms > 0 {
        fastrand::u64(..jitter_ms)
    } else {
        0
    });
    let next = tokio::time::Instant::now() + first;
    let mut tracker = Tracker::default();
    let th = settings.thresholds;
    let transition = |tr: Option<Transition>, tracker: &Tracker, outcome: Option<Outcome>| {
        let report = Report {
            state: tracker.state(),
            last_outcome: outcome.or_else(|| cell.report().last_outcome.clone()),
            last_check: Some(SystemTime::now()),
            consecutive_failures: tracker.consecutive_failures(),
        };
        // Why, on the line itself: a name that does not resolve, a refused
        // connection, a CONNACK code.
        let why = match &report.last_outcome {
            Some(o @ (Outcome::Down(_) | Outcome::Misconfigured(_))) => Some(o.summary()),
            _ => None,
        };
        cell.publish(report);
        if let Some(tr) = tr {
            // A backend found up at start is what was expected: said at
            // debug. Anything else (down at start, every later change)
            // is news for the operator.
            if tr.from == HealthState::Unknown && tr.to == HealthState::Up {
                tracing::debug!(backend = %target.name, from = tr.from.label(), to = tr.to.label(), "health changed");
            } else {
                tracing::info!(backend = %target.name, from = tr.from.label(), to = tr.to.label(), reason = why.as_deref(), "health changed");
            }
            observer.on_transition(&target.name, tr);
        }
    };
    // Probes start on a fixed cadence, even while an earlier one is still
    // waiting out its timeout: a hung broker is then seen by `fall` probes
    // within interval × fall + timeout, instead of (interval + timeout) × fall.
    let mut in_flight = tokio::task::JoinSet::new();
    let mut busy = [false; MAX_IN_FLIGHT];
    let mut ticker = tokio::time::interval_at(next, settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {
                // Overlapping probes get distinct client IDs (slot suffix),
                // so a slow probe is never taken over by the next one.
                let Some((slot, free)) = busy.iter_mut().enumerate().find(|(_, b)| !**b) else {
                    continue;
                };
                *free = true;
                let address = target.address.clone();
                let mut spec = spec.clone();
                if slot > 0 && !spec.client_id.is_empty() {
                    spec.client_id = format!("{}-{slot}", spec.client_id);
                }
                in_flight.spawn(async move { (slot, probe(&address, &spec).await) });
            }
            Some(done) = in_flight.join_next() => {
                let Ok((slot, outcome)) = done else { continue };
                if let Some(b) = busy.get_mut(slot) {
                    *b = false;
                }
                if !matches!(outcome, Outcome::Up(_)) {
                    tracing::debug!(backend = %target.name, outcome = %outcome.summary(), "probe failed");
                }
                observer.on_probe(&target.name, &outcome);
                let tr = tracker.observe(&outcome, th);
                transition(tr, &tracker, Some(outcome));
            }
            Some(()) = passive.recv() => {
                let tr = tracker.observe_passive(th);
                if tr.is_some() {
                    transition(tr, &tracker, None);
                }
            }
        }
    }
}
