//! One client connection: CONNECT, the packet loop, keep-alive, and the will.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mqlb_protocol::{
    decode, Ack, Connack, Connect, DecodeError, Disconnect, Limits, MqttStr, Packet, Properties,
    ProtocolVersion, QoS, ReasonCode, Suback, Unsuback,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::Verdict;
use crate::effects::Committed;
use crate::message::{Message, Sub};
use crate::outbox::{Closing, Encoder, Outbox};
use crate::state::State;

/// Largest packet accepted from clients.
pub const MAX_PACKET: usize = 1 << 20;
/// Time a new connection has to send its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a closed connection drains the client's last bytes.
pub const LINGER: Duration = Duration::from_secs(1);
/// Receive Maximum we grant v5 publishers; also our QoS 2 bookkeeping bound.
pub const RECEIVE_MAXIMUM: u16 = 1024;
/// Inbound topic aliases a v5 client may set.
pub const TOPIC_ALIAS_MAXIMUM: u16 = 64;

/// Default cap on one session's subscriptions.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 10_000;

/// Per-listener settings a connection needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// When set, v5 clients asking for a longer keep-alive (or none) get this
    /// as Server Keep Alive.
    pub max_keep_alive: Option<u16>,
    /// Most levels in a topic name or filter; deeper ones are refused by
    /// the codec with 0x90 / 0x8F.
    pub max_topic_levels: usize,
    /// Most subscriptions one session may hold; more get 0x97 Quota
    /// exceeded (3.x: 0x80).
    pub max_subscriptions: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_keep_alive: None,
            max_topic_levels: mqlb_protocol::DEFAULT_MAX_TOPIC_LEVELS,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
        }
    }
}

impl Settings {
    fn decode_limits(&self) -> Limits {
        Limits {
            max_frame: MAX_PACKET,
            max_topic_levels: self.max_topic_levels,
        }
    }
}

/// Serves one client until it leaves.
///
/// Generic over the stream so tests and the fuzz target drive it through an
/// in-memory pipe; the server passes a `TcpStream` with TCP_NODELAY set.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<State>,
    settings: Settings,
) {
    serve(stream, state, settings, None).await;
}

/// Serves a client whose verified TLS certificate names it: the identity
/// replaces the CONNECT's user name or client ID, never trusted from the
/// client. As an identity user name it is the credential (Mosquitto's
/// `use_identity_as_username`): no password is checked, ACLs apply to it.
pub async fn handle_identified<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<State>,
    settings: Settings,
    identity: Option<(mqlb_config::IdentityAs, String)>,
) {
    let origin = identity.map(|(field, name)| Box::new(Origin::Certified(field, name)));
    serve(stream, state, settings, origin).await;
}

/// Serves a client that a peer node relayed here because this node owns
/// its session: never relayed again, whatever this node's view says, so a
/// brief disagreement between two views cannot bounce a client around.
pub async fn handle_owned<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<State>,
    settings: Settings,
    relayed_by: crate::router::NodeId,
) {
    serve(
        stream,
        state,
        settings,
        Some(Box::new(Origin::Relayed(relayed_by))),
    )
    .await;
}

/// How a connection reached this node, when not straight from a client
/// over plain MQTT.
enum Origin {
    /// Relayed by this peer, because this node serves the session.
    Relayed(crate::router::NodeId),
    /// Over TLS with a verified certificate whose identity replaces this
    /// CONNECT field.
    Certified(mqlb_config::IdentityAs, String),
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<State>,
    settings: Settings,
    // Boxed: most connections come straight from their client, and every
    // idle one holds this future.
    origin: Option<Box<Origin>>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Small to start: idle connections dominate memory; reads grow it on demand.
    let mut buf = BytesMut::with_capacity(256);
    // CONNECT: version-independent decode.
    let connect = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_packet(
            &mut rd,
            &mut buf,
            ProtocolVersion::V5,
            settings.decode_limits(),
        ),
    )
    .await
    {
        Ok(Ok(Some(Packet::Connect(mut c)))) => {
            if let Some(Origin::Certified(field, name)) = origin.as_deref() {
                let Ok(name) = MqttStr::try_from(name.as_str()) else {
                    tracing::info!(identity = %name, "certificate identity is not an MQTT string");
                    return;
                };
                match field {
                    mqlb_config::IdentityAs::Username => {
                        c.username = Some(name);
                        c.password = None;
                    }
                    mqlb_config::IdentityAs::ClientId => c.client_id = name,
                }
            }
            c
        }
        Ok(Err(_)) => {
            if let Some(reply) = connect_error_reply(&buf) {
                let _ = wr.write_all(reply).await;
            }
            return;
        }
        _ => return,
    };
    let relayed_by = match origin.as_deref() {
        Some(Origin::Relayed(n)) => Some(*n),
        _ => None,
    };
    if let Some(cluster) = state.cluster() {
        // Boxed: only cluster nodes get here, and the placement's waits
        // would grow every connection's future.
        let placed = Box::pin(place(&connect, &state, &cluster, relayed_by)).await;
        match placed {
            Placed::Here => {}
            Placed::NotReady => {
                // Still syncing from peers: the balancer's probe sees this,
                // so clients go elsewhere until the node has what it must
                // hold.
                let ack = Packet::Connack(Connack {
                    session_present: false,
                    reason: ReasonCode::SERVER_UNAVAILABLE,
                    properties: Properties::default(),
                });
                if let Ok(b) = ack.to_bytes(connect.version) {
                    let _ = wr.write_all(&b).await;
                }
                return;
            }
            Placed::Moving => {
                // Its session is still moving after the hold: a v5 client
                // is told so (a balancer does not count it against this
                // node); 3.x has no way to say it, and is closed without
                // a CONNACK, which no balancer counts either.
                cluster.stats.moving_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client_id = %connect.client_id, "session still moving; client refused");
                if connect.version.is_v5() {
                    if let Ok(b) =
                        Packet::Connack(Connack::session_moving()).to_bytes(connect.version)
                    {
                        let _ = wr.write_all(&b).await;
                    }
                }
                return;
            }
            Placed::Relay(owner, up) => {
                let stopping = state.stopping.clone();
                Box::pin(async move {
                    tokio::select! {
                        _ = relay_to_owner(connect, rd.unsplit(wr), buf, owner, up) => {}
                        // The session is elsewhere: nothing to close gracefully.
                        _ = stopping.cancelled() => {}
                    }
                })
                .await;
                return;
            }
        }
    }
    if let Some(cluster) = state.cluster() {
        cluster.promote(connect.client_id.as_str(), &state);
    }
    let by_certificate = matches!(
        origin.as_deref(),
        Some(Origin::Certified(mqlb_config::IdentityAs::Username, _))
    );
    let mut session = match Session::start(connect, &mut wr, state, settings, by_certificate).await
    {
        Some(s) => s,
        None => return,
    };
    let reason = session.run(&mut rd, &mut wr, &mut buf).await;
    session.finish(&mut wr, reason).await;
    linger(&mut rd).await;
}

/// After our FIN, reads and discards what the client still sends (for at
/// most [`LINGER`]) before the socket is dropped: closing with unread bytes
/// makes the kernel send RST, and a RST can destroy our last packet (the
/// DISCONNECT with its reason) before the client has read it.
async fn linger(rd: &mut (impl AsyncRead + Unpin)) {
    // On the heap: every idle connection's future carries this state.
    let mut sink = vec![0u8; 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Where a cluster node serves a CONNECT.
enum Placed {
    /// Here: this node holds (or now takes) the session.
    Here,
    /// This node is not ready (still syncing from its peers).
    NotReady,
    /// At `0`, over the open cluster connection `1`.
    Relay(String, tokio::net::TcpStream),
    /// The session's holder died and its replica was not promoted within
    /// [`MOVE_HOLD`].
    Moving,
}

/// How long a client whose session is moving (its holder just died) is
/// held before it is refused: the failure detector's timeout, an election
/// and the view change, then the promotion of the replica. A `kill -9`
/// closes the links at once, so such a client is usually served within a
/// second (two when the leader died); a hung holder takes the longest.
pub const MOVE_HOLD: Duration = crate::cluster::TAKEOVER_WITHIN;

/// Longest one attempt to open a relay to another node may take: a node
/// that does not answer this fast is treated as unreachable, and the
/// client waits for the view to move its session instead.
const RELAY_DIAL: Duration = Duration::from_secs(1);

/// Where to serve this client: here, or relayed to the node that serves
/// its session. A relayed client takes one more hop only to the live
/// holder of its session, never back to the node that relayed it.
///
/// A client whose session's holder has just died (not heard, or not
/// answering) is held, not refused, while the view drops the dead node and
/// the next node of the chain promotes its copy, then served with its
/// session. A direct client reaching a node that is not ready is refused
/// at once (that is how the balancer's probe learns it); a relayed one
/// waits for readiness too.
async fn place(
    connect: &Connect,
    state: &State,
    cluster: &crate::cluster::Cluster,
    relayed_by: Option<crate::router::NodeId>,
) -> Placed {
    let deadline = tokio::time::Instant::now() + MOVE_HOLD;
    let mut held = false;
    loop {
        let now = tokio::time::Instant::now();
        if !cluster.ready() {
            if relayed_by.is_none() || now >= deadline {
                return Placed::NotReady;
            }
        } else {
            let Some(target) = relay_target(connect, state, cluster, relayed_by) else {
                return Placed::Here;
            };
            if cluster.hears(&target) {
                let left = deadline.saturating_duration_since(now);
                let dial = cluster.dial_client(&target);
                if let Ok(Ok(up)) = tokio::time::timeout(left.min(RELAY_DIAL), dial).await {
                    return Placed::Relay(target, up);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Placed::Moving;
            }
            if !held {
                held = true;
                cluster.stats.held_connects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client_id = %connect.client_id, holder = %target, "session moving: CONNECT held");
            }
        }
        tokio::time::sleep(crate::cluster::TICK).await;
    }
}

/// The node to relay this client to, if another node serves its session.
fn relay_target(
    connect: &Connect,
    state: &State,
    cluster: &crate::cluster::Cluster,
    relayed_by: Option<crate::router::NodeId>,
) -> Option<String> {
    if connect.client_id.is_empty() || is_local_probe(connect) {
        return None;
    }
    let id = connect.client_id.as_str();
    match relayed_by {
        None => cluster.server_for(id, state),
        Some(_) if state.core().has_session(id) => None,
        Some(from) => cluster
            .live_holder(id)
            .filter(|h| cluster.node_id(h) != Some(from)),
    }
}

/// A health probe (the balancer's `mqlb-probe-{instance}-{target}` IDs,
/// which only ever go to their one target) with a session that ends with
/// the connection: served by the node it reached, so the probe tests that
/// node and not the owner its ID happens to hash to.
fn is_local_probe(c: &Connect) -> bool {
    let ends = if c.version.is_v5() {
        c.properties.session_expiry_interval.unwrap_or(0) == 0
    } else {
        c.clean_start
    };
    ends && c.client_id.as_str().starts_with("mqlb-probe-")
}

/// Relays a client whose session another node serves to that node, over
/// the cluster connection `up` already open to it (serving it here would
/// make a second session for one client ID).
async fn relay_to_owner<S: AsyncRead + AsyncWrite + Unpin>(
    connect: Box<Connect>,
    mut client: S,
    rest: BytesMut,
    owner: String,
    mut up: tokio::net::TcpStream,
) {
    let v = connect.version;
    tracing::debug!(client_id = %connect.client_id, owner, "relaying client to its owner");
    let Ok(connect_bytes) = Packet::Connect(connect).to_bytes(v) else {
        return;
    };
    let mut first = connect_bytes.to_vec();
    first.extend_from_slice(&rest);
    let _ = crate::cluster::relay(&mut client, &mut up, &first).await;
}

/// The answer to a refused CONNECT: the same bytes Mosquitto (and the
/// balancer, by default) sends, so a client cannot tell the three apart.
fn connect_error_reply(buf: &[u8]) -> Option<&'static [u8]> {
    match mqlb_protocol::sniff_connect(buf, MAX_PACKET) {
        mqlb_protocol::Sniff::Reject(r) => r.connack(mqlb_protocol::RefusalStyle::Close),
        _ => None,
    }
}

/// Reads one packet; `Ok(None)` on a clean EOF between packets.
async fn read_packet(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    v: ProtocolVersion,
    limits: Limits,
) -> Result<Option<Packet>, DecodeError> {
    loop {
        if let Some(p) = decode(buf, v, limits)? {
            return Ok(Some(p));
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Why a connection ended.
enum End {
    /// DISCONNECT: will discarded unless the reason is 0x04.
    Normal { send_will: bool },
    /// The client vanished (EOF, error, keep-alive timeout): will sent.
    Lost,
    /// Protocol violation: v5 gets DISCONNECT with this code; will sent.
    Violation(ReasonCode),
    /// The broker closed it (takeover or shutdown); v5 gets the reason.
    Closed(Closing),
}

struct Session {
    client_id: String,
    /// The client ID as shared by every message it publishes (No Local),
    /// so routing a publish allocates no string.
    origin: Arc<str>,
    version: ProtocolVersion,
    limits: Limits,
    conn: u64,
    keep_alive: Option<Duration>,
    /// Boxed: most clients have none, and the connection future stays small.
    will: Option<Box<(Message, Duration)>>,
    state: Arc<State>,
    rx: Arc<Outbox>,
    /// Inbound topic aliases (v5), made on first use.
    // One pointer in every idle connection instead of a 48-byte map.
    #[allow(clippy::box_collection)]
    aliases: Option<Box<HashMap<u16, MqttStr>>>,
    /// User name from CONNECT, for ACLs.
    username: Option<String>,
    /// Change-log commits that acknowledgements in the current batch wait for.
    commits: Vec<Committed>,
    max_subscriptions: usize,
}

impl Session {
    async fn start(
        c: Box<Connect>,
        stream: &mut (impl AsyncWrite + Unpin),
        state: Arc<State>,
        settings: Settings,
        by_certificate: bool,
    ) -> Option<Session> {
        let v = c.version;
        let refuse = |code: ReasonCode| {
            Packet::Connack(Connack {
                session_present: false,
                reason: code,
                properties: Properties::default(),
            })
        };
        let username = c.username.as_ref().map(|u| u.to_string());
        let verdict = if by_certificate {
            Verdict::Allow
        } else {
            state.auth.check(username.clone(), c.password.clone()).await
        };
        if verdict != Verdict::Allow {
            let code = match verdict {
                Verdict::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                _ => ReasonCode::NOT_AUTHORIZED,
            };
            tracing::info!(client_id = %c.client_id, ?verdict, "CONNECT refused");
            if let Ok(b) = refuse(code).to_bytes(v) {
                let _ = stream.write_all(&b).await;
            }
            return None;
        }
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            if !v.is_v5() && !c.clean_start {
                // 3.1.1 (3.1.3-8): an empty ID needs a clean session.
                if let Ok(b) = refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID).to_bytes(v) {
                    let _ = stream.write_all(&b).await;
                }
                return None;
            }
            let id = format!("mqlb-{:016x}", next_random());
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.to_string()
        };
        // Session lifetime: v5 Session Expiry Interval (0 = ends with the
        // connection, 0xFFFFFFFF = never); 3.x clean session 1 = ends, 0 = never.
        let expiry = if v.is_v5() {
            match c.properties.session_expiry_interval.unwrap_or(0) {
                u32::MAX => None,
                s => Some(Duration::from_secs(u64::from(s))),
            }
        } else if c.clean_start {
            Some(Duration::ZERO)
        } else {
            None
        };
        let will = c.will.as_ref().map(|w| {
            Box::new((
                Message {
                    topic: w.topic.clone(),
                    payload: w.payload.clone(),
                    qos: w.qos,
                    retain: w.retain,
                    properties: Properties {
                        will_delay_interval: None,
                        ..w.properties.clone()
                    },
                    origin: Some(Arc::from(client_id.as_str())),
                    received: std::time::Instant::now(),
                },
                Duration::from_secs(u64::from(w.properties.will_delay_interval.unwrap_or(0))),
            ))
        });
        let rx = Arc::new(Outbox::new(Encoder::new(
            v,
            c.properties.maximum_packet_size.unwrap_or(u32::MAX),
            c.properties.topic_alias_maximum.unwrap_or(0),
        )));
        let tx = rx.clone();
        let receive_maximum = c.properties.receive_maximum.unwrap_or(u16::MAX);
        let (connected, committed) =
            state.ask(|core| core.connect(&client_id, c.clean_start, expiry, receive_maximum, tx));
        committed.wait().await;
        // Server Keep Alive (v5): cap what the client asked for.
        let mut keep_alive = c.keep_alive;
        let mut server_keep_alive = None;
        if let (true, Some(max)) = (v.is_v5(), settings.max_keep_alive) {
            if keep_alive == 0 || keep_alive > max {
                keep_alive = max;
                server_keep_alive = Some(max);
            }
        }
        let mut props = Properties::default();
        if v.is_v5() {
            props.server_keep_alive = server_keep_alive;
            props.assigned_client_identifier =
                assigned.as_deref().and_then(|a| MqttStr::try_from(a).ok());
            props.receive_maximum = Some(RECEIVE_MAXIMUM);
            props.topic_alias_maximum = Some(TOPIC_ALIAS_MAXIMUM);
            props.maximum_packet_size = u32::try_from(MAX_PACKET).ok();
            props.retain_available = Some(1);
        }
        let ack = Packet::Connack(Connack {
            session_present: connected.session_present,
            reason: ReasonCode::SUCCESS,
            properties: props,
        });
        let bytes = ack.to_bytes(v).ok()?;
        if stream.write_all(&bytes).await.is_err() {
            let _ = state.act(|core| core.disconnect(&client_id, connected.conn));
            return None;
        }
        let _ = state.act(|core| core.resume(&client_id));
        tracing::debug!(client_id = %client_id, version = v.label(), session_present = connected.session_present, "connected");
        Some(Session {
            origin: Arc::from(client_id.as_str()),
            client_id,
            version: v,
            limits: settings.decode_limits(),
            conn: connected.conn,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            will,
            state,
            rx,
            aliases: None,
            username,
            commits: Vec::new(),
            max_subscriptions: settings.max_subscriptions,
        })
    }

    /// Holds the next write until `c` is committed.
    fn wait_for(&mut self, c: Committed) {
        if !c.is_done() {
            self.commits.push(c);
        }
    }

    fn acked(
        &mut self,
        pid: mqlb_protocol::PacketId,
        kind: mqlb_protocol::PacketType,
        out: &mut Vec<u8>,
    ) {
        let id = &self.client_id;
        let (pubrel, c) = self.state.ask(|core| core.acked(id, pid, kind));
        self.wait_for(c);
        // Leaves with this batch, after the commits it waits for.
        if pubrel {
            self.send(out, Packet::Pubrel(Ack::new(pid)));
        }
    }

    fn send(&self, out: &mut Vec<u8>, p: Packet) {
        if let Ok(b) = p.to_bytes(self.version) {
            out.extend_from_slice(&b);
        }
    }

    async fn run<S: AsyncRead + AsyncWrite>(
        &mut self,
        rd: &mut ReadHalf<S>,
        wr: &mut WriteHalf<S>,
        buf: &mut BytesMut,
    ) -> End {
        loop {
            // Packets already buffered first; their replies go out in one write.
            let mut out = Vec::new();
            let mut end = None;
            loop {
                match decode(buf, self.version, self.limits) {
                    Ok(Some(p)) => {
                        end = self.on_packet(p, &mut out);
                        if end.is_some() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        end = Some(End::Violation(e.reason_code()));
                        break;
                    }
                }
            }
            // Acknowledgements leave only once what they acknowledge is
            // committed (at once on a single node).
            for c in self.commits.drain(..) {
                c.wait().await;
            }
            if !out.is_empty() && wr.write_all(&out).await.is_err() {
                return End::Lost;
            }
            if let Some(end) = end {
                return end;
            }
            let deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
            tokio::select! {
                r = rd.read_buf(buf) => match r {
                    Ok(0) | Err(_) => return End::Lost,
                    Ok(_) => {}
                },
                _ = self.rx.ready() => {
                    // Everything queued, already encoded, in one write.
                    let taken = self.rx.take();
                    for pid in taken.discarded {
                        let id = &self.client_id;
                        let _ = self.state.act(|core| core.discarded(id, pid));
                    }
                    if !taken.bytes.is_empty() && wr.write_all(&taken.bytes).await.is_err() {
                        return End::Lost;
                    }
                    if let Some(c) = taken.close {
                        return End::Closed(c);
                    }
                }
                _ = sleep_until(deadline) => {
                    tracing::debug!(client_id = %self.client_id, "keep-alive expired");
                    return End::Violation(ReasonCode::KEEP_ALIVE_TIMEOUT);
                }
            }
        }
    }

    /// A request to the state store: executed here, never routed; the
    /// response and any key notifications are routed instead, and the
    /// request is acknowledged once they are committed.
    fn on_state_store(&mut self, p: mqlb_protocol::Publish, out: &mut Vec<u8>) -> Option<End> {
        let (qos, packet_id) = (p.qos, p.packet_id);
        let refused = self.state.statestore.refusal(&self.client_id, &p);
        let outcome = match (self.state.cluster(), refused) {
            (_, Some(code)) => crate::statestore::Outcome::Refuse(code),
            // In a cluster the key's owner answers, once its chain holds
            // the change: the acknowledgement waits for that.
            (Some(cluster), None) => {
                let state = self.state.clone();
                let c = cluster.store_request(&state, &self.client_id, p);
                self.wait_for(c);
                crate::statestore::Outcome::Route(Vec::new())
            }
            (None, None) => self.state.statestore.handle(&self.client_id, &p),
        };
        let (committed, reason) = match outcome {
            crate::statestore::Outcome::Route(msgs) => (
                Some(self.state.act(|core| {
                    let mut fx = crate::effects::Effects::none();
                    for m in msgs {
                        fx.extend(core.route(m));
                    }
                    fx
                })),
                None,
            ),
            crate::statestore::Outcome::Refuse(code) => (None, Some(code)),
        };
        if let Some(c) = committed {
            self.wait_for(c);
        }
        let ack = |id| {
            let mut a = Ack::new(id);
            if let (Some(code), true) = (reason, self.version.is_v5()) {
                a.reason = code;
            }
            a
        };
        match (qos, packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send(out, Packet::Puback(ack(id))),
            (QoS::ExactlyOnce, Some(id)) => self.send(out, Packet::Pubrec(ack(id))),
            _ => {}
        }
        None
    }

    /// Handles one packet, appending replies to `out`.
    fn on_packet(&mut self, p: Packet, out: &mut Vec<u8>) -> Option<End> {
        match p {
            Packet::Publish(mut p) => {
                if self.version.is_v5() {
                    if let Some(alias) = p.properties.topic_alias {
                        if alias > TOPIC_ALIAS_MAXIMUM {
                            return Some(End::Violation(ReasonCode::TOPIC_ALIAS_INVALID));
                        }
                        if p.topic.is_empty() {
                            match self.aliases.as_ref().and_then(|a| a.get(&alias)) {
                                Some(t) => p.topic = t.clone(),
                                None => return Some(End::Violation(ReasonCode::PROTOCOL_ERROR)),
                            }
                        } else {
                            self.aliases
                                .get_or_insert_with(Box::default)
                                .insert(alias, p.topic.clone());
                        }
                        p.properties.topic_alias = None;
                    }
                }
                if !self.state.auth.may_publish(
                    self.username.as_deref(),
                    &self.client_id,
                    p.topic.as_str(),
                ) {
                    tracing::debug!(client_id = %self.client_id, topic = %p.topic, "publish denied");
                    let ack = |id| {
                        let mut a = Ack::new(id);
                        if self.version.is_v5() {
                            a.reason = ReasonCode::NOT_AUTHORIZED;
                        }
                        a
                    };
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => self.send(out, Packet::Puback(ack(id))),
                        (QoS::ExactlyOnce, Some(id)) => self.send(out, Packet::Pubrec(ack(id))),
                        _ => {}
                    }
                    return None;
                }
                if p.topic.as_str() == crate::statestore::INVOKE_TOPIC {
                    return self.on_state_store(p, out);
                }
                if p.qos != QoS::AtMostOnce && self.state.cluster().is_some_and(|c| !c.is_serving())
                {
                    // This node has handed its sessions over: an
                    // acknowledgement here could cover a message that
                    // reached nobody. The client sends it again elsewhere.
                    return Some(End::Closed(crate::outbox::Closing::ShuttingDown));
                }
                let msg = Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
                    properties: p.properties,
                    origin: Some(self.origin.clone()),
                    received: std::time::Instant::now(),
                };
                match (p.qos, p.packet_id) {
                    (QoS::AtMostOnce, _) => {
                        let _ = self.state.act(|core| core.route(msg));
                    }
                    (QoS::AtLeastOnce, Some(pid)) => {
                        let c = self.state.act(|core| core.route(msg));
                        self.wait_for(c);
                        self.send(out, Packet::Puback(Ack::new(pid)));
                    }
                    (QoS::ExactlyOnce, Some(pid)) => {
                        // Exactly once: route on first receipt only, even
                        // across reconnects (the ids live in the session).
                        let id = &self.client_id;
                        let (first, c) = self.state.ask(|core| {
                            let (first, mut fx) =
                                core.qos2_received(id, pid, usize::from(RECEIVE_MAXIMUM));
                            if first == Some(true) {
                                fx.extend(core.route(msg));
                            }
                            (first, fx)
                        });
                        if first.is_none() {
                            return Some(End::Violation(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
                        }
                        self.wait_for(c);
                        self.send(out, Packet::Pubrec(Ack::new(pid)));
                    }
                    _ => return Some(End::Violation(ReasonCode::PROTOCOL_ERROR)),
                }
            }
            Packet::Pubrel(a) => {
                let mut ack = Ack::new(a.packet_id);
                let id = &self.client_id;
                let (known, c) = self.state.ask(|core| core.qos2_released(id, a.packet_id));
                if !known && self.version.is_v5() {
                    ack.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.wait_for(c);
                self.send(out, Packet::Pubcomp(ack));
            }
            Packet::Puback(a) => self.acked(a.packet_id, mqlb_protocol::PacketType::Puback, out),
            Packet::Pubrec(a) => self.acked(a.packet_id, mqlb_protocol::PacketType::Pubrec, out),
            Packet::Pubcomp(a) => self.acked(a.packet_id, mqlb_protocol::PacketType::Pubcomp, out),
            Packet::Subscribe(s) => {
                let sub_id = s.properties.subscription_identifiers.first().copied();
                let refused = if self.version.is_v5() {
                    ReasonCode::NOT_AUTHORIZED
                } else {
                    ReasonCode(0x80)
                };
                let quota = if self.version.is_v5() {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode(0x80)
                };
                let allowed: Vec<bool> = s
                    .filters
                    .iter()
                    .map(|(filter, _)| {
                        self.state.auth.may_subscribe(
                            self.username.as_deref(),
                            &self.client_id,
                            filter.as_str(),
                        )
                    })
                    .collect();
                let id = &self.client_id;
                let max = self.max_subscriptions;
                let (reasons, c) = self.state.ask(|core| {
                    let mut fx = crate::effects::Effects::none();
                    let reasons = s
                        .filters
                        .iter()
                        .zip(allowed)
                        .map(|((filter, options), allowed)| {
                            if !allowed {
                                return refused;
                            }
                            // A session holds at most `max` subscriptions:
                            // each costs memory and a trie path.
                            if core.subscription_count(id) >= max
                                && !core.has_subscription(id, filter.as_str())
                            {
                                return quota;
                            }
                            let sub = Sub {
                                options: *options,
                                id: sub_id,
                            };
                            fx.extend(core.subscribe(id, filter.as_str(), sub).1);
                            ReasonCode(options.qos as u8)
                        })
                        .collect();
                    (reasons, fx)
                });
                self.wait_for(c);
                // The SUBACK goes out before the retained messages the
                // subscription triggered: `out` is written before the
                // mailbox is read again.
                self.send(
                    out,
                    Packet::Suback(Suback {
                        packet_id: s.packet_id,
                        properties: Properties::default(),
                        reasons,
                    }),
                );
            }
            Packet::Unsubscribe(u) => {
                let id = &self.client_id;
                let (reasons, c) = self.state.ask(|core| {
                    let mut fx = crate::effects::Effects::none();
                    let reasons = u
                        .filters
                        .iter()
                        .map(|f| {
                            let (existed, more) = core.unsubscribe(id, f.as_str());
                            fx.extend(more);
                            if existed {
                                ReasonCode::SUCCESS
                            } else {
                                ReasonCode::NO_SUBSCRIPTION_EXISTED
                            }
                        })
                        .collect();
                    (reasons, fx)
                });
                self.wait_for(c);
                self.send(
                    out,
                    Packet::Unsuback(Unsuback {
                        packet_id: u.packet_id,
                        properties: Properties::default(),
                        reasons,
                    }),
                );
            }
            Packet::Pingreq => self.send(out, Packet::Pingresp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    let e = if e == u32::MAX {
                        None
                    } else {
                        Some(Duration::from_secs(u64::from(e)))
                    };
                    let id = &self.client_id;
                    let _ = self.state.act(|core| core.set_expiry(id, e));
                }
                return Some(End::Normal {
                    send_will: d.reason == ReasonCode::DISCONNECT_WITH_WILL,
                });
            }
            Packet::Connect(_) => return Some(End::Violation(ReasonCode::PROTOCOL_ERROR)),
            Packet::Auth(_) => return Some(End::Violation(ReasonCode::BAD_AUTHENTICATION_METHOD)),
            // Server-to-client packets from a client.
            Packet::Connack(_) | Packet::Suback(_) | Packet::Unsuback(_) | Packet::Pingresp => {
                return Some(End::Violation(ReasonCode::PROTOCOL_ERROR))
            }
        }
        None
    }

    async fn finish(mut self, stream: &mut (impl AsyncWrite + Unpin), end: End) {
        let (send_will, disconnect) = match end {
            End::Normal { send_will } => (send_will, None),
            End::Lost => (true, None),
            End::Violation(code) => (true, Some(code)),
            End::Closed(Closing::TakenOver) => (true, Some(ReasonCode::SESSION_TAKEN_OVER)),
            // A session that outlives the shutdown keeps its will for the
            // client's return; one that ends now publishes it (3.1.2.5).
            End::Closed(Closing::ShuttingDown) => (
                self.state.core().ends_with_connection(&self.client_id),
                Some(ReasonCode::SERVER_SHUTTING_DOWN),
            ),
        };
        if let (Some(code), true) = (disconnect, self.version.is_v5()) {
            if let Ok(b) = Packet::Disconnect(Disconnect::new(code)).to_bytes(self.version) {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&b)).await;
            }
        }
        let _ = stream.shutdown().await;
        let (id, conn) = (&self.client_id, self.conn);
        // Key notifications last as long as the client's session.
        if self.state.core().ends_with_connection(id) {
            match self.state.cluster() {
                Some(cluster) => cluster.store_forget(id, &self.state),
                None => drop(self.state.statestore.forget(id, 0, |_| true)),
            }
        }
        let _ = self.state.act(|core| core.disconnect(id, conn));
        let will = self.will.take().filter(|w| {
            self.state.auth.may_publish(
                self.username.as_deref(),
                &self.client_id,
                w.0.topic.as_str(),
            )
        });
        if let (true, Some(boxed)) = (send_will, will) {
            let (mut will, delay) = *boxed;
            will.received = std::time::Instant::now();
            let id = &self.client_id;
            let _ = self.state.act(|core| {
                if delay.is_zero() {
                    core.route(will)
                } else {
                    // Will Delay: the core publishes it when the delay or the
                    // session ends, unless the client is back by then.
                    core.schedule_will(id, will, delay);
                    core.publish_due_wills(std::time::Instant::now())
                }
            });
        }
        tracing::debug!(client_id = %self.client_id, "disconnected");
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A per-process pseudo-random value for assigned client IDs.
fn next_random() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
    // splitmix64 finaliser
    let mut z = n;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    /// Every idle connection holds one of these futures: keep it small
    /// (it was 4.8 KB before the will and the CONNECT were boxed).
    #[test]
    fn connection_future_stays_small() {
        let (a, _b) = tokio::io::duplex(64);
        let f = super::handle(a, crate::state::State::open(), super::Settings::default());
        let size = std::mem::size_of_val(&f);
        eprintln!("SIZE {size}");
        assert!(size <= 2048, "connection future is {size} bytes");
    }
}
