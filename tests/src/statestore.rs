//! A state store client for tests: RESP3 requests over MQTT 5 as the
//! Azure IoT Operations protocol sends them, on the invoke topic, with the
//! response topic, correlation data and user properties it reads.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqlb_broker::statestore::INVOKE_TOPIC;
use mqlb_protocol::{Ack, MqttStr, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS};
use mqlb_statestore::resp3::array as resp;

use crate::client::{connect_packet, qos, Client};

pub const T: Duration = Duration::from_secs(5);

pub fn hlc(offset_ms: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    format!("{:015}:{:05}:test", now + offset_ms, 0)
}

/// A v5 client subscribed to its response topic (and its notify topics).
pub struct Caller {
    pub c: Client,
    id: String,
    response: String,
    next: u16,
    /// Notifications that arrived while waiting for a response.
    notes: Vec<Publish>,
}

pub fn user(p: &Publish, name: &str) -> Option<String> {
    p.properties
        .user_properties
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v.to_string())
}

impl Caller {
    pub async fn new(addr: &str, id: &str) -> Caller {
        let (mut c, ack) =
            Client::connect(addr, connect_packet(id, ProtocolVersion::V5, true)).await;
        assert_eq!(ack.reason.0, 0);
        let response = format!("clients/{id}/services/statestore/_any_/command/invoke/response");
        c.subscribe(&response, qos(QoS::AtLeastOnce)).await;
        let hex: String = id.bytes().map(|b| format!("{b:02X}")).collect();
        c.subscribe(
            &format!(
                "clients/statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8/{hex}/command/notify/+"
            ),
            qos(QoS::AtLeastOnce),
        )
        .await;
        Caller {
            c,
            id: id.to_string(),
            response,
            next: 1,
            notes: Vec::new(),
        }
    }

    pub fn props(&self, correlation: &[u8], ts: Option<String>, ft: Option<String>) -> Properties {
        let mut up = Vec::new();
        if let Some(ts) = ts {
            up.push((
                MqttStr::try_from("__ts").unwrap(),
                MqttStr::try_from(ts).unwrap(),
            ));
        }
        if let Some(ft) = ft {
            up.push((
                MqttStr::try_from("__ft").unwrap(),
                MqttStr::try_from(ft).unwrap(),
            ));
        }
        up.push((
            MqttStr::try_from("__srcId").unwrap(),
            MqttStr::try_from(self.id.clone()).unwrap(),
        ));
        Properties {
            response_topic: Some(MqttStr::try_from(self.response.clone()).unwrap()),
            correlation_data: Some(Bytes::copy_from_slice(correlation)),
            user_properties: up,
            ..Properties::default()
        }
    }

    /// Sends a request; returns the PUBACK reason (QoS 1) and the response
    /// with the same correlation data, if one came within `within`.
    pub async fn call_with(
        &mut self,
        payload: Vec<u8>,
        q: QoS,
        props: Properties,
        within: Duration,
    ) -> (Option<u8>, Option<Publish>) {
        self.next += 1;
        let pid = PacketId::new(self.next).unwrap();
        let correlation = props.correlation_data.clone();
        self.c
            .send(Packet::Publish(Publish {
                dup: false,
                qos: q,
                retain: false,
                topic: MqttStr::try_from(INVOKE_TOPIC).unwrap(),
                packet_id: (q != QoS::AtMostOnce).then_some(pid),
                properties: props,
                payload: Bytes::from(payload),
            }))
            .await;
        let mut puback = None;
        let mut response = None;
        let deadline = tokio::time::Instant::now() + within;
        while (puback.is_none() && q == QoS::AtLeastOnce) || response.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self.c.recv(left).await {
                Some(Packet::Puback(a)) if a.packet_id == pid => puback = Some(a.reason.0),
                Some(Packet::Publish(p)) => {
                    if let Some(id) = p.packet_id {
                        self.c.send(Packet::Puback(Ack::new(id))).await;
                    }
                    if p.topic.as_str() == self.response
                        && p.properties.correlation_data == correlation
                    {
                        response = Some(p);
                    } else {
                        self.notes.push(p);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        (puback, response)
    }

    /// A QoS 1 request with a fresh timestamp: its RESP3 reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        let props = self.props(b"c", Some(hlc(0)), None);
        let (ack, r) = self.call_with(resp(args), QoS::AtLeastOnce, props, T).await;
        assert_eq!(ack, Some(0));
        let r = r.expect("no response");
        assert_eq!(user(&r, "__stat").as_deref(), Some("200"));
        assert!(user(&r, "__ts").is_some(), "no __ts");
        assert_eq!(
            r.properties.content_type.as_ref().map(|c| c.as_str()),
            Some("application/octet-stream")
        );
        r.payload.to_vec()
    }

    /// The next key notification.
    pub async fn notification(&mut self) -> Publish {
        if !self.notes.is_empty() {
            return self.notes.remove(0);
        }
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.c.recv(left).await {
                Some(Packet::Publish(p)) => {
                    if let Some(id) = p.packet_id {
                        self.c.send(Packet::Puback(Ack::new(id))).await;
                    }
                    return p;
                }
                Some(_) => {}
                None => panic!("no notification"),
            }
        }
    }
}
