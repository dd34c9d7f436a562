//! Decoding cost of the hot packet: a QoS 1 PUBLISH with a 64-byte payload,
//! for 3.1.1 and 5.0, plus the CONNECT sniffer and the boundary tracker the
//! balancer runs on every connection. Run: `cargo bench -p mqlb-protocol`.

#![allow(missing_docs, clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mqlb_protocol::*;

fn publish(v: ProtocolVersion) -> Bytes {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: MqttStr::try_from("sensors/building-7/floor-3/temperature").unwrap(),
        packet_id: PacketId::new(42),
        properties: Properties::default(),
        payload: Bytes::from(vec![0x5A; 64]),
    })
    .to_bytes(v)
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let wire = publish(v);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("publish_qos1_64B_{}", v.label()), |b| {
            // The buffer copy is setup, not measured.
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| black_box(decode(buf, v, 1 << 20).unwrap().unwrap()),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    let connect = Packet::Connect(Box::new(Connect {
        version: ProtocolVersion::V5,
        bridge: false,
        clean_start: true,
        keep_alive: 60,
        properties: Properties {
            session_expiry_interval: Some(3600),
            ..Default::default()
        },
        client_id: MqttStr::try_from("device-0123456789").unwrap(),
        will: None,
        username: Some(MqttStr::try_from("fleet").unwrap()),
        password: Some(Bytes::from_static(b"secret")),
    }))
    .to_bytes(ProtocolVersion::V5)
    .unwrap();
    g.bench_function("sniff_connect_v5", |b| {
        b.iter(|| black_box(sniff_connect(black_box(&connect), 65536)))
    });
    let stream: Vec<u8> = std::iter::repeat_n(publish(ProtocolVersion::V3_1_1), 100)
        .flat_map(|b| b.to_vec())
        .collect();
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("boundary_tracker_100_publishes", |b| {
        b.iter(|| {
            let mut t = BoundaryTracker::default();
            t.feed(black_box(&stream)).unwrap();
            black_box(t.at_boundary())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
