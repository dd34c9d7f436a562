//! Admission control: caps that shape a reconnect storm instead of passing
//! it to the brokers.
//!
//! * Per backend: new CONNECTs per second (a token bucket) and CONNECTs
//!   forwarded but not yet answered by a CONNACK.
//! * Per source IP: concurrent connections and CONNECTs per second.
//! * Globally: `max_connections`, the accept-side limit.
//!
//! A v5 client over a cap gets CONNACK 0x89 Server busy, or 0x9F Connection
//! rate exceeded for its IP's rate. A 3.x client, which has no such codes
//! and whose libraries often retry at once, is held for up to
//! `admission.hold` waiting for room, then gets return code 3 Server
//! unavailable. Clients are never sent to another backend than their
//! placement: that would split sessions.
//!
//! With the paced evictor: the evictor decides how fast clients *leave* a
//! failed backend (per balancer), the caps decide how fast they may
//! *arrive* at each receiving backend. A moved client that meets a full
//! bucket is held (3.x) or told to come back (v5), so the two never fight:
//! the slower of the two sets the pace, and no broker sees more than its cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqlb_config::AdmissionSettings;
use tokio::time::Instant;

use crate::select::Backend;

pub use crate::refusal::{Refusal, Refused};

/// A token bucket: `rate` tokens a second, at most `burst` banked.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            state: Mutex::new((f64::from(burst.max(1)), Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.0) / self.rate.max(1e-9)))
        }
    }

    /// True once the bucket is full again (idle long enough to forget).
    fn is_full(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 + s.1.elapsed().as_secs_f64() * self.rate >= self.burst
    }
}

#[derive(Debug)]
struct PerIp {
    open: u32,
    bucket: Option<Bucket>,
}

/// The caps in force and the per-IP and per-backend state behind them.
#[derive(Debug)]
pub struct Admission {
    settings: AdmissionSettings,
    per_ip: Mutex<HashMap<IpAddr, PerIp>>,
    per_backend: Mutex<HashMap<String, Arc<Bucket>>>,
}

/// A connection's claim on its IP's concurrency; released on drop. Owned
/// (not a borrow of the caps), so a connection's task can own everything
/// it keeps and nothing of how it was set up.
#[derive(Debug)]
pub struct IpSlot(Option<(Arc<Admission>, IpAddr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((admission, ip)) = &self.0 {
            let ip = *ip;
            let mut m = admission.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = m.get_mut(&ip) {
                e.open = e.open.saturating_sub(1);
            }
        }
    }
}

/// A CONNECT forwarded and not yet answered; counted on its backend until
/// the CONNACK arrives or the connection ends.
#[derive(Debug)]
pub struct Pending {
    backend: Arc<Backend>,
    done: AtomicBool,
}

impl Pending {
    /// The CONNACK arrived.
    pub fn answered(&self) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.backend
                .pending_connacks
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.answered();
    }
}

impl Admission {
    /// Caps from configuration.
    pub fn new(settings: AdmissionSettings) -> Self {
        Self {
            settings,
            per_ip: Mutex::new(HashMap::new()),
            per_backend: Mutex::new(HashMap::new()),
        }
    }

    /// Whether any per-IP cap is set (otherwise no per-IP state is kept).
    fn per_ip_capped(&self) -> bool {
        self.settings.per_ip_connections > 0 || self.settings.per_ip_connect_rate > 0
    }

    /// Admits one more connection from `ip`, or says which cap refuses it.
    pub fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, Refusal> {
        if !self.per_ip_capped() {
            return Ok(IpSlot(None));
        }
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let rate = self.settings.per_ip_connect_rate;
        let e = m.entry(ip).or_insert_with(|| PerIp {
            open: 0,
            bucket: (rate > 0).then(|| Bucket::new(rate, rate.max(1))),
        });
        let max = self.settings.per_ip_connections;
        if max > 0 && e.open >= max {
            return Err(Refusal::IpConnections);
        }
        if let Some(b) = &e.bucket {
            if b.take().is_err() {
                return Err(Refusal::IpRate);
            }
        }
        e.open += 1;
        Ok(IpSlot(Some((self.clone(), ip))))
    }

    /// Forgets source IPs with no connection whose rate bucket has refilled;
    /// keeps the per-IP map as small as the set of recently active IPs.
    pub fn sweep(&self) {
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, e| e.open > 0 || e.bucket.as_ref().is_some_and(|b| !b.is_full()));
    }

    /// Admits one more CONNECT to `backend`: a token of its rate and a slot
    /// of its pending-CONNACK cap. A v5 client is answered at once; a 3.x
    /// client waits up to the hold for room.
    pub async fn admit_backend(
        &self,
        backend: &Arc<Backend>,
        v5: bool,
    ) -> Result<Pending, Refusal> {
        let s = &self.settings;
        let bucket = (s.backend_connect_rate > 0).then(|| {
            self.per_backend
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(backend.name.clone())
                .or_insert_with(|| {
                    Arc::new(Bucket::new(s.backend_connect_rate, s.backend_connect_burst))
                })
                .clone()
        });
        let deadline = Instant::now() + if v5 { Duration::ZERO } else { s.hold };
        loop {
            let pending_ok = s.backend_pending_connacks == 0
                || backend.pending_connacks.load(Ordering::Relaxed)
                    < u64::from(s.backend_pending_connacks);
            let (refusal, wait) = if !pending_ok {
                (Refusal::BackendPending, Duration::from_millis(5))
            } else {
                match bucket.as_ref().map(|b| b.take()) {
                    None | Some(Ok(())) => {
                        backend.pending_connacks.fetch_add(1, Ordering::Relaxed);
                        return Ok(Pending {
                            backend: backend.clone(),
                            done: AtomicBool::new(false),
                        });
                    }
                    Some(Err(wait)) => (Refusal::BackendRate, wait),
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(refusal);
            }
            tokio::time::sleep_until((now + wait.max(Duration::from_millis(1))).min(deadline))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            backend_connect_rate: 100,
            backend_connect_burst: 5,
            backend_pending_connacks: 3,
            per_ip_connections: 2,
            per_ip_connect_rate: 0,
            hold: Duration::from_millis(200),
        }
    }

    fn backend() -> Arc<Backend> {
        Arc::new(Backend::new(&mqlb_config::Backend {
            name: "b1".into(),
            address: "127.0.0.1:1".into(),
            weight: 1,
            pool: mqlb_config::DEFAULT_POOL.into(),
            send_proxy: false,
            tls: None,
            websocket: None,
            cluster_admin: None,
        }))
    }

    #[tokio::test]
    async fn pending_cap_refuses_v5_at_once_and_frees_on_connack() {
        let a = Admission::new(settings());
        let b = backend();
        let p: Vec<Pending> = (0..3)
            .map(|_| futures_now(a.admit_backend(&b, true)).unwrap())
            .collect();
        assert_eq!(p.len(), 3);
        assert_eq!(
            futures_now(a.admit_backend(&b, true)).err(),
            Some(Refusal::BackendPending)
        );
        p[0].answered();
        assert!(futures_now(a.admit_backend(&b, true)).is_ok());
        drop(p);
        assert_eq!(b.pending_connacks.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_3x_client_is_held_for_a_token_then_refused() {
        let mut s = settings();
        s.backend_pending_connacks = 0;
        let a = Admission::new(s);
        let b = backend();
        for _ in 0..5 {
            drop(a.admit_backend(&b, true).await.unwrap());
        }
        // Bucket empty: v5 is refused at once, 3.x waits about one slot.
        assert_eq!(
            a.admit_backend(&b, true).await.err(),
            Some(Refusal::BackendRate)
        );
        let t = Instant::now();
        assert!(a.admit_backend(&b, false).await.is_ok());
        assert!(t.elapsed() >= Duration::from_millis(5));
        // With no rate at all for long enough, the hold runs out.
        let mut slow = settings();
        slow.backend_connect_rate = 1;
        slow.backend_connect_burst = 1;
        slow.backend_pending_connacks = 0;
        let a = Admission::new(slow);
        drop(a.admit_backend(&b, false).await.unwrap());
        let t = Instant::now();
        assert_eq!(
            a.admit_backend(&b, false).await.err(),
            Some(Refusal::BackendRate)
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn per_ip_connections_and_sweep() {
        let a = Arc::new(Admission::new(settings()));
        let ip: IpAddr = "10.1.2.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let s1 = a.admit_ip(ip).unwrap();
        let s2 = a.admit_ip(ip).unwrap();
        assert_eq!(a.admit_ip(ip).err(), Some(Refusal::IpConnections));
        drop(s1);
        assert!(a.admit_ip(ip).is_ok());
        drop(s2);
        a.sweep();
        assert_eq!(a.per_ip.lock().map(|m| m.len()).unwrap_or(0), 0);
        assert_eq!(
            Refusal::IpRate.connack(true),
            [0x20, 0x03, 0x00, 0x9F, 0x00]
        );
        assert_eq!(
            Refusal::BackendRate.connack(false),
            [0x20, 0x02, 0x00, 0x03]
        );
    }

    /// Polls a future that must complete without waiting.
    fn futures_now<F: std::future::Future>(f: F) -> F::Output {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("future was not ready"),
        }
    }
}
