//! A small scripted MQTT client for conformance tests: it sends exactly the
//! packets a test asks for and hands back exactly what the broker sent, so a
//! test can script reconnects, missing acks and resends.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqlb_protocol::{
    decode, Ack, Connack, Connect, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish,
    QoS, Subscribe, SubscriptionOptions, Will,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A scripted client connection.
pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
    pub version: ProtocolVersion,
}

/// A CONNECT with sensible defaults; adjust fields before connecting.
pub fn connect_packet(id: &str, version: ProtocolVersion, clean: bool) -> Connect {
    Connect {
        version,
        bridge: false,
        clean_start: clean,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: MqttStr::try_from(id).unwrap(),
        will: None,
        username: None,
        password: None,
    }
}

/// A will for `connect_packet`.
pub fn will(topic: &str, payload: &str, delay: Option<u32>) -> Will {
    Will {
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: delay,
            ..Default::default()
        },
        topic: MqttStr::try_from(topic).unwrap(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

impl Client {
    /// Connects and returns the CONNACK.
    pub async fn connect(addr: &str, c: Connect) -> (Client, Connack) {
        let version = c.version;
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut client = Client {
            stream,
            buf: BytesMut::new(),
            version,
        };
        client.send(Packet::Connect(Box::new(c))).await;
        match client.recv(Duration::from_secs(5)).await {
            Some(Packet::Connack(a)) => (client, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects; `None` if the connection or the CONNACK did not come
    /// within 5 s (for tests where a node may be down).
    pub async fn try_connect(addr: &str, c: Connect) -> Option<(Client, Connack)> {
        let version = c.version;
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        stream.set_nodelay(true).ok()?;
        let mut client = Client {
            stream,
            buf: BytesMut::new(),
            version,
        };
        if !client.try_send(Packet::Connect(Box::new(c))).await {
            return None;
        }
        match client.recv(Duration::from_secs(5)).await {
            Some(Packet::Connack(a)) => Some((client, a)),
            _ => None,
        }
    }

    /// Sends one packet.
    pub async fn send(&mut self, p: Packet) {
        let b = p.to_bytes(self.version).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }

    /// Sends one packet; false if the connection is gone.
    pub async fn try_send(&mut self, p: Packet) -> bool {
        let Ok(b) = p.to_bytes(self.version) else {
            return false;
        };
        self.stream.write_all(&b).await.is_ok()
    }

    /// The next packet within `within`; `None` on timeout or close.
    pub async fn recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(p)) = decode(&mut self.buf, self.version, 1 << 20) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// The next PUBLISH, acknowledging it per its QoS (unless `ack` is false).
    pub async fn next_publish(&mut self, within: Duration, ack: bool) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                Packet::Publish(p) => {
                    if ack {
                        match (p.qos, p.packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => {
                                self.send(Packet::Puback(Ack::new(id))).await
                            }
                            (QoS::ExactlyOnce, Some(id)) => {
                                self.send(Packet::Pubrec(Ack::new(id))).await;
                                // The PUBREL follows; answer it when seen.
                            }
                            _ => {}
                        }
                    }
                    return Some(p);
                }
                Packet::Pubrel(a) => self.send(Packet::Pubcomp(Ack::new(a.packet_id))).await,
                _ => {}
            }
        }
    }

    /// Subscribes and returns the SUBACK codes.
    pub async fn subscribe(&mut self, filter: &str, options: SubscriptionOptions) -> Vec<u8> {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).unwrap(),
            properties: Properties::default(),
            filters: vec![(MqttStr::try_from(filter).unwrap(), options)],
        }))
        .await;
        loop {
            match self.recv(Duration::from_secs(5)).await {
                Some(Packet::Suback(s)) => return s.reasons.iter().map(|r| r.0).collect(),
                Some(_) => continue,
                None => panic!("no SUBACK"),
            }
        }
    }

    /// Publishes and completes the QoS handshake.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
        properties: Properties,
    ) {
        let pid = PacketId::new(77).unwrap();
        self.send(Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: MqttStr::try_from(topic).unwrap(),
            packet_id: (qos != QoS::AtMostOnce).then_some(pid),
            properties,
            payload: Bytes::copy_from_slice(payload),
        }))
        .await;
        // Bounded: a missing acknowledgement fails the test instead of
        // hanging it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let wait_for = |what: &str| {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} within 30 s for a publish to {topic}"
            );
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => loop {
                if let Some(Packet::Puback(_)) = self.recv(Duration::from_secs(5)).await {
                    break;
                }
                wait_for("PUBACK");
            },
            QoS::ExactlyOnce => {
                loop {
                    if let Some(Packet::Pubrec(_)) = self.recv(Duration::from_secs(5)).await {
                        break;
                    }
                    wait_for("PUBREC");
                }
                self.send(Packet::Pubrel(Ack::new(pid))).await;
                loop {
                    if let Some(Packet::Pubcomp(_)) = self.recv(Duration::from_secs(5)).await {
                        break;
                    }
                    wait_for("PUBCOMP");
                }
            }
        }
    }
}

/// Subscription options with just a QoS.
pub fn qos(q: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: q,
        ..Default::default()
    }
}
