//! Byte-level MQTT for tests: hand-built packets and exact reads.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Encodes a remaining length.
fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A clean-session CONNECT with keep-alive 60 for the given level (3, 4 or 5,
/// optionally with the 0x80 bridge bit).
pub fn connect(client_id: &str, level: u8) -> Vec<u8> {
    connect_with(client_id, level, true)
}

/// [`connect`], with the session kept (`clean` false: 3.x clean session
/// 0; on v5 the session then never expires).
pub fn connect_with(client_id: &str, level: u8, clean: bool) -> Vec<u8> {
    let name: &[u8] = if level & 0x7F == 3 {
        b"MQIsdp"
    } else {
        b"MQTT"
    };
    let mut body = Vec::new();
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(name);
    body.push(level);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 && clean {
        body.push(0);
    } else if level == 5 {
        // Session Expiry Interval 0xFFFFFFFF: never.
        body.extend_from_slice(&[5, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    frame(0x10, &body)
}

/// A 3.1.1 PUBLISH of `payload` to `topic` at `qos` (0, 1 or 2), with
/// packet id `pid` when `qos` > 0.
pub fn publish(topic: &str, qos: u8, pid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

/// A frame from a first byte and body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// Reads exactly `n` bytes within `within`, or returns what arrived before
/// EOF or the deadline.
pub async fn read_n<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    n: usize,
    within: Duration,
) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    let _ = tokio::time::timeout(within, async {
        while got < n {
            match s.read(&mut out[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
    })
    .await;
    out.truncate(got);
    out
}

/// True if the peer closed (EOF or reset) within `within`.
pub async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Connects, sends a CONNECT for `id` at `level`, and returns the stream and
/// the CONNACK bytes read (4 for 3.x; v5 CONNACKs are read by length).
pub async fn connect_and_ack(addr: &str, id: &str, level: u8) -> (TcpStream, Vec<u8>) {
    connect_and_ack_with(addr, id, level, true).await
}

/// [`connect_and_ack`] with the session kept unless `clean`.
pub async fn connect_and_ack_with(
    addr: &str,
    id: &str,
    level: u8,
    clean: bool,
) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&connect_with(id, level, clean)).await.unwrap();
    let head = read_n(&mut s, 2, Duration::from_secs(5)).await;
    if head.len() < 2 {
        return (s, head);
    }
    let rest = read_n(&mut s, usize::from(head[1]), Duration::from_secs(5)).await;
    let mut ack = head;
    ack.extend(rest);
    (s, ack)
}
