//! One client connection: CONNECT, the packet loop, keep-alive, and the will.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
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
use crate::effects::{Committed, NotCommitted};
use crate::message::{Message, Sub};
use crate::node::Node;
use crate::outbox::{Closing, Encoder, Outbox};
use crate::state::State;

pub use crate::message::MAX_PACKET;
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
pub fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Node>,
    settings: Settings,
) -> impl std::future::Future<Output = ()> {
    // Not an async fn: its own state would wrap the connection's.
    serve(stream, state, settings, None)
}

/// Serves a client whose verified TLS certificate names it: the identity
/// replaces the CONNECT's user name or client ID, never trusted from the
/// client. As an identity user name it is the credential (Mosquitto's
/// `use_identity_as_username`): no password is checked, ACLs apply to it.
pub fn handle_identified<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Node>,
    settings: Settings,
    identity: Option<(mqlb_config::IdentityAs, String)>,
) -> impl std::future::Future<Output = ()> {
    let origin = identity.map(|(field, name)| Box::new(Origin::Certified(field, name)));
    serve(stream, state, settings, origin)
}

/// Serves a client that a peer node relayed here because this node owns
/// its session: never relayed again, whatever this node's view says, so a
/// brief disagreement between two views cannot bounce a client around.
/// `identity` is what the relaying node verified from the client's TLS
/// certificate (the cluster link is authenticated, so it is trusted): the
/// client is checked as it would be on a direct connection.
pub fn handle_owned<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Node>,
    settings: Settings,
    relayed_by: crate::router::NodeId,
    identity: Option<(mqlb_config::IdentityAs, String)>,
) -> impl std::future::Future<Output = ()> {
    serve(
        stream,
        state,
        settings,
        Some(Box::new(Origin::Relayed(relayed_by, identity))),
    )
}

/// How a connection reached this node, when not straight from a client
/// over plain MQTT.
enum Origin {
    /// Relayed by this peer, because this node serves the session, with
    /// the identity the peer verified from the client's certificate.
    Relayed(
        crate::router::NodeId,
        Option<(mqlb_config::IdentityAs, String)>,
    ),
    /// Over TLS with a verified certificate whose identity replaces this
    /// CONNECT field.
    Certified(mqlb_config::IdentityAs, String),
}

// A function returning an `async move` block: an async fn keeps its
// arguments twice, and this is the state every idle connection holds.
// Everything up to the CONNACK is boxed and freed once the session runs.
fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Node>,
    settings: Settings,
    // Boxed: most connections come straight from their client, and every
    // idle one holds this future.
    origin: Option<Box<Origin>>,
) -> impl std::future::Future<Output = ()> {
    // Made here, not in the block: what an async block captures stays in
    // its state for its whole life.
    let starting = Box::pin(start(stream, state, settings, origin));
    async move {
        let Some(mut live) = starting.await else {
            return;
        };
        let reason = live
            .session
            .run(&mut live.rd, &mut live.wr, &mut live.buf)
            .await;
        Box::pin(async move {
            live.session.finish(&mut live.wr, reason).await;
            linger(&mut live.rd).await;
        })
        .await;
    }
}

pin_project_lite::pin_project! {
    /// A connection's future, dropped when `stop` fires. A struct rather
    /// than an async block with `select!`: a block keeps what it captures
    /// beside the future it moves into the select, so every idle
    /// connection would hold its arguments twice.
    pub struct Until<F> {
        #[pin]
        serving: F,
        #[pin]
        stop: tokio_util::sync::WaitForCancellationFutureOwned,
    }
}

impl<F> Until<F> {
    /// Runs `serving` until it ends or `stop` is cancelled.
    pub fn new(serving: F, stop: tokio_util::sync::CancellationToken) -> Self {
        Until {
            serving,
            stop: stop.cancelled_owned(),
        }
    }
}

impl<F: Future<Output = ()>> Future for Until<F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.project();
        if this.serving.poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        this.stop.poll(cx)
    }
}

/// Reads what the client sent into `buf`, which holds no memory while the
/// connection waits: when a read would block with nothing buffered the
/// buffer is freed, and a read with no buffer goes through the stack and
/// makes one only once bytes arrived. An idle client then costs no read
/// buffer (256 bytes and the CONNECT's share of it, 296 per connection).
fn read_lazily<'a, R: AsyncRead + Unpin>(
    rd: &'a mut R,
    buf: &'a mut BytesMut,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        if buf.capacity() == 0 {
            // Lives for this poll only, never in the connection's state;
            // not zeroed first (a 2 KiB memset on every read of a busy
            // connection: found by counting instructions across nodes).
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            let mut got = tokio::io::ReadBuf::uninit(&mut stack);
            std::task::ready!(Pin::new(&mut *rd).poll_read(cx, &mut got))?;
            let got = got.filled();
            if !got.is_empty() {
                buf.reserve(got.len().max(READ_START));
                buf.extend_from_slice(got);
            }
            return std::task::Poll::Ready(Ok(got.len()));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(READ_START));
        }
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut *rd), cx, buf);
        if read.is_pending() && buf.is_empty() {
            *buf = BytesMut::new();
        }
        read
    })
}

/// What a read buffer starts at once bytes arrive; it grows as packets
/// demand.
const READ_START: usize = 1024;

/// A connection whose session runs: what it holds while it is served.
struct Live<S> {
    session: Session,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    buf: BytesMut,
}

/// Reads the CONNECT, places the session (here, relayed to its owner, or
/// refused) and answers it; `Some` once the session runs here.
async fn start<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Node>,
    settings: Settings,
    origin: Option<Box<Origin>>,
) -> Option<Live<S>> {
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
            let certified = match origin.as_deref() {
                Some(Origin::Certified(field, name)) => Some((field, name)),
                Some(Origin::Relayed(_, Some((field, name)))) => Some((field, name)),
                _ => None,
            };
            if let Some((field, name)) = certified {
                let Ok(name) = MqttStr::try_from(name.as_str()) else {
                    tracing::info!(identity = %name, "certificate identity is not an MQTT string");
                    return None;
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
            return None;
        }
        _ => return None,
    };
    let relayed_by = match origin.as_deref() {
        Some(Origin::Relayed(n, _)) => Some(*n),
        _ => None,
    };
    // What a node this client is relayed to must know of it.
    let identity = match origin.as_deref() {
        Some(Origin::Certified(f, n)) | Some(Origin::Relayed(_, Some((f, n)))) => {
            Some((*f, n.clone()))
        }
        _ => None,
    };
    if let Some(cluster) = state.cluster() {
        // Boxed: only cluster nodes get here, and the placement's waits
        // would grow every connection's future.
        let placed = Box::pin(place(&connect, &state, &cluster, relayed_by, identity)).await;
        match placed {
            Placed::Here => {}
            Placed::NotReady => {
                // Still syncing from peers: the balancer's probe sees this,
                // so clients go elsewhere until the node has what it must
                // hold.
                // Bound first: a temporary in the condition would live across the
                // write, and every connection's future would carry the packet.
                let encoded = Packet::Connack(Connack {
                    session_present: false,
                    reason: ReasonCode::SERVER_UNAVAILABLE,
                    properties: Properties::default(),
                })
                .to_bytes(connect.version);
                if let Ok(b) = encoded {
                    let _ = wr.write_all(&b).await;
                }
                return None;
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
                return None;
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
                return None;
            }
        }
    }
    if let Some(cluster) = state.cluster() {
        cluster.promote(connect.client_id.as_str(), &state);
    }
    let by_certificate = matches!(
        origin.as_deref(),
        Some(Origin::Certified(mqlb_config::IdentityAs::Username, _))
            | Some(Origin::Relayed(
                _,
                Some((mqlb_config::IdentityAs::Username, _))
            ))
    );
    let session = Session::start(connect, &mut wr, state, settings, by_certificate).await?;
    Some(Live {
        session,
        rd,
        wr,
        buf,
    })
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
    Relay(String, crate::cluster::handshake::PeerStream),
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
    identity: Option<(mqlb_config::IdentityAs, String)>,
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
            let target = relay_target(connect, state, cluster, relayed_by);
            match &target {
                // Served here, unless the copy to promote is a relayed one
                // a fresher copy may still replace (`Replicas::promotable`).
                None if !cluster.copy_settling(connect.client_id.as_str()) => {
                    return Placed::Here;
                }
                Some(target) if cluster.hears(target) => {
                    let left = deadline.saturating_duration_since(now);
                    let dial = cluster.dial_client(target, identity.clone());
                    if let Ok(Ok(up)) = tokio::time::timeout(left.min(RELAY_DIAL), dial).await {
                        return Placed::Relay(target.clone(), up);
                    }
                }
                None | Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Placed::Moving;
            }
            if !held {
                held = true;
                cluster.stats.held_connects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client_id = %connect.client_id, holder = ?target, "session moving: CONNECT held");
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
    mut up: crate::cluster::handshake::PeerStream,
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

/// What became of one packet.
enum Step {
    /// Handled; on to the next.
    Next,
    /// The connection ends.
    End(End),
    /// It cannot be handled yet (a 3.x client's QoS 2 PUBLISH over the
    /// unreleased limit): held back, with what follows it, until it can.
    /// Boxed: rare, and every step would otherwise be packet-sized.
    Blocked(Box<Packet>),
}

/// Replies that leave once a commit is confirmed.
struct Waiting {
    commit: Pin<Box<dyn Future<Output = Result<(), NotCommitted>> + Send>>,
    replies: Vec<u8>,
    /// The publishes these replies acknowledge, by QoS (see [`Acked`]).
    acked: Acked,
}

/// PUBLISHes acknowledged (PUBACK, PUBREC) in one batch of replies, and
/// when the batch was read: the publish latency histograms observe each
/// when its acknowledgement is written.
#[derive(Debug, Clone, Copy)]
struct Acked {
    read: std::time::Instant,
    /// QoS 1, QoS 2.
    count: [u32; 2],
}

impl Acked {
    fn new() -> Self {
        Acked {
            read: std::time::Instant::now(),
            count: [0; 2],
        }
    }

    /// Observes every acknowledgement in the batch as written now.
    fn written(self, latency: &[mqlb_metrics::Histogram; 2]) {
        if self.count == [0; 2] {
            return;
        }
        let took = self.read.elapsed();
        for (h, n) in latency.iter().zip(self.count) {
            h.observe_n(took, u64::from(n));
        }
    }
}

/// Most batches of replies waiting for commits before the client's
/// packets are no longer read: a client cannot outrun replication by more.
const MAX_WAITING: usize = 64;

/// Most packets a 3.x client may send behind a held-back QoS 2 PUBLISH
/// before its socket is no longer read.
const MAX_HELD_BACK: usize = 64;

/// The oldest waiting replies, once their commit is confirmed.
#[allow(clippy::box_collection)] // the field it borrows is boxed on purpose
async fn front_commit(
    waiting: &mut Option<Box<VecDeque<Waiting>>>,
) -> Result<(Vec<u8>, Option<Acked>), NotCommitted> {
    let Some(front) = waiting.as_mut().and_then(|w| w.front_mut()) else {
        return std::future::pending().await;
    };
    (&mut front.commit).await?;
    let (replies, acked) = waiting
        .as_mut()
        .and_then(|w| w.pop_front())
        .map(|w| (w.replies, Some(w.acked)))
        .unwrap_or_default();
    if waiting.as_ref().is_some_and(|w| w.is_empty()) {
        *waiting = None;
    }
    Ok((replies, acked))
}

/// Resolves when the stall ends; pending without one.
async fn stalled(stall: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>) {
    match stall {
        Some(s) => s.await,
        None => std::future::pending().await,
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
    state: Arc<Node>,
    rx: Arc<Outbox>,
    /// Inbound topic aliases (v5), made on first use.
    // One pointer in every idle connection instead of a 48-byte map.
    #[allow(clippy::box_collection)]
    aliases: Option<Box<HashMap<u16, MqttStr>>>,
    /// User name from CONNECT, for ACLs.
    username: Option<String>,
    /// Connected with the bridge bit (Mosquitto bridges): it may publish
    /// its own `$SYS/broker/connection/{client ID}/state`.
    bridge: bool,
    /// Change-log commits that the replies being made now wait for.
    commits: Option<Committed>,
    /// Replies waiting for their commits, oldest first (see
    /// [`Session::run`]). Boxed: most connections never have one.
    #[allow(clippy::box_collection)]
    waiting: Option<Box<VecDeque<Waiting>>>,
    /// Flow control: reads wait for this (see `Core::route`).
    stall: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// A PINGREQ came: its PINGRESP goes out at once, ahead of any reply
    /// still waiting for a commit.
    pong: bool,
    /// The connection was detached and its mailbox forgotten in one step
    /// ([`State::detach`]): nothing is left for `drop` to forget.
    detached: bool,
    /// A 3.x client's QoS 2 PUBLISH over [`RECEIVE_MAXIMUM`] unreleased
    /// ones, and what it sent after it (acknowledgements and pings aside),
    /// waiting for its PUBRELs. Boxed: rare.
    #[allow(clippy::box_collection)]
    held_back: Option<Box<VecDeque<Packet>>>,
    max_subscriptions: usize,
    /// PUBLISHes acknowledged in the batch of replies being made, by QoS
    /// (1, 2): see [`Acked`].
    acking: [u32; 2],
    /// When the batch of packets being handled was read: the clock is read
    /// once per batch, and the messages and core calls of the batch are
    /// stamped with it.
    now: std::time::Instant,
}

impl Drop for Session {
    /// However the connection's task ends (closed, or dropped when a node
    /// stops), the node forgets its mailbox.
    fn drop(&mut self) {
        if !self.detached {
            self.state.forget_mailbox(self.conn);
        }
    }
}

impl Session {
    async fn start(
        c: Box<Connect>,
        stream: &mut (impl AsyncWrite + Unpin),
        state: Arc<Node>,
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
        let bridge = c.bridge;
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
            // Bound first: a temporary in the condition would live across the
            // write, and every connection's future would carry the packet.
            let encoded = refuse(code).to_bytes(v);
            if let Ok(b) = encoded {
                let _ = stream.write_all(&b).await;
            }
            return None;
        }
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            if !v.is_v5() && !c.clean_start {
                // 3.1.1 (3.1.3-8): an empty ID needs a clean session.
                // Bound first: a temporary in the condition would live across the
                // write, and every connection's future would carry the packet.
                let encoded = refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID).to_bytes(v);
                if let Ok(b) = encoded {
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
                    properties: Arc::new(Properties {
                        will_delay_interval: None,
                        ..w.properties.clone()
                    }),
                    origin: Some(Arc::from(client_id.as_str())),
                    received: std::time::Instant::now(),
                },
                Duration::from_secs(u64::from(w.properties.will_delay_interval.unwrap_or(0))),
            ))
        });
        if expiry != Some(Duration::ZERO) && state.disk_full() {
            // A persistent session's attach is a change the data
            // directory must keep before the session is served; it cannot
            // take more now. The client comes back later.
            state
                .disk_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(client_id, "CONNECT refused: the data directory is full");
            let code = if v.is_v5() {
                ReasonCode::QUOTA_EXCEEDED
            } else {
                ReasonCode::SERVER_UNAVAILABLE
            };
            // Bound first: a temporary in the condition would live across the
            // write, and every connection's future would carry the packet.
            let encoded = refuse(code).to_bytes(v);
            if let Ok(b) = encoded {
                let _ = stream.write_all(&b).await;
            }
            return None;
        }
        let rx = Arc::new(Outbox::new(Encoder::new(
            v,
            c.properties.maximum_packet_size.unwrap_or(u32::MAX),
            c.properties.topic_alias_maximum.unwrap_or(0),
        )));
        let tx = rx.clone();
        let receive_maximum = c.properties.receive_maximum.unwrap_or(u16::MAX);
        let (connected, committed) =
            state.attach(&client_id, c.clean_start, expiry, receive_maximum, tx);
        // Boxed: only a cluster waits here, and the wait (with its
        // deadline's timer) would grow every connection's future.
        let connected_ok = if committed.is_done() {
            Ok(())
        } else {
            Box::pin(committed.wait()).await
        };
        if let Err(e) = connected_ok {
            // The session's new epoch is not on its chain: not served.
            state.not_committed(e);
            let _ = state.act(|core| core.disconnect(&client_id, connected.conn));
            state.forget_mailbox(connected.conn);
            // Bound first: a temporary in the condition would live across the
            // write, and every connection's future would carry the packet.
            let encoded = refuse(ReasonCode::SERVER_UNAVAILABLE).to_bytes(v);
            if let Ok(b) = encoded {
                let _ = stream.write_all(&b).await;
            }
            return None;
        }
        // Server Keep Alive (v5): cap what the client asked for.
        let mut keep_alive = c.keep_alive;
        let mut server_keep_alive = None;
        if let (true, Some(max)) = (v.is_v5(), settings.max_keep_alive) {
            if keep_alive == 0 || keep_alive > max {
                keep_alive = max;
                server_keep_alive = Some(max);
            }
        }
        // Encoded in a block: the packet is gone before the write, so
        // every connection's future does not carry it.
        let bytes = {
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
            Packet::Connack(Connack {
                session_present: connected.session_present,
                reason: ReasonCode::SUCCESS,
                properties: props,
            })
            .to_bytes(v)
        };
        let written = match &bytes {
            Ok(b) => stream.write_all(b).await.is_ok(),
            Err(_) => false,
        };
        if !written {
            let _ = state.act(|core| core.disconnect(&client_id, connected.conn));
            state.forget_mailbox(connected.conn);
            return None;
        }
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
            bridge,
            commits: None,
            waiting: None,
            stall: None,
            pong: false,
            detached: false,
            held_back: None,
            acking: [0; 2],
            now: std::time::Instant::now(),
            max_subscriptions: settings.max_subscriptions,
        })
    }

    /// Holds the replies being made now until `c` is committed, and the
    /// next read for its stall.
    fn wait_for(&mut self, mut c: Committed) {
        if let Some(stall) = c.take_stall() {
            self.stall.get_or_insert_with(|| Box::pin(stall.wait()));
        }
        if !c.is_done() {
            match &mut self.commits {
                Some(all) => all.merge(c),
                None => self.commits = Some(c),
            }
        }
    }

    /// Whether this connection takes more of the client's packets now:
    /// not while flow control holds it back, nor while too many replies
    /// wait for commits (the client outruns replication), nor while a 3.x
    /// client's held-back packets are at their bound.
    fn may_read(&self) -> bool {
        self.stall.is_none()
            && self.waiting.as_ref().is_none_or(|w| w.len() < MAX_WAITING)
            && self
                .held_back
                .as_ref()
                .is_none_or(|h| h.len() < MAX_HELD_BACK)
    }

    /// Queues `out` behind the replies still waiting, with the commits
    /// made for it; returns what may be written now, and the publishes
    /// it acknowledges.
    fn queue_replies(&mut self, out: Vec<u8>, mut acked: Acked) -> (Vec<u8>, Acked) {
        acked.count = std::mem::take(&mut self.acking);
        let commits = self.commits.take();
        let waiting = self.waiting.get_or_insert_with(Box::default);
        match commits {
            Some(c) => waiting.push_back(Waiting {
                commit: Box::pin(c.wait()),
                replies: out,
                acked,
            }),
            None => match waiting.back_mut() {
                Some(last) => {
                    last.replies.extend_from_slice(&out);
                    for (a, b) in last.acked.count.iter_mut().zip(acked.count) {
                        *a = a.saturating_add(b);
                    }
                }
                None => {
                    self.waiting = None;
                    return (out, acked);
                }
            },
        }
        acked.count = [0; 2];
        (Vec::new(), acked)
    }

    /// Handles what is buffered (packets held back first), appending
    /// replies to `out`.
    fn handle_buffered(&mut self, buf: &mut BytesMut, out: &mut Vec<u8>) -> Option<End> {
        loop {
            // Held-back packets go first, in order, while the first can.
            while let Some(p) = self.held_back.as_mut().and_then(|h| h.pop_front()) {
                match self.on_packet(p, out) {
                    Step::Next => {}
                    Step::End(end) => return Some(end),
                    Step::Blocked(p) => {
                        if let Some(h) = self.held_back.as_mut() {
                            h.push_front(*p);
                        }
                        break;
                    }
                }
            }
            if self.held_back.as_ref().is_some_and(|h| h.is_empty()) {
                self.held_back = None;
            }
            if !self.may_read() {
                return None;
            }
            let p = match decode(buf, self.version, self.limits) {
                Ok(Some(p)) => p,
                Ok(None) => return None,
                Err(e) => return Some(End::Violation(e.reason_code())),
            };
            let blocked = self.held_back.is_some();
            if blocked
                && !matches!(
                    p,
                    Packet::Pingreq
                        | Packet::Puback(_)
                        | Packet::Pubrec(_)
                        | Packet::Pubrel(_)
                        | Packet::Pubcomp(_)
                )
            {
                // Behind a held-back PUBLISH: order is kept.
                if let Some(h) = self.held_back.as_mut() {
                    h.push_back(p);
                }
                continue;
            }
            match self.on_packet(p, out) {
                Step::Next => {}
                Step::End(end) => return Some(end),
                Step::Blocked(p) => {
                    self.held_back
                        .get_or_insert_with(Box::default)
                        .push_back(*p);
                }
            }
        }
    }

    fn acked(
        &mut self,
        pid: mqlb_protocol::PacketId,
        kind: mqlb_protocol::PacketType,
        out: &mut Vec<u8>,
    ) {
        let id = &self.client_id;
        let (pubrel, c) = self
            .state
            .ask_at(self.now, |core| core.acked(id, pid, kind));
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
        // When the client last sent something (or this connection stopped
        // holding its reads back): the keep-alive counts from then.
        let mut heard = tokio::time::Instant::now();
        loop {
            // Packets already buffered first; their replies go out in one
            // write, once what they acknowledge is committed (at once on a
            // single node), in order behind earlier replies still waiting.
            // Reading goes on meanwhile, so PINGREQs are answered.
            let mut out = Vec::new();
            let read = Acked::new();
            self.now = read.read;
            let end = self.handle_buffered(buf, &mut out);
            let (mut now, acked) = self.queue_replies(out, read);
            if std::mem::take(&mut self.pong) {
                self.send(&mut now, Packet::Pingresp);
            }
            if !now.is_empty() && wr.write_all(&now).await.is_err() {
                return End::Lost;
            }
            acked.written(&self.state.publish_latency);
            if let Some(end) = end {
                // What the client sent before it left is acknowledged
                // first (its commits have their deadline).
                while self.waiting.is_some() {
                    match front_commit(&mut self.waiting).await {
                        Ok((replies, acked)) => {
                            if wr.write_all(&replies).await.is_err() {
                                return End::Lost;
                            }
                            if let Some(a) = acked {
                                a.written(&self.state.publish_latency);
                            }
                        }
                        Err(e) => {
                            self.not_committed(e);
                            return End::Closed(Closing::NotCommitted);
                        }
                    }
                }
                return end;
            }
            if !self.may_read() {
                // Held back by this node, not silent: the keep-alive waits.
                heard = tokio::time::Instant::now();
            }
            let reading = self.may_read();
            let committing = self.waiting.as_ref().is_some_and(|w| !w.is_empty());
            tokio::select! {
                r = read_lazily(rd, buf), if reading => match r {
                    Ok(0) | Err(_) => return End::Lost,
                    Ok(_) => heard = tokio::time::Instant::now(),
                },
                r = front_commit(&mut self.waiting), if committing => match r {
                    Ok((replies, acked)) => {
                        if wr.write_all(&replies).await.is_err() {
                            return End::Lost;
                        }
                        if let Some(a) = acked {
                            a.written(&self.state.publish_latency);
                        }
                    }
                    Err(e) => {
                        self.not_committed(e);
                        return End::Closed(Closing::NotCommitted);
                    }
                },
                () = stalled(&mut self.stall) => self.stall = None,
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
                _ = sleep_until(self.keep_alive.map(|k| heard + k)), if reading => {
                    tracing::debug!(client_id = %self.client_id, "keep-alive expired");
                    return End::Violation(ReasonCode::KEEP_ALIVE_TIMEOUT);
                }
            }
        }
    }

    /// A change a reply waited for was not committed: nothing more is
    /// acknowledged, and the connection closes (v5: DISCONNECT 0x80) so the
    /// client sends its unacknowledged publishes again.
    fn not_committed(&self, e: NotCommitted) {
        self.state.not_committed(e);
        tracing::warn!(client_id = %self.client_id, reason = e.label(), "a change was not committed; closing the connection unacknowledged");
    }

    /// A request to the state store: executed here, never routed; the
    /// response and any key notifications are routed instead, and the
    /// request is acknowledged once they are committed.
    fn on_state_store(&mut self, p: mqlb_protocol::Publish, out: &mut Vec<u8>) {
        let (qos, packet_id) = (p.qos, p.packet_id);
        let refused = self.state.statestore.refusal(&self.client_id, &p);
        let outcome = match (self.state.cluster(), refused) {
            (_, Some(code)) => crate::statestore::Outcome::Refuse(code),
            // In a cluster the key's owner answers, once its chain holds
            // the change: the acknowledgement waits for that.
            (Some(cluster), None) => {
                let state = self.state.state().clone();
                let c = cluster.store_request(&state, &self.client_id, p);
                self.wait_for(c);
                crate::statestore::Outcome::Route(Vec::new())
            }
            (None, None) => self.on_state_store_here(&p),
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
    }

    /// A state store request on a single node. On a durable node a change
    /// goes to the data directory first, and its answer (and any key
    /// notifications) is routed only once it is there: a client told
    /// "OK" can count on the key across a power loss. A read writes the
    /// key's state again and answers once that is there: everything logged
    /// before it is then on disk too, so what it read is not a change a
    /// power loss takes back (`cluster::store` does the same).
    fn on_state_store_here(&mut self, p: &mqlb_protocol::Publish) -> crate::statestore::Outcome {
        use crate::statestore::{Handled, Outcome};
        let handled = self
            .state
            .statestore
            .handle_in(&self.client_id, p, 0, &|_| true);
        let (outcome, entry) = match handled {
            Handled::Done {
                outcome,
                key: Some(key),
                copy,
            } if self.state.disk().is_some() => {
                let entry = match copy {
                    Some(copy) => crate::effects::LogEntry::Store { view: 0, copy },
                    None => crate::effects::LogEntry::StoreRead {
                        current: self.state.statestore.copy_of(&key).map(Box::new),
                        key,
                        view: 0,
                    },
                };
                (outcome, entry)
            }
            Handled::Done { outcome, .. } => return outcome,
            Handled::Elsewhere(_) => return Outcome::Route(Vec::new()),
        };
        let kept = self.state.log([entry]);
        let Outcome::Route(msgs) = outcome else {
            self.wait_for(kept);
            return outcome;
        };
        let state = self.state.state().clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if kept.wait().await.is_ok() {
                let routed = state.act(|core| {
                    let mut fx = crate::effects::Effects::none();
                    for m in msgs {
                        fx.extend(core.route(m));
                    }
                    fx
                });
                if routed.wait().await.is_ok() {
                    let _ = tx.send(());
                }
            }
        });
        self.wait_for(Committed::when(rx));
        Outcome::Route(Vec::new())
    }

    /// Whether `topic` is the broker's own, which no client may publish
    /// to whatever the ACLs say: `$SYS` (a forged `$SYS/broker/version`
    /// would be served to monitoring), but a bridge's own connection state
    /// as Mosquitto allows, and the state store's notifications.
    fn reserved(&self, topic: &str) -> bool {
        if topic == "$SYS" || topic.starts_with("$SYS/") {
            let own = topic
                .strip_prefix("$SYS/broker/connection/")
                .and_then(|r| r.strip_suffix("/state"))
                .is_some_and(|id| id == self.client_id);
            return !(self.bridge && own);
        }
        crate::statestore::broker_only(topic)
    }

    /// Handles one packet, appending replies to `out`.
    fn on_packet(&mut self, p: Packet, out: &mut Vec<u8>) -> Step {
        match p {
            Packet::Publish(mut p) => {
                if self.version.is_v5() {
                    if let Some(alias) = p.properties.topic_alias {
                        if alias > TOPIC_ALIAS_MAXIMUM {
                            return Step::End(End::Violation(ReasonCode::TOPIC_ALIAS_INVALID));
                        }
                        if p.topic.is_empty() {
                            match self.aliases.as_ref().and_then(|a| a.get(&alias)) {
                                Some(t) => p.topic = t.clone(),
                                None => {
                                    return Step::End(End::Violation(ReasonCode::PROTOCOL_ERROR))
                                }
                            }
                        } else {
                            self.aliases
                                .get_or_insert_with(Box::default)
                                .insert(alias, p.topic.clone());
                        }
                        p.properties.topic_alias = None;
                    }
                }
                if self.reserved(p.topic.as_str())
                    || !self.state.auth.may_publish(
                        self.username.as_deref(),
                        &self.client_id,
                        p.topic.as_str(),
                    )
                {
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
                    return Step::Next;
                }
                if p.topic.as_str() == crate::statestore::INVOKE_TOPIC {
                    self.on_state_store(p, out);
                    return Step::Next;
                }
                if p.qos != QoS::AtMostOnce && self.state.cluster().is_some_and(|c| !c.is_serving())
                {
                    // This node has handed its sessions over: an
                    // acknowledgement here could cover a message that
                    // reached nobody. The client sends it again elsewhere.
                    return Step::End(End::Closed(crate::outbox::Closing::ShuttingDown));
                }
                if p.qos != QoS::AtMostOnce && self.state.disk_full() {
                    // The data directory cannot take more: acknowledging
                    // would promise what cannot be kept. Deliveries go on.
                    self.state
                        .disk_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !self.version.is_v5() {
                        return Step::End(End::Closed(crate::outbox::Closing::NotCommitted));
                    }
                    let Some(pid) = p.packet_id else {
                        return Step::End(End::Violation(ReasonCode::PROTOCOL_ERROR));
                    };
                    let mut a = Ack::new(pid);
                    a.reason = ReasonCode::QUOTA_EXCEEDED;
                    match p.qos {
                        QoS::ExactlyOnce => self.send(out, Packet::Pubrec(a)),
                        _ => self.send(out, Packet::Puback(a)),
                    }
                    return Step::Next;
                }
                if let (QoS::ExactlyOnce, Some(pid), false) =
                    (p.qos, p.packet_id, self.version.is_v5())
                {
                    // 3.x has no Receive Maximum: a client with too many
                    // unreleased QoS 2 messages breaks no rule. It waits
                    // (with what it sends after) for its PUBRELs, and its
                    // socket is not read meanwhile, as Mosquitto does.
                    let limit = usize::from(RECEIVE_MAXIMUM);
                    if self.state.core().qos2_full(&self.client_id, pid, limit) {
                        return Step::Blocked(Box::new(Packet::Publish(p)));
                    }
                }
                let dup = p.dup;
                let msg = Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
                    properties: Arc::new(p.properties),
                    origin: Some(self.origin.clone()),
                    received: self.now,
                };
                match (p.qos, p.packet_id) {
                    (QoS::AtMostOnce, _) => {
                        let _ = self.state.act_at(self.now, |core| core.route(msg));
                    }
                    (QoS::AtLeastOnce, Some(pid)) => {
                        let c = self.state.act_at(self.now, |core| core.route(msg));
                        self.wait_for(c);
                        self.send(out, Packet::Puback(Ack::new(pid)));
                        self.acking[0] = self.acking[0].saturating_add(1);
                    }
                    (QoS::ExactlyOnce, Some(pid)) => {
                        // Exactly once: route on first receipt only, even
                        // across reconnects (the ids live in the session).
                        let id = &self.client_id;
                        let (first, c) = self.state.ask_at(self.now, |core| {
                            let (first, mut fx) =
                                core.qos2_received(id, pid, usize::from(RECEIVE_MAXIMUM));
                            match first {
                                Some(true) if dup => fx.extend(core.route_resent(msg)),
                                Some(true) => fx.extend(core.route(msg)),
                                Some(false) => fx.extend(core.qos2_resent(id, pid, &msg)),
                                None => {}
                            }
                            (first, fx)
                        });
                        if first.is_none() {
                            return Step::End(End::Violation(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
                        }
                        self.wait_for(c);
                        self.send(out, Packet::Pubrec(Ack::new(pid)));
                        self.acking[1] = self.acking[1].saturating_add(1);
                    }
                    _ => return Step::End(End::Violation(ReasonCode::PROTOCOL_ERROR)),
                }
            }
            Packet::Pubrel(a) => {
                let mut ack = Ack::new(a.packet_id);
                let id = &self.client_id;
                let (known, c) = self
                    .state
                    .ask_at(self.now, |core| core.qos2_released(id, a.packet_id));
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
            Packet::Pingreq => self.pong = true,
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
                return Step::End(End::Normal {
                    send_will: d.reason == ReasonCode::DISCONNECT_WITH_WILL,
                });
            }
            Packet::Connect(_) => return Step::End(End::Violation(ReasonCode::PROTOCOL_ERROR)),
            Packet::Auth(_) => {
                return Step::End(End::Violation(ReasonCode::BAD_AUTHENTICATION_METHOD))
            }
            // Server-to-client packets from a client.
            Packet::Connack(_) | Packet::Suback(_) | Packet::Unsuback(_) | Packet::Pingresp => {
                return Step::End(End::Violation(ReasonCode::PROTOCOL_ERROR))
            }
        }
        Step::Next
    }

    async fn finish(mut self, stream: &mut (impl AsyncWrite + Unpin), end: End) {
        let (send_will, disconnect) = match end {
            End::Normal { send_will } => (send_will, None),
            End::Lost => (true, None),
            End::Violation(code) => (true, Some(code)),
            End::Closed(Closing::TakenOver) => (true, Some(ReasonCode::SESSION_TAKEN_OVER)),
            // A session that outlives the shutdown keeps its will for the
            // client's return; one that ends now publishes it (3.1.2.5).
            End::Closed(c @ (Closing::ShuttingDown | Closing::NotCommitted)) => (
                self.state.core().ends_with_connection(&self.client_id),
                Some(c.reason_code()),
            ),
        };
        if let (Some(code), true) = (disconnect, self.version.is_v5()) {
            // Bound first: a temporary in the condition would live across the
            // write, and every connection's future would carry the packet.
            let encoded = Packet::Disconnect(Disconnect::new(code)).to_bytes(self.version);
            if let Ok(b) = encoded {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&b)).await;
            }
        }
        let _ = stream.shutdown().await;
        let (id, conn) = (&self.client_id, self.conn);
        // Whether the session ends is read in the same step that detaches
        // the connection and forgets its mailbox: one lock.
        let (session_ended, _) = self.state.detach(id, conn);
        self.detached = true;
        // Key notifications last as long as the client's session.
        if session_ended {
            match self.state.cluster() {
                Some(cluster) => cluster.store_forget(id, &self.state),
                None => drop(self.state.statestore.forget(id, 0, |_| true)),
            }
        }
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
                    let mut fx = core.schedule_will(id, will, delay);
                    fx.extend(core.publish_due_wills(std::time::Instant::now()));
                    fx
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
    use super::*;
    use crate::auth::Auth;
    use crate::core::Core;
    use crate::effects::ChangeLog;
    use mqlb_protocol::{PacketId, Publish, SubscriptionOptions};
    use tokio::io::DuplexStream;

    /// A change log whose commits never come (a chain member that hangs
    /// with its link up).
    #[derive(Debug, Default)]
    struct NeverCommits(std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<()>>>);

    impl ChangeLog for NeverCommits {
        fn append(&self, _: u64, _: Vec<crate::effects::LogEntry>) -> Committed {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
            Committed::when(rx)
        }
    }

    struct Peer {
        s: DuplexStream,
        buf: BytesMut,
        v: ProtocolVersion,
    }

    impl Peer {
        async fn send(&mut self, p: Packet) {
            let b = p.to_bytes(self.v).expect("encodes");
            self.s.write_all(&b).await.expect("written");
        }

        /// The next packet, or `None` on EOF.
        async fn recv(&mut self) -> Option<Packet> {
            loop {
                if let Some(p) = decode(&mut self.buf, self.v, 1 << 20).expect("valid") {
                    return Some(p);
                }
                if self.s.read_buf(&mut self.buf).await.ok()? == 0 {
                    return None;
                }
            }
        }
    }

    /// Connects a client of version `v` (keep-alive 5 s) to a connection
    /// task on `state`.
    async fn client(state: &Arc<State>, v: ProtocolVersion, id: &str) -> Peer {
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(handle(
            b,
            crate::node::Node::single(state.clone()),
            Settings::default(),
        ));
        let mut peer = Peer {
            s: a,
            buf: BytesMut::new(),
            v,
        };
        let c = Connect {
            version: v,
            bridge: false,
            clean_start: true,
            keep_alive: 5,
            properties: Properties::default(),
            client_id: MqttStr::try_from(id).expect("id"),
            will: None,
            username: None,
            password: None,
        };
        peer.send(Packet::Connect(Box::new(c))).await;
        match peer.recv().await {
            Some(Packet::Connack(a)) => assert_eq!(a.reason, ReasonCode::SUCCESS),
            other => panic!("no CONNACK: {other:?}"),
        }
        peer
    }

    fn publish(qos: QoS, pid: u16, topic: &str) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: MqttStr::try_from(topic).expect("topic"),
            packet_id: PacketId::new(pid),
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(b"x"),
        })
    }

    /// However a connection ends (a DISCONNECT, the client gone, a
    /// protocol violation), the node forgets its mailbox: none is left
    /// behind for a connection that is gone.
    #[tokio::test]
    async fn every_ended_connection_forgets_its_mailbox() {
        let state = Arc::new(State::new(
            Core::new(),
            Auth::open(),
            Arc::new(crate::effects::LocalLog::default()),
        ));
        let v = ProtocolVersion::V5;
        let mut clean = client(&state, v, "clean").await;
        let lost = client(&state, v, "lost").await;
        let mut bad = client(&state, v, "bad").await;
        assert_eq!(state.mailbox_count(), 3);
        clean
            .send(Packet::Disconnect(Disconnect::new(ReasonCode::SUCCESS)))
            .await;
        assert_eq!(clean.recv().await, None, "closed after its DISCONNECT");
        drop(lost);
        // A second CONNECT is a protocol violation.
        let again = Connect {
            version: v,
            bridge: false,
            clean_start: true,
            keep_alive: 5,
            properties: Properties::default(),
            client_id: MqttStr::try_from("bad").expect("id"),
            will: None,
            username: None,
            password: None,
        };
        bad.send(Packet::Connect(Box::new(again))).await;
        while let Some(p) = bad.recv().await {
            assert!(matches!(p, Packet::Disconnect(_)), "{p:?}");
        }
        let gone = tokio::time::timeout(Duration::from_secs(10), async {
            while state.mailbox_count() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "{} mailboxes left", state.mailbox_count());
    }

    /// A publisher waiting for a commit still gets its PINGRESPs (a
    /// keep-alive of 5 s would otherwise end it while a peer hangs), and
    /// at the commit deadline its publish is left unacknowledged: v5 is
    /// told (DISCONNECT 0x80), the connection closes, and it is counted.
    #[tokio::test(start_paused = true)]
    async fn a_publisher_waiting_for_a_commit_is_answered_then_told() {
        let state = State::new(Core::new(), Auth::open(), Arc::new(NeverCommits::default()));
        // An offline persistent subscriber: every publish to it is a
        // session change the log must commit.
        let tx = Arc::new(Outbox::default());
        let (connected, _) = state.attach("sub", false, None, 10, tx);
        let sub = crate::message::Sub {
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
            id: None,
        };
        let _ = state.ask(|core| core.subscribe("sub", "t/#", sub));
        let _ = state.act(|core| core.disconnect("sub", connected.conn));
        let mut p = client(&state, ProtocolVersion::V5, "pub").await;
        p.send(publish(QoS::AtLeastOnce, 1, "t/x")).await;
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            p.send(Packet::Pingreq).await;
            assert_eq!(
                p.recv().await,
                Some(Packet::Pingresp),
                "no PINGRESP while waiting"
            );
        }
        match p.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::UNSPECIFIED_ERROR),
            other => panic!("expected DISCONNECT 0x80, got {other:?}"),
        }
        let waited = started.elapsed();
        assert!(waited >= crate::effects::COMMIT_DEADLINE, "{waited:?}");
        assert_eq!(p.recv().await, None, "not closed");
        assert_eq!(
            state.not_committed[NotCommitted::Timeout as usize].load(Ordering::Relaxed),
            1
        );
    }

    /// A 3.1.1 client with 1,024 unreleased QoS 2 messages breaks no rule
    /// (3.1.1 has no Receive Maximum): its next one waits for a PUBREL
    /// instead of ending the connection, and pings are still answered.
    #[tokio::test]
    async fn a_3_1_1_client_over_the_qos2_window_is_held_back_not_cut() {
        let state = State::open();
        let v = ProtocolVersion::V3_1_1;
        let mut p = client(&state, v, "q2").await;
        let limit = RECEIVE_MAXIMUM;
        for pid in 1..=limit + 1 {
            p.send(publish(QoS::ExactlyOnce, pid, "q/x")).await;
        }
        p.send(Packet::Pingreq).await;
        let mut recs = Vec::new();
        loop {
            match p.recv().await {
                Some(Packet::Pubrec(a)) => recs.push(a.packet_id.get()),
                Some(Packet::Pingresp) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(recs, (1..=limit).collect::<Vec<_>>(), "over the window");
        p.send(Packet::Pubrel(Ack::new(PacketId::MIN))).await;
        assert_eq!(
            p.recv().await,
            Some(Packet::Pubcomp(Ack::new(PacketId::MIN)))
        );
        match p.recv().await {
            Some(Packet::Pubrec(a)) => assert_eq!(a.packet_id.get(), limit + 1),
            other => panic!("the held-back PUBLISH was not taken: {other:?}"),
        }
    }

    /// Every idle connection holds one of these futures: keep it small
    /// (it was 4.8 KB before the will and the CONNECT were boxed, and
    /// 1,960 B before packets were kept out of the states across writes).
    #[test]
    fn connection_future_stays_small() {
        let (a, _b) = tokio::io::duplex(64);
        let f = super::handle(
            a,
            crate::node::Node::single(crate::state::State::open()),
            super::Settings::default(),
        );
        let size = std::mem::size_of_val(&f);
        eprintln!("SIZE {size}");
        assert!(size <= 1664, "connection future is {size} bytes");
    }
}
