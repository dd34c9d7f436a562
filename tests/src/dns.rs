//! A tiny authoritative DNS server on loopback for discovery tests: A and
//! SRV answers from a zone the test edits while it runs, NXDOMAIN for
//! unknown names, and an outage switch (it stops answering).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// The records served.
#[derive(Debug, Default, Clone)]
pub struct Zone {
    /// Name (no trailing dot) → addresses.
    pub a: HashMap<String, Vec<Ipv4Addr>>,
    /// Name → (priority, weight, port, target).
    pub srv: HashMap<String, Vec<(u16, u16, u16, String)>>,
    /// TTL of every answer, seconds.
    pub ttl: u32,
    /// While true, queries go unanswered.
    pub down: bool,
}

/// The server; stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// The question's name (lowercase, no trailing dot), type, and where it ends.
fn question(q: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

fn answer(q: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    let (name, qtype, end) = question(q)?;
    let mut answers: Vec<Vec<u8>> = Vec::new();
    let known = zone.a.contains_key(&name) || zone.srv.contains_key(&name);
    let rr = |rtype: u16, rdata: Vec<u8>| {
        let mut r = vec![0xC0, 0x0C];
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&zone.ttl.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend(rdata);
        r
    };
    match qtype {
        1 => {
            for ip in zone.a.get(&name).into_iter().flatten() {
                answers.push(rr(1, ip.octets().to_vec()));
            }
        }
        33 => {
            for (prio, weight, port, target) in zone.srv.get(&name).into_iter().flatten() {
                let mut d = Vec::new();
                d.extend_from_slice(&prio.to_be_bytes());
                d.extend_from_slice(&weight.to_be_bytes());
                d.extend_from_slice(&port.to_be_bytes());
                put_name(&mut d, target);
                answers.push(rr(33, d));
            }
        }
        _ => {}
    }
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    let rcode: u16 = if known { 0 } else { 3 };
    let flags = 0x8400 | (u16::from(q[2] & 1) << 8) | 0x0080 | rcode;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q[12..end]);
    for a in answers {
        out.extend(a);
    }
    Some(out)
}

impl TestDns {
    /// Serves `zone` on a free loopback UDP port.
    pub async fn start(zone: Zone) -> TestDns {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(zone));
        let served = zone.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let reply = {
                    let z = served.lock().unwrap();
                    if z.down {
                        continue;
                    }
                    answer(&buf[..n], &z)
                };
                if let Some(r) = reply {
                    let _ = sock.send_to(&r, from).await;
                }
            }
        });
        TestDns { addr, zone, task }
    }

    /// Changes the zone.
    pub fn set(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.zone.lock().unwrap());
    }
}
