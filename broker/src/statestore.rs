//! The state store over MQTT: requests published to the state store's
//! invoke topic are executed by [`mqlb_statestore`]'s core and answered on
//! the request's response topic, with its correlation data and the user
//! properties the Azure IoT Operations RPC protocol reads (`__stat`,
//! `__ts`, `__protVer`, `__srcId`); key notifications go to each watching
//! client's notify topic.
//!
//! On a single node every key is here. In a cluster, [`StateStore::handle_in`]
//! executes only the keys this node owns and says which it does not; the
//! cluster (`cluster::store`) carries those to their owner and replicates
//! each change down the key's chain before the answer goes out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqlb_protocol::{MqttStr, Properties, Publish, QoS, ReasonCode};
use mqlb_statestore::hlc::Hlc;
use mqlb_statestore::resp3::{self, Reply, Request};
use mqlb_statestore::store::{Context, KeyCopy, Limits, Notification, Store};

use crate::message::Message;

/// Where requests are published.
pub const INVOKE_TOPIC: &str = "statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8/command/invoke";
/// Topics no response may be sent to (the store's own space).
const RESERVED: [&str; 2] = [
    "statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8",
    "clients/statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8",
];
/// Whether only the broker may publish to `topic`: the state store's own
/// space (its notifications above all: a client that could publish one
/// could tell another client a key changed when it did not), its request
/// topic aside.
pub fn broker_only(topic: &str) -> bool {
    topic != INVOKE_TOPIC
        && RESERVED.iter().any(|r| {
            topic
                .strip_prefix(r)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

/// Largest request payload executed (a larger one is answered with the
/// quota error; the broker takes packets up to 1 MiB).
pub const MAX_REQUEST: usize = 512 << 10;

/// What a request asks of the connection that carried it.
#[derive(Debug)]
pub enum Outcome {
    /// Route these (the response first, then notifications) and
    /// acknowledge the request as usual.
    Route(Vec<Message>),
    /// No response is possible (no usable response topic): acknowledge
    /// with this reason code (v5), so the client learns it.
    Refuse(ReasonCode),
}

/// What [`StateStore::handle_in`] did with a request.
#[derive(Debug)]
pub enum Handled {
    /// Answered here.
    Done {
        /// What to route, or the refusal.
        outcome: Outcome,
        /// The request's key, if it named one and was executed.
        key: Option<Vec<u8>>,
        /// The key's new state, if the request changed it: what the key's
        /// chain must hold before the answer goes out.
        copy: Option<Box<KeyCopy>>,
    },
    /// The key belongs to another node: nothing was executed.
    Elsewhere(Vec<u8>),
}

/// Request results, for metrics.
const RESULTS: [&str; 6] = [
    "ok",
    "not_applied",
    "error",
    "bad_request",
    "no_response_topic",
    "unavailable",
];
const COMMANDS: [&str; 6] = ["set", "get", "del", "vdel", "keynotify", "invalid"];

fn request_key(req: &Request) -> &[u8] {
    match req {
        Request::Set { key, .. }
        | Request::Get { key }
        | Request::Del { key }
        | Request::VDel { key, .. }
        | Request::KeyNotify { key, .. } => key,
    }
}

/// What executing one request gave.
struct Executed {
    command: usize,
    status: Result<(), (&'static str, &'static str)>,
    reply: Reply,
    version: Hlc,
    notes: Vec<Notification>,
    key: Option<Vec<u8>>,
    copy: Option<Box<KeyCopy>>,
}

/// The node's store and its counters.
#[derive(Debug)]
pub struct StateStore {
    store: Mutex<Store>,
    node: String,
    requests: [[AtomicU64; RESULTS.len()]; COMMANDS.len()],
    notifications: AtomicU64,
    counter: AtomicU64,
}

impl Default for StateStore {
    fn default() -> Self {
        StateStore::new("mqlb", Limits::default())
    }
}

/// The wall clock in Unix milliseconds, as the store reads it.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn user(props: &Properties, name: &str) -> Option<String> {
    props
        .user_properties
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v.to_string())
}

fn str_of(s: &str) -> MqttStr {
    MqttStr::try_from(s).unwrap_or_default()
}

impl StateStore {
    /// A store for node `node` (its name in `__srcId` and versions).
    pub fn new(node: &str, limits: Limits) -> StateStore {
        StateStore {
            store: Mutex::new(Store::new(limits)),
            node: node.to_string(),
            requests: Default::default(),
            notifications: AtomicU64::new(0),
            counter: AtomicU64::new(0),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, command: usize, result: &str) {
        let r = RESULTS.iter().position(|x| *x == result).unwrap_or(2);
        if let Some(n) = self.requests.get(command).and_then(|c| c.get(r)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// This node's clock now, as a version.
    fn now(&self) -> Hlc {
        self.now_at(now_ms())
    }

    /// The version for wall-clock time `wall_ms` on this node.
    fn now_at(&self, wall_ms: u64) -> Hlc {
        Hlc {
            wall_ms,
            counter: self.counter.fetch_add(1, Ordering::Relaxed) % 100_000,
            node: self.node.clone(),
        }
    }

    /// Handles one request from `client_id` on a single node.
    pub fn handle(&self, client_id: &str, p: &Publish) -> Outcome {
        match self.handle_in(client_id, p, 0, &|_| true) {
            Handled::Done { outcome, .. } => outcome,
            Handled::Elsewhere(_) => Outcome::Route(Vec::new()),
        }
    }

    /// Handles one request from `client_id` in view `view`, if `mine`
    /// says this node answers for its key (asked under the store's lock,
    /// so no copy of the store taken after a view change misses a change
    /// made for the view before).
    pub fn handle_in(
        &self,
        client_id: &str,
        p: &Publish,
        view: u64,
        mine: &dyn Fn(&[u8]) -> bool,
    ) -> Handled {
        self.handle_in_at(client_id, p, view, mine, now_ms())
    }

    /// [`StateStore::handle_in`] with this node's wall clock reading
    /// `now` (milliseconds since the epoch): the simulator gives each node
    /// its own clock.
    pub fn handle_in_at(
        &self,
        client_id: &str,
        p: &Publish,
        view: u64,
        mine: &dyn Fn(&[u8]) -> bool,
        now: u64,
    ) -> Handled {
        if let Some(code) = self.refusal(client_id, p) {
            return Handled::Done {
                outcome: Outcome::Refuse(code),
                key: None,
                copy: None,
            };
        }
        let Some(topic) = p.properties.response_topic.as_ref() else {
            return Handled::Done {
                outcome: Outcome::Refuse(ReasonCode(0x83)),
                key: None,
                copy: None,
            };
        };
        let x = match self.execute(client_id, p, now, view, mine) {
            Ok(x) => x,
            Err(key) => return Handled::Elsewhere(key),
        };
        let result = match (&x.status, &x.reply) {
            (Err(_), _) => "bad_request",
            (Ok(()), Reply::Error(_)) => "error",
            (Ok(()), Reply::NotApplied) => "not_applied",
            _ => "ok",
        };
        self.count(x.command, result);
        let mut out = vec![self.response(p, topic, x.status, &x.reply, &x.version)];
        out.extend(self.notifications(x.notes));
        Handled::Done {
            outcome: Outcome::Route(out),
            key: x.key,
            copy: x.copy,
        }
    }

    /// The key a request names, if it is a well-formed request with one
    /// (where a cluster sends it).
    pub fn key_of(p: &Publish) -> Option<Vec<u8>> {
        let req = resp3::parse_request(&p.payload).ok()?;
        Some(request_key(&req).to_vec()).filter(|k| !k.is_empty())
    }

    /// Why no response can be sent to this request, if so: it has no
    /// response topic, or one in the store's own space (acknowledged with
    /// this reason code, so a v5 client learns it).
    pub fn refusal(&self, client_id: &str, p: &Publish) -> Option<ReasonCode> {
        let Some(topic) = p.properties.response_topic.as_ref() else {
            self.count(COMMANDS.len() - 1, "no_response_topic");
            tracing::info!(client_id, "state store request without a response topic");
            return Some(ReasonCode(0x83));
        };
        if RESERVED.iter().any(|r| topic.as_str().starts_with(r)) {
            self.count(COMMANDS.len() - 1, "no_response_topic");
            tracing::info!(client_id, %topic, "state store response topic in the reserved space");
            return Some(ReasonCode(0x83));
        }
        None
    }

    /// The answer to a request the cluster could not bring to its key's
    /// owner: a RESP3 error, so the client hears at once rather than
    /// waiting for its timeout.
    pub fn unavailable(&self, p: &Publish, why: &'static str) -> Outcome {
        let Some(topic) = p.properties.response_topic.as_ref() else {
            return Outcome::Refuse(ReasonCode(0x83));
        };
        self.count(COMMANDS.len() - 1, "unavailable");
        Outcome::Route(vec![self.response(
            p,
            topic,
            Ok(()),
            &Reply::Error(why),
            &self.now(),
        )])
    }

    fn response(
        &self,
        p: &Publish,
        topic: &MqttStr,
        status: Result<(), (&'static str, &'static str)>,
        reply: &Reply,
        version: &Hlc,
    ) -> Message {
        let mut props = Properties {
            correlation_data: p.properties.correlation_data.clone(),
            content_type: Some(str_of("application/octet-stream")),
            ..Properties::default()
        };
        let mut up = vec![
            ("__protVer", "1.0".to_string()),
            ("__srcId", self.node.clone()),
            ("__ts", version.to_string()),
        ];
        let payload = match status {
            Ok(()) => {
                up.push(("__stat", "200".into()));
                reply.encode()
            }
            Err((message, property)) => {
                up.push(("__stat", "400".into()));
                up.push(("__stMsg", message.to_string()));
                up.push(("__propName", property.to_string()));
                Vec::new()
            }
        };
        props.user_properties = up
            .into_iter()
            .map(|(k, v)| (str_of(k), str_of(&v)))
            .collect();
        Message {
            topic: topic.clone(),
            payload: Bytes::from(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Arc::new(props),
            origin: None,
            received: Instant::now(),
        }
    }

    /// Executes the request, or says (`Err(key)`) that its key is not
    /// this node's.
    fn execute(
        &self,
        client_id: &str,
        p: &Publish,
        now: u64,
        view: u64,
        mine: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Executed, Vec<u8>> {
        let invalid = COMMANDS.len() - 1;
        let here = self.now_at(now);
        let done = |command, status, reply| Executed {
            command,
            status,
            reply,
            version: here.clone(),
            notes: Vec::new(),
            key: None,
            copy: None,
        };
        if p.qos != QoS::AtLeastOnce {
            return Ok(done(
                invalid,
                Err(("state store requests must be published at QoS 1", "QoS")),
                Reply::Ok,
            ));
        }
        if p.payload.len() > MAX_REQUEST {
            return Ok(done(
                invalid,
                Ok(()),
                Reply::Error(mqlb_statestore::store::errors::QUOTA_EXCEEDED),
            ));
        }
        let req = match resp3::parse_request(&p.payload) {
            Ok(r) => r,
            Err(e) => return Ok(done(invalid, Ok(()), Reply::Error(e.message()))),
        };
        let command = match &req {
            Request::Set { .. } => 0,
            Request::Get { .. } => 1,
            Request::Del { .. } => 2,
            Request::VDel { .. } => 3,
            Request::KeyNotify { .. } => 4,
        };
        let err = |m| Ok(done(command, Ok(()), Reply::Error(m)));
        let Some(ts) = user(&p.properties, "__ts") else {
            return err("missing timestamp");
        };
        let Some(timestamp) = Hlc::parse(&ts) else {
            return err("malformed timestamp");
        };
        let fencing_token = match user(&p.properties, "__ft") {
            None => None,
            Some(f) => match Hlc::parse(&f) {
                Some(f) => Some(f),
                None => return err("malformed timestamp"),
            },
        };
        let key = request_key(&req).to_vec();
        let ctx = Context {
            client_id: client_id.to_string(),
            timestamp,
            fencing_token,
            now_ms: now,
            view,
        };
        let mut store = self.store();
        if !key.is_empty() && !mine(&key) {
            return Err(key);
        }
        let before = store.rev(&key);
        let (reply, notes) = store.execute(req, &ctx);
        let version = store.version(&key, now).cloned().unwrap_or(here);
        let copy = if store.rev(&key) == before {
            None
        } else {
            store.export(&key).map(Box::new)
        };
        Ok(Executed {
            command,
            status: Ok(()),
            reply,
            version,
            notes,
            key: Some(key),
            copy,
        })
    }

    /// Installs a copy of a key made by its owner; whether it was newer.
    pub fn install(&self, copy: KeyCopy) -> bool {
        self.install_at(copy, now_ms())
    }

    /// [`StateStore::install`] with this node's wall clock reading `now`.
    pub fn install_at(&self, copy: KeyCopy, now: u64) -> bool {
        self.store().install(copy, now)
    }

    /// The copies of every key this store has, deletions included, that
    /// `wanted` selects (by key).
    pub fn copies(&self, wanted: impl Fn(&[u8]) -> bool) -> Vec<KeyCopy> {
        self.with_copies(wanted, |c| c)
    }

    /// One key's state, if the store has it (a deletion included).
    pub fn copy_of(&self, key: &[u8]) -> Option<KeyCopy> {
        self.store().export(key)
    }

    /// [`StateStore::copies`], handed to `then` before the store's lock
    /// is released: a change made after the copy was taken is made after
    /// `then` ran (and so reaches a link `then` registered).
    pub fn with_copies<R>(
        &self,
        wanted: impl Fn(&[u8]) -> bool,
        then: impl FnOnce(Vec<KeyCopy>) -> R,
    ) -> R {
        let store = self.store();
        let copies = store
            .keys()
            .into_iter()
            .filter(|k| wanted(k))
            .filter_map(|k| store.export(&k))
            .collect();
        then(copies)
    }

    /// Removes expired keys; the notifications to route, for the keys
    /// `owned` says this node answers for.
    pub fn expire(&self, owned: impl Fn(&[u8]) -> bool) -> Vec<Message> {
        let notes = self.store().expire(now_ms(), owned);
        self.notifications(notes)
    }

    /// A client's session ended: its watches go, on the keys `owned`
    /// selects (in view `view`); the copies of the keys that changed.
    pub fn forget(
        &self,
        client_id: &str,
        view: u64,
        owned: impl Fn(&[u8]) -> bool,
    ) -> Vec<KeyCopy> {
        self.store().forget_client(client_id, view, now_ms(), owned)
    }

    fn notifications(&self, notes: Vec<Notification>) -> Vec<Message> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
        notes
            .into_iter()
            .filter_map(|n| {
                let topic = format!(
                    "{}/{}/command/notify/{}",
                    RESERVED[1],
                    hex(n.client_id.as_bytes()),
                    hex(&n.key)
                );
                let topic = MqttStr::try_from(topic).ok()?;
                self.notifications.fetch_add(1, Ordering::Relaxed);
                let version = if n.version.node.is_empty() {
                    self.now()
                } else {
                    n.version
                };
                Some(Message {
                    topic,
                    payload: Bytes::from(resp3::notification(n.value.as_deref())),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: Arc::new(Properties {
                        content_type: Some(str_of("application/octet-stream")),
                        user_properties: vec![
                            (str_of("__ts"), str_of(&version.to_string())),
                            (str_of("__protVer"), str_of("1.0")),
                            (str_of("__srcId"), str_of(&self.node)),
                        ],
                        ..Properties::default()
                    }),
                    origin: None,
                    received: Instant::now(),
                })
            })
            .collect()
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP mqlb_statestore_requests_total State store requests, by command and result.\n\
             # TYPE mqlb_statestore_requests_total counter"
        );
        for (command, counts) in COMMANDS.iter().zip(&self.requests) {
            for (result, n) in RESULTS.iter().zip(counts) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "mqlb_statestore_requests_total{{command=\"{command}\",result=\"{result}\"}} {n}"
                    );
                }
            }
        }
        let store = self.store();
        let _ = writeln!(
            out,
            "# HELP mqlb_statestore_keys Keys held.\n# TYPE mqlb_statestore_keys gauge\nmqlb_statestore_keys {}\n\
             # HELP mqlb_statestore_bytes Bytes the store keeps, counted against max_total_bytes: keys, values, revisions, deletion markers and watches.\n# TYPE mqlb_statestore_bytes gauge\nmqlb_statestore_bytes {}\n\
             # HELP mqlb_statestore_notifications_total Key notifications sent.\n# TYPE mqlb_statestore_notifications_total counter\nmqlb_statestore_notifications_total {}",
            store.len(),
            store.bytes(),
            self.notifications.load(Ordering::Relaxed)
        );
    }
}
