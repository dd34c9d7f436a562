//! Moving a backend's sessions: paced closes.
//!
//! When a backend goes down or is drained, its clients must reconnect
//! elsewhere, but 10,000 clients reconnecting in the same millisecond is a
//! storm that can take the next broker down too. One evictor per balancer
//! closes connections at a configured rate: slot `i` falls at
//! `i / rate` seconds, plus up to half a slot of random jitter, so the rate is
//! kept over any window longer than a millisecond (the timer's resolution),
//! and closes never line up across balancers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::registry::{Eviction, Registry};
use crate::select::Backends;

/// What to move.
#[derive(Debug)]
enum Job {
    /// Every client on this backend, unless it becomes usable again.
    Backend(String),
    /// Every client, for a graceful shutdown: the balancer is going away,
    /// so a backend's health does not stop it.
    All,
}

/// Requests to move clients; one job runs at a time, so all of them share
/// the balancer's rate.
#[derive(Debug, Clone)]
pub struct Evictor {
    tx: mpsc::UnboundedSender<Job>,
}

impl Evictor {
    /// Starts the evictor task.
    pub fn spawn(
        registry: Arc<Registry>,
        backends: Arc<Backends>,
        rate: u32,
        server_reference: Option<String>,
        journal: Arc<Journal>,
        shutdown: CancellationToken,
    ) -> Evictor {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(
            registry,
            backends,
            rate,
            server_reference,
            journal,
            rx,
            shutdown,
        ));
        Evictor { tx }
    }

    /// Moves every client currently on `backend`, at the paced rate.
    pub fn evict_backend(&self, backend: &str) {
        let _ = self.tx.send(Job::Backend(backend.to_string()));
    }

    /// Closes every client at the paced rate, including any that register
    /// while it runs: the graceful half of a shutdown.
    pub fn evict_all(&self) {
        let _ = self.tx.send(Job::All);
    }
}

/// Sleeps until `at`, unless it has already passed (a timer would round a
/// sub-millisecond wait up to a whole millisecond).
/// Waits for slot `at`, then evicts `h` unless something already did.
/// False: the balancer is shutting down.
async fn evict_at(
    at: Instant,
    h: &crate::registry::EvictHandle,
    backend: &crate::select::Backend,
    reason: &Eviction,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = sleep_until_due(at) => {}
        _ = shutdown.cancelled() => return false,
    }
    if h.reason().is_none() {
        h.evict(reason.clone());
        backend.evictions.fetch_add(1, Ordering::Relaxed);
    }
    true
}

async fn sleep_until_due(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}

/// How far behind its schedule the evictor may catch up in a burst; beyond
/// this (an idle gap) the schedule restarts.
const CATCH_UP: Duration = Duration::from_millis(5);

async fn run(
    registry: Arc<Registry>,
    backends: Arc<Backends>,
    rate: u32,
    server_reference: Option<String>,
    journal: Arc<Journal>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    shutdown: CancellationToken,
) {
    let slot = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let reason = match server_reference {
        Some(r) => Eviction::UseAnotherServer(r),
        None => Eviction::ShuttingDown,
    };
    // The next free slot, shared by all jobs so the rate is per balancer.
    let mut next = Instant::now();
    loop {
        let job = tokio::select! {
            j = rx.recv() => match j { Some(j) => j, None => return },
            _ = shutdown.cancelled() => return,
        };
        // Slot `i` falls at `start + i × slot` (+ jitter). Timers tick in
        // milliseconds, so above 1,000/s several slots fall due per wake-up
        // and are served together; a late wake-up catches up with the
        // schedule instead of losing the time, so the configured rate is
        // what clients see. After an idle gap the schedule restarts now.
        let pace = |next: &mut Instant| {
            let now = Instant::now();
            if *next + CATCH_UP < now {
                *next = now;
            }
            let at = *next + slot.mul_f64(fastrand::f64() * 0.5);
            *next += slot;
            at
        };
        match job {
            Job::Backend(name) => {
                let Some(backend) = backends.get(&name) else {
                    continue;
                };
                let mut handles = registry.on_backend(&name);
                if handles.is_empty() {
                    // Nothing to move: no "moving 0 clients" line or event.
                    continue;
                }
                fastrand::shuffle(&mut handles);
                tracing::info!(backend = %name, clients = handles.len(), rate, "moving clients off backend");
                journal.record(
                    "eviction",
                    &name,
                    format!("moving {} clients at {rate}/s", handles.len()),
                );
                let (started, total) = (Instant::now(), handles.len());
                let mut moved = 0usize;
                for h in handles {
                    // Recovered or undrained meanwhile: the rest may stay.
                    if backend.is_usable() {
                        tracing::info!(backend = %name, "backend usable again; eviction stopped");
                        break;
                    }
                    if !evict_at(pace(&mut next), &h, &backend, &reason, &shutdown).await {
                        return;
                    }
                    moved += 1;
                }
                let took = started.elapsed().as_secs_f64();
                let detail = if moved == total {
                    format!("moved {moved} clients in {took:.1} s")
                } else {
                    format!("moved {moved} of {total} clients in {took:.1} s, then stopped: the backend is usable again")
                };
                tracing::info!(backend = %name, moved, took_s = took, "{detail}");
                journal.record("eviction", &name, detail);
            }
            Job::All => loop {
                // Connections that finish their handshake meanwhile are
                // picked up by the next pass.
                let mut all = registry.not_evicted();
                if all.is_empty() {
                    break;
                }
                fastrand::shuffle(&mut all);
                tracing::info!(clients = all.len(), rate, "closing clients for shutdown");
                for (h, backend) in all {
                    if !evict_at(pace(&mut next), &h, &backend, &reason, &shutdown).await {
                        return;
                    }
                }
            },
        }
    }
}
