//! One MQTT probe, the way a client sees the broker.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mqlb_protocol::{
    decode, Connect, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, Subscribe, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// 3.1.1 or 5.0.
    pub version: ProtocolVersion,
    /// Limit for each step (connect, CONNACK, PINGRESP, round trip).
    pub timeout: Duration,
    /// Unique per balancer instance and backend, so probes never take over
    /// each other's sessions. May be empty (the broker assigns one).
    pub client_id: String,
    /// Optional credentials.
    pub username: Option<String>,
    /// Optional credentials.
    pub password: Option<String>,
    /// Also subscribe to `deep_topic`, publish to it, and wait for the message.
    pub deep: bool,
    /// Topic for the deep check; the client ID is appended.
    pub deep_topic: String,
    /// Open with a PROXY protocol v2 LOCAL header, for brokers that expect
    /// one from this balancer (LOCAL: the proxy's own connection).
    pub proxy_local: bool,
    /// Speak TLS to the broker (after any PROXY header), as the data path
    /// does.
    pub tls: Option<crate::tls::TlsClient>,
    /// Speak MQTT over WebSocket, upgrading on this path (after TLS), as
    /// the data path does.
    pub websocket: Option<String>,
}

/// The PROXY protocol v2 LOCAL header: a connection of the proxy itself.
pub const PROXY_V2_LOCAL: [u8; 16] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00, 0x00,
];

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            version: ProtocolVersion::V3_1_1,
            timeout: Duration::from_secs(1),
            client_id: String::new(),
            username: None,
            password: None,
            deep: false,
            deep_topic: "mqlb/probe".into(),
            proxy_local: false,
            tls: None,
            websocket: None,
        }
    }
}

/// Round-trip times of a successful probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rtts {
    /// TCP connect + CONNECT → CONNACK.
    pub connack: Duration,
    /// PINGREQ → PINGRESP.
    pub ping: Duration,
    /// PUBLISH → the same message back, when the deep check ran.
    pub deep: Option<Duration>,
}

/// The probe step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// TCP connect.
    Connect,
    /// Waiting for CONNACK.
    Connack,
    /// Waiting for PINGRESP.
    Ping,
    /// Subscribe / publish / receive.
    Deep,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::Connack => "connack",
            Step::Ping => "ping",
            Step::Deep => "deep check",
        })
    }
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// TCP connect failed (refused, unreachable).
    Unreachable(String),
    /// A step did not finish within the timeout: the hung-broker case.
    Timeout(Step),
    /// The broker closed the connection during a step.
    Closed(Step),
    /// The broker refused the CONNECT (server unavailable, busy, ...).
    Refused(ReasonCode),
    /// The broker sent something that is not the expected MQTT.
    Protocol(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable(e) => write!(f, "unreachable: {e}"),
            Failure::Timeout(s) => write!(f, "timeout waiting for {s}"),
            Failure::Closed(s) => write!(f, "closed by broker during {s}"),
            Failure::Refused(c) => write!(f, "CONNACK refused: {c}"),
            Failure::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker serves MQTT.
    Up(Rtts),
    /// The broker is not serving.
    Down(Failure),
    /// The broker works but refuses us: bad credentials, not authorized,
    /// banned, unsupported version. Reported apart from "down" because the
    /// fix is in configuration, not in the broker.
    Misconfigured(ReasonCode),
}

impl Outcome {
    /// One line for logs and the CLI.
    pub fn summary(&self) -> String {
        match self {
            Outcome::Up(r) => {
                let mut s = format!(
                    "up connack_ms={:.2} ping_ms={:.2}",
                    r.connack.as_secs_f64() * 1e3,
                    r.ping.as_secs_f64() * 1e3
                );
                if let Some(d) = r.deep {
                    s.push_str(&format!(" roundtrip_ms={:.2}", d.as_secs_f64() * 1e3));
                }
                s
            }
            Outcome::Down(f) => format!("down {f}"),
            Outcome::Misconfigured(c) => format!("misconfigured CONNACK {c}"),
        }
    }
}

/// Classifies a refusing CONNACK reason code.
fn classify_refusal(code: ReasonCode) -> Outcome {
    match code {
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
        | ReasonCode::NOT_AUTHORIZED
        | ReasonCode::BANNED
        | ReasonCode::BAD_AUTHENTICATION_METHOD
        | ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
        | ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => Outcome::Misconfigured(code),
        other => Outcome::Down(Failure::Refused(other)),
    }
}

/// A minimal MQTT client connection for probing.
/// A probe's connection: TCP, or TLS over it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

struct Conn {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    version: ProtocolVersion,
    timeout: Duration,
}

impl Conn {
    async fn send(&mut self, p: &Packet) -> Result<(), Failure> {
        let bytes = p
            .to_bytes(self.version)
            .map_err(|e| Failure::Protocol(e.to_string()))?;
        self.stream
            .write_all(&bytes)
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))
    }

    /// Reads the next packet within the step timeout.
    async fn recv(&mut self, step: Step) -> Result<Packet, Failure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match decode(&mut self.buf, self.version, 1 << 20) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(Failure::Protocol(e.to_string())),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(Failure::Timeout(step)),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::Closed(step)),
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// Probes the broker at `addr` (`host:port`).
pub async fn probe(addr: &str, spec: &ProbeSpec) -> Outcome {
    let start = Instant::now();
    let stream = match tokio::time::timeout(spec.timeout, TcpStream::connect(addr)).await {
        Err(_) => return Outcome::Down(Failure::Timeout(Step::Connect)),
        Ok(Err(e)) => return Outcome::Down(Failure::Unreachable(e.to_string())),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    if spec.proxy_local {
        use tokio::io::AsyncWriteExt;
        if let Err(e) = stream.write_all(&PROXY_V2_LOCAL).await {
            return Outcome::Down(Failure::Unreachable(e.to_string()));
        }
    }
    let stream: Box<dyn Stream> = match &spec.tls {
        None => Box::new(stream),
        Some(tls) => match tls.connect(stream, spec.timeout).await {
            Ok(s) => Box::new(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Outcome::Down(Failure::Timeout(Step::Connect))
            }
            Err(e) => return Outcome::Down(Failure::Unreachable(format!("TLS: {e}"))),
        },
    };
    let stream: Box<dyn Stream> = match &spec.websocket {
        None => stream,
        Some(path) => {
            let upgrade = mqlb_listener::ws::connect(stream, addr, path);
            match tokio::time::timeout(spec.timeout, upgrade).await {
                Err(_) => return Outcome::Down(Failure::Timeout(Step::Connect)),
                Ok(Err(e)) => return Outcome::Down(Failure::Unreachable(e)),
                Ok(Ok(ws)) => Box::new(ws),
            }
        }
    };
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(256),
        version: spec.version,
        timeout: spec.timeout,
    };
    match run(&mut conn, spec, start).await {
        Ok(outcome) => outcome,
        Err(f) => Outcome::Down(f),
    }
}

fn str_field(s: &str) -> Result<MqttStr, Failure> {
    MqttStr::try_from(s).map_err(|e| Failure::Protocol(format!("invalid probe setting: {e}")))
}

async fn run(conn: &mut Conn, spec: &ProbeSpec, start: Instant) -> Result<Outcome, Failure> {
    let connect = Connect {
        version: spec.version,
        bridge: false,
        clean_start: true,
        keep_alive: 30,
        properties: Properties::default(),
        client_id: str_field(&spec.client_id)?,
        will: None,
        username: spec.username.as_deref().map(str_field).transpose()?,
        password: spec
            .password
            .as_ref()
            .map(|p| Bytes::from(p.clone().into_bytes())),
    };
    conn.send(&Packet::Connect(Box::new(connect))).await?;
    let connack = match conn.recv(Step::Connack).await? {
        Packet::Connack(c) => c,
        other => {
            return Err(Failure::Protocol(format!(
                "expected CONNACK, got {:?}",
                other.packet_type()
            )))
        }
    };
    if connack.reason != ReasonCode::SUCCESS {
        return Ok(classify_refusal(connack.reason));
    }
    let connack_rtt = start.elapsed();

    let t = Instant::now();
    conn.send(&Packet::Pingreq).await?;
    loop {
        match conn.recv(Step::Ping).await? {
            Packet::Pingresp => break,
            // A broker may deliver queued messages first; they are not ours to judge.
            Packet::Publish(_) => continue,
            other => {
                return Err(Failure::Protocol(format!(
                    "expected PINGRESP, got {:?}",
                    other.packet_type()
                )))
            }
        }
    }
    let ping_rtt = t.elapsed();

    let deep = if spec.deep {
        Some(deep_check(conn, spec).await?)
    } else {
        None
    };
    let _ = conn.send(&Packet::Disconnect(Default::default())).await;
    let _ = conn.stream.shutdown().await;
    Ok(Outcome::Up(Rtts {
        connack: connack_rtt,
        ping: ping_rtt,
        deep,
    }))
}

/// Subscribe, publish a nonce at QoS 1, and wait for it to come back.
async fn deep_check(conn: &mut Conn, spec: &ProbeSpec) -> Result<Duration, Failure> {
    let id = |n| PacketId::new(n).ok_or_else(|| Failure::Protocol("packet id".into()));
    let topic = str_field(&format!("{}/{}", spec.deep_topic, spec.client_id))?;
    conn.send(&Packet::Subscribe(Subscribe {
        packet_id: id(1)?,
        properties: Properties::default(),
        filters: vec![(
            topic.clone(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
    }))
    .await?;
    match conn.recv(Step::Deep).await? {
        Packet::Suback(s) if s.reasons.first().is_some_and(|c| c.0 <= 2) => {}
        Packet::Suback(s) => {
            return Err(Failure::Protocol(format!(
                "SUBACK refused: {:?}",
                s.reasons
            )))
        }
        other => {
            return Err(Failure::Protocol(format!(
                "expected SUBACK, got {:?}",
                other.packet_type()
            )))
        }
    }
    let nonce = Bytes::from(format!("{:016x}", fastrand::u64(..)).into_bytes());
    let t = Instant::now();
    conn.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic,
        packet_id: Some(id(2)?),
        properties: Properties::default(),
        payload: nonce.clone(),
    }))
    .await?;
    loop {
        match conn.recv(Step::Deep).await? {
            Packet::Publish(p) => {
                if let Some(pid) = p.packet_id {
                    if p.qos == QoS::AtLeastOnce {
                        conn.send(&Packet::Puback(mqlb_protocol::Ack::new(pid)))
                            .await?;
                    }
                }
                if p.payload == nonce {
                    return Ok(t.elapsed());
                }
            }
            Packet::Puback(_) => {}
            other => {
                return Err(Failure::Protocol(format!(
                    "unexpected {:?} in deep check",
                    other.packet_type()
                )))
            }
        }
    }
}
