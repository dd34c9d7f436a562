//! The keys: values with versions, fencing tokens, expiry, limits, and the
//! clients watching each key.
//!
//! [`Store::execute`] takes a parsed request and its context (who asks,
//! the request's timestamp and fencing token, the store's clock) and
//! returns the reply plus the notifications to publish; it does no I/O.
//!
//! The rules, from the protocol reference and the SDK:
//! * a write carrying a request timestamp or fencing token more than
//!   [`MAX_SKEW_MS`] ahead of the store's clock is refused (skew);
//! * a key written with a fencing token is protected by it: a later write
//!   (`SET`, `DEL`, `VDEL`) must carry a token at least as new, else
//!   "a fencing token is required" or "... lower version ..."; a newer
//!   token takes over;
//! * `NX` applies only to an absent key, `NEX` also to a key that already
//!   holds the same value; a condition that does not hold answers `:-1`;
//! * `PX` expires the key that many milliseconds after the write, by the
//!   store's clock (expired keys read as absent, and their watchers hear a
//!   delete);
//! * limits on key count, key size, value size and total bytes answer
//!   "the quota has been exceeded" and change nothing.
//!
//! For replication, every change to a key (its value or its watchers)
//! gives it a new [`Rev`]: the view it was made in, then a count. A copy
//! ([`KeyCopy`], deletions included) is installed elsewhere only over an
//! older one, so copies may arrive in any order and more than once.
//! Deletion markers are kept for [`TOMBSTONE_MS`], so a stale copy cannot
//! bring a deleted key back.

use std::collections::{BTreeSet, HashMap};

use crate::hlc::Hlc;
use crate::resp3::{Condition, Reply, Request};

/// How far ahead of the store's clock a request's timestamp or fencing
/// token may be (the protocol allows a minute).
pub const MAX_SKEW_MS: u64 = 60_000;

/// Caps on what the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Keys, deleted ones still remembered ([`TOMBSTONE_MS`]) included.
    pub max_keys: usize,
    /// Bytes in one key.
    pub max_key_bytes: usize,
    /// Bytes in one value.
    pub max_value_bytes: usize,
    /// Bytes the store keeps in all: keys and values, and also deletion
    /// markers, revisions and watches (each counted with an estimate of its
    /// bookkeeping).
    pub max_total_bytes: usize,
    /// Keys one client may watch (KEYNOTIFY) at once.
    pub max_watches_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_total_bytes: 64 << 20,
            max_watches_per_client: 1000,
        }
    }
}

/// What the store counts for a key's revision (deletion markers are
/// only that), beside the key's bytes.
const REV_COST: usize = 48;
/// What it counts for one watch, beside the client ID's bytes.
const WATCH_COST: usize = 24;

/// How long a deleted key's revision is remembered (see the module docs).
pub const TOMBSTONE_MS: u64 = 3_600_000;

/// A key's revision: the view of the cluster it was changed in, then a
/// count. A single node stays in view 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rev {
    /// The view of the change.
    pub view: u64,
    /// Changes to the key so far.
    pub seq: u64,
}

/// A key's whole state, as replicated: what makes another store's copy
/// equal to this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCopy {
    /// The key.
    pub key: Vec<u8>,
    /// Its revision.
    pub rev: Rev,
    /// Its value; `None`: deleted.
    pub entry: Option<Entry>,
    /// The clients watching it.
    pub watchers: Vec<String>,
}

/// Who asks, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The requesting client (for `KEYNOTIFY`).
    pub client_id: String,
    /// The request's timestamp: the version a write gives the key.
    pub timestamp: Hlc,
    /// The fencing token the request carries, if any.
    pub fencing_token: Option<Hlc>,
    /// The store's clock, Unix milliseconds.
    pub now_ms: u64,
    /// The cluster's view (0 on a single node): the revision of a change.
    pub view: u64,
}

/// A change to publish to one watcher of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The watching client.
    pub client_id: String,
    /// The key that changed.
    pub key: Vec<u8>,
    /// Its new value; `None`: deleted (or expired).
    pub value: Option<Vec<u8>>,
    /// The version of the change.
    pub version: Hlc,
}

/// A value and what protects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// The write's timestamp.
    pub version: Hlc,
    /// The fencing token a write must match or pass.
    pub fence: Option<Hlc>,
    /// When it expires, Unix milliseconds of the clock that wrote it.
    pub expires_ms: Option<u64>,
}

/// The key-value state.
#[derive(Debug, Default)]
pub struct Store {
    limits: Limits,
    entries: HashMap<Vec<u8>, Entry>,
    /// Bytes in keys and values.
    bytes: usize,
    /// Bytes of the rest the store keeps: revisions (deletion markers
    /// included) and watches.
    overhead: usize,
    watchers: HashMap<Vec<u8>, BTreeSet<String>>,
    /// Watches per client, for [`Limits::max_watches_per_client`].
    watches: HashMap<String, usize>,
    /// Every key changed lately: its revision, and when (Unix ms) it last
    /// changed (deleted keys are forgotten after [`TOMBSTONE_MS`]).
    revs: HashMap<Vec<u8>, (Rev, u64)>,
}

/// The protocol's error texts (what follows `-ERR `).
pub mod errors {
    /// Request timestamp too far ahead.
    pub const TIMESTAMP_SKEW: &str = "the request timestamp is too far in the future; ensure that the client and broker system clocks are synchronized";
    /// Fencing token too far ahead.
    pub const FENCING_TOKEN_SKEW: &str = "the request fencing token timestamp is too far in the future; ensure that the client and broker system clocks are synchronized";
    /// The key is fenced and the request carries no token.
    pub const MISSING_FENCING_TOKEN: &str = "a fencing token is required for this request";
    /// The request's token is older than the key's.
    pub const FENCING_TOKEN_LOWER_VERSION: &str =
        "the request fencing token is a lower version than the fencing token protecting the resource";
    /// A limit would be passed.
    pub const QUOTA_EXCEEDED: &str = "the quota has been exceeded";
    /// An empty key.
    pub const KEY_LENGTH_ZERO: &str = "the key length is zero";
}

impl Store {
    /// An empty store with these limits.
    pub fn new(limits: Limits) -> Store {
        Store {
            limits,
            ..Store::default()
        }
    }

    /// Keys held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the store keeps: keys and values, revisions (deletion markers
    /// included) and watches.
    pub fn bytes(&self) -> usize {
        self.bytes + self.overhead
    }

    /// Adds `client`'s watch of `key`; false if it was there.
    fn watch(&mut self, key: &[u8], client: &str) -> bool {
        let set = match self.watchers.get_mut(key) {
            Some(s) => s,
            None => {
                self.overhead += key.len();
                self.watchers.entry(key.to_vec()).or_default()
            }
        };
        if !set.insert(client.to_string()) {
            return false;
        }
        self.overhead += client.len() + WATCH_COST;
        *self.watches.entry(client.to_string()).or_default() += 1;
        true
    }

    /// Removes `client`'s watch of `key`; false if there was none.
    fn unwatch(&mut self, key: &[u8], client: &str) -> bool {
        let Some(set) = self.watchers.get_mut(key) else {
            return false;
        };
        if !set.remove(client) {
            return false;
        }
        self.overhead -= client.len() + WATCH_COST;
        if set.is_empty() {
            self.watchers.remove(key);
            self.overhead -= key.len();
        }
        if let Some(n) = self.watches.get_mut(client) {
            *n -= 1;
            if *n == 0 {
                self.watches.remove(client);
            }
        }
        true
    }

    /// Replaces `key`'s watchers (a copy from another node).
    fn set_watchers(&mut self, key: &[u8], clients: Vec<String>) {
        let old: Vec<String> = self
            .watchers
            .get(key)
            .map(|w| w.iter().cloned().collect())
            .unwrap_or_default();
        for c in old {
            self.unwatch(key, &c);
        }
        for c in clients {
            self.watch(key, &c);
        }
    }

    /// The key's current version, if it exists at `now_ms`.
    pub fn version(&self, key: &[u8], now_ms: u64) -> Option<&Hlc> {
        self.live(key, now_ms).map(|e| &e.version)
    }

    fn live(&self, key: &[u8], now_ms: u64) -> Option<&Entry> {
        self.entries
            .get(key)
            .filter(|e| e.expires_ms.is_none_or(|t| t > now_ms))
    }

    /// Executes one request.
    pub fn execute(&mut self, req: Request, ctx: &Context) -> (Reply, Vec<Notification>) {
        let mut notes = Vec::new();
        if ctx.timestamp.wall_ms > ctx.now_ms.saturating_add(MAX_SKEW_MS) {
            return (Reply::Error(errors::TIMESTAMP_SKEW), notes);
        }
        if ctx
            .fencing_token
            .as_ref()
            .is_some_and(|f| f.wall_ms > ctx.now_ms.saturating_add(MAX_SKEW_MS))
        {
            return (Reply::Error(errors::FENCING_TOKEN_SKEW), notes);
        }
        let key = match &req {
            Request::Set { key, .. }
            | Request::Get { key }
            | Request::Del { key }
            | Request::VDel { key, .. }
            | Request::KeyNotify { key, .. } => key.clone(),
        };
        if key.is_empty() {
            return (Reply::Error(errors::KEY_LENGTH_ZERO), notes);
        }
        // An expired key is gone before anything looks at it.
        self.expire_key(&key, ctx.now_ms, &mut notes);
        let reply = match req {
            Request::Get { .. } => match self.live(&key, ctx.now_ms) {
                Some(e) => Reply::Value(e.value.clone()),
                None => Reply::Nil,
            },
            Request::KeyNotify { stop, .. } => {
                let changed = if stop {
                    self.unwatch(&key, &ctx.client_id)
                } else {
                    let already = self
                        .watchers
                        .get(&key)
                        .is_some_and(|w| w.contains(&ctx.client_id));
                    // A watch costs memory like a key: the same limits.
                    let cost = key.len() + ctx.client_id.len() + WATCH_COST + REV_COST;
                    if !already
                        && (key.len() > self.limits.max_key_bytes
                            || self.watches.get(&ctx.client_id).copied().unwrap_or(0)
                                >= self.limits.max_watches_per_client
                            || (!self.revs.contains_key(&key)
                                && self.revs.len() >= self.limits.max_keys)
                            || self.bytes() + cost > self.limits.max_total_bytes)
                    {
                        return (Reply::Error(errors::QUOTA_EXCEEDED), notes);
                    }
                    self.watch(&key, &ctx.client_id)
                };
                if changed {
                    self.touch(&key, ctx);
                }
                Reply::Ok
            }
            Request::Set {
                value,
                condition,
                expire_ms,
                ..
            } => self.set(key, value, condition, expire_ms, ctx, &mut notes),
            Request::Del { .. } => self.delete(&key, None, ctx, &mut notes),
            Request::VDel { value, .. } => self.delete(&key, Some(&value), ctx, &mut notes),
        };
        (reply, notes)
    }

    /// Whether a write may touch `key`: its fencing token, if it has one,
    /// must not be newer than the request's.
    fn fenced(&self, key: &[u8], ctx: &Context) -> Option<Reply> {
        let fence = self.entries.get(key)?.fence.as_ref()?;
        match &ctx.fencing_token {
            None => Some(Reply::Error(errors::MISSING_FENCING_TOKEN)),
            Some(t) if t < fence => Some(Reply::Error(errors::FENCING_TOKEN_LOWER_VERSION)),
            Some(_) => None,
        }
    }

    fn set(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        condition: Condition,
        expire_ms: Option<u64>,
        ctx: &Context,
        notes: &mut Vec<Notification>,
    ) -> Reply {
        if let Some(refused) = self.fenced(&key, ctx) {
            return refused;
        }
        let existing = self.entries.get(&key);
        let applies = match condition {
            Condition::Always => true,
            Condition::IfAbsent => existing.is_none(),
            Condition::IfAbsentOrEqual => existing.is_none_or(|e| e.value == value),
        };
        if !applies {
            return Reply::NotApplied;
        }
        let old = existing.map_or(0, |e| key.len() + e.value.len());
        // A key never seen also gets a revision.
        let new = key.len()
            + value.len()
            + if self.revs.contains_key(&key) {
                0
            } else {
                key.len() + REV_COST
            };
        if key.len() > self.limits.max_key_bytes
            || value.len() > self.limits.max_value_bytes
            || (!self.revs.contains_key(&key) && self.revs.len() >= self.limits.max_keys)
            || self.bytes() - old + new > self.limits.max_total_bytes
        {
            return Reply::Error(errors::QUOTA_EXCEEDED);
        }
        let fence = match (&ctx.fencing_token, existing.and_then(|e| e.fence.clone())) {
            (Some(t), _) => Some(t.clone()),
            (None, f) => f,
        };
        self.bytes = self.bytes - old + key.len() + value.len();
        self.notify(&key, Some(&value), &ctx.timestamp, notes);
        self.touch(&key, ctx);
        self.entries.insert(
            key,
            Entry {
                value,
                version: ctx.timestamp.clone(),
                fence,
                expires_ms: expire_ms.map(|ms| ctx.now_ms.saturating_add(ms)),
            },
        );
        Reply::Ok
    }

    fn delete(
        &mut self,
        key: &[u8],
        only_if: Option<&[u8]>,
        ctx: &Context,
        notes: &mut Vec<Notification>,
    ) -> Reply {
        let Some(e) = self.entries.get(key) else {
            return Reply::Deleted(0);
        };
        if let Some(refused) = self.fenced(key, ctx) {
            return refused;
        }
        if only_if.is_some_and(|v| v != e.value.as_slice()) {
            return Reply::NotApplied;
        }
        self.remove(key, &ctx.timestamp, notes);
        self.touch(key, ctx);
        Reply::Deleted(1)
    }

    /// A change to `key` in `ctx.view`: its next revision.
    fn touch(&mut self, key: &[u8], ctx: &Context) {
        if !self.revs.contains_key(key) {
            self.overhead += key.len() + REV_COST;
        }
        let (rev, at) = self.revs.entry(key.to_vec()).or_default();
        *rev = Rev {
            view: rev.view.max(ctx.view),
            seq: rev.seq + 1,
        };
        *at = ctx.now_ms;
    }

    /// The key's revision (deleted keys' included, for a while); `None`
    /// if it never changed here.
    pub fn rev(&self, key: &[u8]) -> Option<Rev> {
        self.revs.get(key).map(|(r, _)| *r)
    }

    /// The key's whole state, for another store; `None` if it never changed
    /// here.
    pub fn export(&self, key: &[u8]) -> Option<KeyCopy> {
        let rev = self.rev(key)?;
        Some(KeyCopy {
            key: key.to_vec(),
            rev,
            entry: self.entries.get(key).cloned(),
            watchers: self
                .watchers
                .get(key)
                .map(|w| w.iter().cloned().collect())
                .unwrap_or_default(),
        })
    }

    /// Every key with a revision (deleted ones included), for copying the
    /// store elsewhere.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.revs.keys().cloned().collect()
    }

    /// Makes this store's copy of a key equal to `copy` if `copy` is newer;
    /// returns whether it was. A copy is installed whatever the limits say:
    /// the store that made the change checked them.
    pub fn install(&mut self, copy: KeyCopy, now_ms: u64) -> bool {
        if self.rev(&copy.key).is_some_and(|r| r >= copy.rev) {
            return false;
        }
        let key = copy.key;
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= key.len() + old.value.len();
        }
        if let Some(e) = copy.entry {
            self.bytes += key.len() + e.value.len();
            self.entries.insert(key.clone(), e);
        }
        self.set_watchers(&key, copy.watchers);
        if !self.revs.contains_key(&key) {
            self.overhead += key.len() + REV_COST;
        }
        self.revs.insert(key, (copy.rev, now_ms));
        true
    }

    /// Forgets the revisions of keys deleted more than [`TOMBSTONE_MS`] ago.
    pub fn prune(&mut self, now_ms: u64) {
        let (entries, watchers) = (&self.entries, &self.watchers);
        let mut freed = 0;
        self.revs.retain(|k, (_, at)| {
            let keep = entries.contains_key(k)
                || watchers.contains_key(k)
                || now_ms.saturating_sub(*at) < TOMBSTONE_MS;
            if !keep {
                freed += k.len() + REV_COST;
            }
            keep
        });
        self.overhead -= freed;
    }

    fn remove(&mut self, key: &[u8], version: &Hlc, notes: &mut Vec<Notification>) {
        if let Some(e) = self.entries.remove(key) {
            self.bytes -= key.len() + e.value.len();
            self.notify(key, None, version, notes);
        }
    }

    fn expire_key(&mut self, key: &[u8], now_ms: u64, notes: &mut Vec<Notification>) {
        let expired = self
            .entries
            .get(key)
            .and_then(|e| e.expires_ms)
            .is_some_and(|t| t <= now_ms);
        if expired {
            let version = Hlc {
                wall_ms: now_ms,
                counter: 0,
                node: String::new(),
            };
            self.remove(key, &version, notes);
        }
    }

    /// Removes every key expired at `now_ms`; returns the notifications
    /// for the keys `owned` says this store answers for (a copy kept for
    /// another node expires silently: that node tells the watchers).
    pub fn expire(&mut self, now_ms: u64, owned: impl Fn(&[u8]) -> bool) -> Vec<Notification> {
        let due: Vec<Vec<u8>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expires_ms.is_some_and(|t| t <= now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        let mut notes = Vec::new();
        for k in due {
            let mut mine = Vec::new();
            self.expire_key(&k, now_ms, &mut mine);
            if owned(&k) {
                notes.extend(mine);
            }
        }
        self.prune(now_ms);
        notes
    }

    /// Forgets a client's watches (its session ended) on the keys `owned`
    /// selects; the copies of the keys that changed (a new revision in
    /// `view`), for their chains.
    pub fn forget_client(
        &mut self,
        client_id: &str,
        view: u64,
        now_ms: u64,
        owned: impl Fn(&[u8]) -> bool,
    ) -> Vec<KeyCopy> {
        let mut changed: Vec<Vec<u8>> = self
            .watchers
            .iter()
            .filter(|(k, w)| owned(k) && w.contains(client_id))
            .map(|(k, _)| k.clone())
            .collect();
        changed.retain(|k| self.unwatch(k, client_id));
        let ctx = Context {
            client_id: client_id.to_string(),
            timestamp: Hlc {
                wall_ms: now_ms,
                counter: 0,
                node: String::new(),
            },
            fencing_token: None,
            now_ms,
            view,
        };
        changed
            .into_iter()
            .filter_map(|k| {
                self.touch(&k, &ctx);
                self.export(&k)
            })
            .collect()
    }

    fn notify(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        version: &Hlc,
        notes: &mut Vec<Notification>,
    ) {
        for c in self.watchers.get(key).into_iter().flatten() {
            notes.push(Notification {
                client_id: c.clone(),
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
                version: version.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hlc(ms: u64, c: u64) -> Hlc {
        Hlc {
            wall_ms: ms,
            counter: c,
            node: "t".into(),
        }
    }

    fn ctx(client: &str, ms: u64, fence: Option<Hlc>) -> Context {
        Context {
            client_id: client.into(),
            timestamp: hlc(ms, 0),
            fencing_token: fence,
            now_ms: ms,
            view: 0,
        }
    }

    fn set(k: &str, v: &str, condition: Condition, expire_ms: Option<u64>) -> Request {
        Request::Set {
            key: k.into(),
            value: v.into(),
            condition,
            expire_ms,
        }
    }

    fn get(k: &str) -> Request {
        Request::Get { key: k.into() }
    }

    #[test]
    fn set_get_del_vdel() {
        let mut s = Store::default();
        let c = ctx("a", 1000, None);
        assert_eq!(s.execute(get("k"), &c).0, Reply::Nil);
        assert_eq!(
            s.execute(set("k", "v1", Condition::Always, None), &c).0,
            Reply::Ok
        );
        assert_eq!(s.execute(get("k"), &c).0, Reply::Value(b"v1".to_vec()));
        assert_eq!(s.version(b"k", 1000), Some(&hlc(1000, 0)));
        let vdel = |v: &str| Request::VDel {
            key: b"k".to_vec(),
            value: v.into(),
        };
        assert_eq!(s.execute(vdel("other"), &c).0, Reply::NotApplied);
        assert_eq!(s.execute(vdel("v1"), &c).0, Reply::Deleted(1));
        assert_eq!(s.execute(vdel("v1"), &c).0, Reply::Deleted(0));
        s.execute(set("k", "v", Condition::Always, None), &c);
        let del = Request::Del { key: b"k".to_vec() };
        assert_eq!(s.execute(del.clone(), &c).0, Reply::Deleted(1));
        assert_eq!(s.execute(del, &c).0, Reply::Deleted(0));
        // Deleted: only the key's marker is left (counted).
        assert_eq!((s.len(), s.bytes()), (0, 1 + REV_COST));
        assert_eq!(
            s.execute(get(""), &c).0,
            Reply::Error(errors::KEY_LENGTH_ZERO)
        );
    }

    #[test]
    fn nx_and_nex() {
        let mut s = Store::default();
        let c = ctx("a", 1000, None);
        assert_eq!(
            s.execute(set("k", "v", Condition::IfAbsent, None), &c).0,
            Reply::Ok
        );
        assert_eq!(
            s.execute(set("k", "v", Condition::IfAbsent, None), &c).0,
            Reply::NotApplied
        );
        assert_eq!(
            s.execute(set("k", "v", Condition::IfAbsentOrEqual, None), &c)
                .0,
            Reply::Ok
        );
        assert_eq!(
            s.execute(set("k", "w", Condition::IfAbsentOrEqual, None), &c)
                .0,
            Reply::NotApplied
        );
        assert_eq!(s.execute(get("k"), &c).0, Reply::Value(b"v".to_vec()));
        assert_eq!(
            s.execute(set("n", "x", Condition::IfAbsentOrEqual, None), &c)
                .0,
            Reply::Ok
        );
    }

    #[test]
    fn px_expires_by_the_stores_clock_and_watchers_hear_it() {
        let mut s = Store::default();
        let watch = Request::KeyNotify {
            key: b"k".to_vec(),
            stop: false,
        };
        assert_eq!(s.execute(watch, &ctx("w", 1000, None)).0, Reply::Ok);
        let (r, notes) = s.execute(
            set("k", "v", Condition::Always, Some(500)),
            &ctx("a", 1000, None),
        );
        assert_eq!(r, Reply::Ok);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].value.as_deref(), Some(&b"v"[..]));
        assert_eq!(
            s.execute(get("k"), &ctx("a", 1499, None)).0,
            Reply::Value(b"v".to_vec())
        );
        let gone = s.expire(1500, |_| true);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].client_id.as_str(), gone[0].value.clone()),
            ("w", None)
        );
        assert_eq!(s.execute(get("k"), &ctx("a", 1500, None)).0, Reply::Nil);
        // NX sees an expired key as absent.
        s.execute(
            set("e", "1", Condition::Always, Some(10)),
            &ctx("a", 2000, None),
        );
        assert_eq!(
            s.execute(
                set("e", "2", Condition::IfAbsent, None),
                &ctx("a", 2010, None)
            )
            .0,
            Reply::Ok
        );
    }

    #[test]
    fn fencing_tokens_protect_a_key() {
        let mut s = Store::default();
        let t1 = hlc(1000, 1);
        let t2 = hlc(2000, 1);
        // The first lease holder writes with t1.
        assert_eq!(
            s.execute(
                set("lock-data", "a", Condition::Always, None),
                &ctx("a", 1000, Some(t1.clone()))
            )
            .0,
            Reply::Ok
        );
        // A newer holder (t2) takes over.
        assert_eq!(
            s.execute(
                set("lock-data", "b", Condition::Always, None),
                &ctx("b", 2000, Some(t2.clone()))
            )
            .0,
            Reply::Ok
        );
        // The old holder's fenced write is refused, and so is one without a token.
        assert_eq!(
            s.execute(
                set("lock-data", "a2", Condition::Always, None),
                &ctx("a", 2100, Some(t1))
            )
            .0,
            Reply::Error(errors::FENCING_TOKEN_LOWER_VERSION)
        );
        assert_eq!(
            s.execute(
                set("lock-data", "x", Condition::Always, None),
                &ctx("c", 2100, None)
            )
            .0,
            Reply::Error(errors::MISSING_FENCING_TOKEN)
        );
        assert_eq!(
            s.execute(
                Request::Del {
                    key: b"lock-data".to_vec()
                },
                &ctx("c", 2100, None)
            )
            .0,
            Reply::Error(errors::MISSING_FENCING_TOKEN)
        );
        assert_eq!(
            s.execute(get("lock-data"), &ctx("c", 2100, None)).0,
            Reply::Value(b"b".to_vec())
        );
        assert_eq!(
            s.execute(
                Request::Del {
                    key: b"lock-data".to_vec()
                },
                &ctx("b", 2200, Some(t2))
            )
            .0,
            Reply::Deleted(1)
        );
    }

    #[test]
    fn skew_and_limits() {
        // Two keys of 2 bytes with 8-byte values, and their revisions,
        // come to 2 × (10 + 2 + REV_COST) = 120 bytes: one short.
        let mut s = Store::new(Limits {
            max_keys: 2,
            max_key_bytes: 4,
            max_value_bytes: 8,
            max_total_bytes: 2 * (12 + REV_COST) - 1,
            max_watches_per_client: 1,
        });
        let mut c = ctx("a", 1000, None);
        c.timestamp = hlc(1000 + MAX_SKEW_MS + 1, 0);
        assert_eq!(
            s.execute(set("k", "v", Condition::Always, None), &c).0,
            Reply::Error(errors::TIMESTAMP_SKEW)
        );
        let mut c = ctx("a", 1000, Some(hlc(1000 + MAX_SKEW_MS + 1, 0)));
        assert_eq!(
            s.execute(set("k", "v", Condition::Always, None), &c).0,
            Reply::Error(errors::FENCING_TOKEN_SKEW)
        );
        c.fencing_token = None;
        let q = Reply::Error(errors::QUOTA_EXCEEDED);
        assert_eq!(
            s.execute(set("long-key", "v", Condition::Always, None), &c)
                .0,
            q
        );
        assert_eq!(
            s.execute(set("k", "123456789", Condition::Always, None), &c)
                .0,
            q
        );
        assert_eq!(
            s.execute(set("k1", "12345678", Condition::Always, None), &c)
                .0,
            Reply::Ok
        );
        assert_eq!(
            s.execute(set("k2", "12345678", Condition::Always, None), &c)
                .0,
            q,
            "total bytes"
        );
        assert_eq!(
            s.execute(set("k2", "1", Condition::Always, None), &c).0,
            Reply::Ok
        );
        assert_eq!(
            s.execute(set("k3", "1", Condition::Always, None), &c).0,
            q,
            "key count"
        );
        // Overwriting within the limits is fine, and nothing leaked: the
        // values and keys, and the two revisions.
        assert_eq!(
            s.execute(set("k1", "1", Condition::Always, None), &c).0,
            Reply::Ok
        );
        assert_eq!(s.bytes(), 6 + 2 * (2 + REV_COST));
    }

    /// KEYNOTIFY obeys the key limits and a per-client watch limit, every
    /// watch and deletion marker is counted in the store's bytes, and a
    /// client's watches go (with their bytes) when it is forgotten.
    #[test]
    fn watches_and_deletion_markers_are_bounded_and_counted() {
        let mut s = Store::new(Limits {
            max_keys: 100,
            max_key_bytes: 16,
            max_value_bytes: 64,
            max_total_bytes: 10_000,
            max_watches_per_client: 2,
        });
        let c = ctx("w", 1000, None);
        let watch = |k: &str| Request::KeyNotify {
            key: k.as_bytes().to_vec(),
            stop: false,
        };
        let q = Reply::Error(errors::QUOTA_EXCEEDED);
        // A key over max_key_bytes cannot be watched (it used to be: 300
        // watches of a 500 KiB key took 300 MB).
        assert_eq!(s.execute(watch(&"x".repeat(500)), &c).0, q);
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.execute(watch("a"), &c).0, Reply::Ok);
        assert_eq!(s.execute(watch("b"), &c).0, Reply::Ok);
        assert_eq!(s.execute(watch("c"), &c).0, q, "per-client watches");
        assert_eq!(s.execute(watch("a"), &c).0, Reply::Ok, "again: no change");
        let watched = s.bytes();
        assert!(watched >= 2 * (1 + 1 + WATCH_COST + REV_COST), "{watched}");
        // Another client's watch counts too.
        assert_eq!(s.execute(watch("c"), &ctx("v", 1000, None)).0, Reply::Ok);
        assert!(s.bytes() > watched);
        // Forgotten: the watches' bytes go (their revisions stay a while).
        s.forget_client("w", 0, 1000, |_| true);
        s.forget_client("v", 0, 1000, |_| true);
        assert_eq!(s.bytes(), 3 * (1 + REV_COST));
        // Churn: keys set and deleted leave markers that count, until they
        // are pruned.
        for i in 0..20 {
            let k = format!("churn-{i}");
            s.execute(set(&k, "v", Condition::Always, None), &c);
            s.execute(
                Request::Del {
                    key: k.into_bytes(),
                },
                &c,
            );
        }
        assert_eq!(s.len(), 0);
        assert!(
            s.bytes() > 20 * REV_COST,
            "{} bytes for 20 markers",
            s.bytes()
        );
        s.prune(1000 + TOMBSTONE_MS + 1);
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn keynotify_start_stop_and_forget() {
        let mut s = Store::default();
        let c = ctx("w", 1000, None);
        let watch = |stop| Request::KeyNotify {
            key: b"k".to_vec(),
            stop,
        };
        s.execute(watch(false), &c);
        s.execute(watch(false), &ctx("v", 1000, None));
        let (_, n) = s.execute(set("k", "1", Condition::Always, None), &c);
        assert_eq!(n.len(), 2);
        s.execute(watch(true), &c);
        let (_, n) = s.execute(Request::Del { key: b"k".to_vec() }, &c);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].client_id, "v");
        let copies = s.forget_client("v", 0, 1000, |_| true);
        assert_eq!(copies.len(), 1);
        assert!(copies[0].watchers.is_empty());
        let (_, n) = s.execute(set("k", "2", Condition::Always, None), &c);
        assert!(n.is_empty());
    }

    #[test]
    fn copies_install_only_over_older_revisions_and_deletions_stick() {
        let mut owner = Store::default();
        let mut replica = Store::default();
        let mut c = ctx("a", 1000, None);
        c.view = 3;
        owner.execute(set("k", "v1", Condition::Always, None), &c);
        let v1 = owner.export(b"k").expect("copy");
        assert_eq!(v1.rev, Rev { view: 3, seq: 1 });
        owner.execute(set("k", "v2", Condition::Always, None), &c);
        let v2 = owner.export(b"k").expect("copy");
        assert!(replica.install(v2.clone(), 1000));
        // An older copy arriving late, or the same one twice, changes
        // nothing.
        assert!(!replica.install(v1.clone(), 1000));
        assert!(!replica.install(v2, 1000));
        assert_eq!(
            replica.execute(get("k"), &c).0,
            Reply::Value(b"v2".to_vec())
        );
        assert_eq!(replica.bytes(), 3 + 1 + REV_COST);
        // A deletion travels as a copy without a value and beats the stale
        // copy that follows it.
        owner.execute(Request::Del { key: b"k".to_vec() }, &c);
        let gone = owner.export(b"k").expect("tombstone");
        assert_eq!(gone.entry, None);
        assert!(replica.install(gone, 1000));
        assert!(!replica.install(v1, 1000));
        assert_eq!((replica.len(), replica.bytes()), (0, 1 + REV_COST));
        // A new owner in a later view wins over any count of changes made
        // in an earlier one.
        let mut later = ctx("a", 1000, None);
        later.view = 4;
        let mut new_owner = Store::default();
        new_owner.execute(set("k", "v3", Condition::Always, None), &later);
        let v3 = new_owner.export(b"k").expect("copy");
        assert!(v3.rev > owner.rev(b"k").expect("rev"));
        assert!(replica.install(v3, 1000));
        // Watchers travel with the key.
        new_owner.execute(
            Request::KeyNotify {
                key: b"k".to_vec(),
                stop: false,
            },
            &later,
        );
        assert!(replica.install(new_owner.export(b"k").expect("copy"), 1000));
        let (_, notes) = replica.execute(set("k", "v4", Condition::Always, None), &later);
        assert_eq!(notes.len(), 1);
        // Deletion markers go after a while, live keys stay.
        owner.prune(1000 + TOMBSTONE_MS);
        assert_eq!(owner.rev(b"k"), None);
        replica.prune(1000 + TOMBSTONE_MS);
        assert!(replica.rev(b"k").is_some());
    }

    #[test]
    fn a_copy_kept_for_another_node_expires_without_notifications() {
        let mut s = Store::default();
        let c = ctx("w", 1000, None);
        for k in ["mine", "theirs"] {
            s.execute(
                Request::KeyNotify {
                    key: k.into(),
                    stop: false,
                },
                &c,
            );
            s.execute(set(k, "v", Condition::Always, Some(10)), &c);
        }
        let notes = s.expire(2000, |k| k == b"mine");
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].key, b"mine");
        assert!(s.is_empty());
    }
}
