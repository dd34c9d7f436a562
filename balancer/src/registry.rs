//! Live client connections, so they can be found and moved.
//!
//! Every forwarded connection registers here (client ID, backend, eviction
//! handle) and unregisters when its guard drops. The map is sharded so
//! connects on different shards never contend; the lock is held only to
//! insert, remove, or copy out handles, never across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::select::Backend;

const SHARDS: usize = 16;

/// Why a connection is being closed by the balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// v5 clients get DISCONNECT 0x8B Server shutting down.
    ShuttingDown,
    /// v5 clients get DISCONNECT 0x9C Use another server with this reference.
    UseAnotherServer(String),
}

/// A direction of a splice, each waiting for eviction on its own waker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

/// One connection's eviction switch, shared by the registry and the splice,
/// and where the splice counts the bytes it relays (to its backend's
/// totals).
///
/// Polled, not awaited: an idle splice holds no waiter future for it (a
/// `CancellationToken` cost each connection a 112-byte node and a
/// waiter in each direction's state), only a waker per direction. The
/// backend is reached through here rather than passed to the splice: each
/// argument of the splice's futures is stored in every idle connection's
/// state, twice (rust-lang/rust#62958).
#[derive(Debug)]
pub struct EvictHandle {
    /// Set once: the request and its reason.
    reason: OnceLock<Eviction>,
    up: AtomicWaker,
    down: AtomicWaker,
    /// The backend the connection is forwarded to.
    backend: Arc<Backend>,
    /// One direction has reached its end of stream.
    one_ended: AtomicBool,
}

impl EvictHandle {
    /// A switch for a connection forwarded to `backend`.
    pub fn new(backend: Arc<Backend>) -> Self {
        EvictHandle {
            reason: OnceLock::new(),
            up: AtomicWaker::new(),
            down: AtomicWaker::new(),
            backend,
            one_ended: AtomicBool::new(false),
        }
    }

    /// Called by a direction at its end of stream: `true` for the first.
    /// The first passes the end on (shuts its destination's writing side
    /// down); the second need not, as the connection closes right after,
    /// which sends the same FIN: a system call less per connection.
    pub fn first_to_end(&self) -> bool {
        !self.one_ended.swap(true, Ordering::Relaxed)
    }

    /// Counts `n` bytes relayed in direction `side` (up: to the backend).
    pub fn relayed(&self, side: Side, n: usize) {
        let counter = match side {
            Side::Up => &self.backend.bytes.to_backend,
            Side::Down => &self.backend.bytes.to_client,
        };
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Asks the connection to close; the first reason wins.
    pub fn evict(&self, reason: Eviction) {
        let _ = self.reason.set(reason);
        self.up.wake();
        self.down.wake();
    }

    /// Ready once eviction is requested; otherwise `side`'s task is woken
    /// when it is.
    pub fn poll_requested(&self, side: Side, cx: &mut Context<'_>) -> Poll<()> {
        if self.reason.get().is_some() {
            return Poll::Ready(());
        }
        match side {
            Side::Up => self.up.register(cx.waker()),
            Side::Down => self.down.register(cx.waker()),
        }
        // Asked between the check and the registration: seen now.
        if self.reason.get().is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The requested reason, if any.
    pub fn reason(&self) -> Option<&Eviction> {
        self.reason.get()
    }
}

/// A registered connection.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Client ID from the CONNECT.
    pub client_id: Arc<str>,
    /// Where it is forwarded.
    pub backend: Arc<Backend>,
    /// Its eviction switch.
    pub handle: Arc<EvictHandle>,
    /// The routing rule that chose its pool (`None`: the default pool).
    pub rule: Option<usize>,
    /// The client's address (from the PROXY header when one was sent).
    pub address: std::net::SocketAddr,
}

/// All live forwarded connections.
#[derive(Debug)]
pub struct Registry {
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
    next: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next: AtomicU64::new(0),
        }
    }
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registration<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Registration<'_> {
    /// What the registry holds for this connection: its client ID,
    /// address and backend, for a log line, without the task keeping
    /// copies of them for the connection's life.
    pub fn entry(&self) -> Option<Entry> {
        self.registry.shard(self.id).get(&self.id).cloned()
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.shard(self.id).remove(&self.id);
    }
}

impl Registry {
    #[expect(clippy::indexing_slicing, reason = "`% SHARDS` is always in range")]
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A poisoned shard only means a panic elsewhere; the map is still valid.
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection; keep the guard for the connection's lifetime.
    pub fn register(
        &self,
        client_id: &str,
        backend: Arc<Backend>,
        rule: Option<usize>,
        address: std::net::SocketAddr,
    ) -> (Registration<'_>, Arc<EvictHandle>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(EvictHandle::new(backend.clone()));
        self.shard(id).insert(
            id,
            Entry {
                client_id: Arc::from(client_id),
                backend,
                handle: handle.clone(),
                rule,
                address,
            },
        );
        (Registration { registry: self, id }, handle)
    }

    /// Eviction handles of every connection on `backend`.
    pub fn on_backend(&self, backend: &str) -> Vec<Arc<EvictHandle>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                map.values()
                    .filter(|e| e.backend.name == backend)
                    .map(|e| e.handle.clone()),
            );
        }
        out
    }

    /// Every connection not asked to close yet, with its backend.
    pub fn not_evicted(&self) -> Vec<(Arc<EvictHandle>, Arc<Backend>)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                map.values()
                    .filter(|e| e.handle.reason().is_none())
                    .map(|e| (e.handle.clone(), e.backend.clone())),
            );
        }
        out
    }

    /// Live forwarded connections.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True with no live forwarded connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections of `client_id` now (normally zero or one).
    pub fn find_client(&self, client_id: &str) -> Vec<Entry> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(map.values().filter(|e| &*e.client_id == client_id).cloned());
        }
        out
    }
}
