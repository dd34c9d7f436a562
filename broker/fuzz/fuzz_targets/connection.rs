//! Arbitrary bytes into the broker's connection handler, after a valid
//! CONNECT (v3.1.1 or v5, chosen by the first byte) or raw. Two clients share
//! one broker core, so routing, retained messages, wills and takeovers are
//! exercised too. The handler must never panic; time is paused, so keep-alive
//! and will-delay timers cost nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqlb_broker::conn::{handle, Settings};
use mqlb_broker::state::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECT_311: &[u8] = &[0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 5, 0, 2, b'f', b'z'];
const CONNECT_5: &[u8] = &[0x10, 0x0F, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 5, 0, 0, 2, b'f', b'z'];
const SUBSCRIBE_ALL: &[u8] = &[0x82, 0x06, 0, 1, 0, 1, b'#', 2];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let state = mqlb_broker::node::Node::single(State::open());
        // A well-behaved subscriber that receives whatever the fuzzer routes.
        let (mut sub, server) = tokio::io::duplex(1 << 16);
        let listener = tokio::spawn(handle(server, state.clone(), Settings { max_keep_alive: Some(30), ..Settings::default() }));
        let mut c = CONNECT_311.to_vec();
        c[15] = b's'; // client id "fs"
        sub.write_all(&c).await.ok();
        sub.write_all(SUBSCRIBE_ALL).await.ok();
        // The fuzzed client.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(handle(server, state, Settings::default()));
        let prefix: &[u8] = match mode % 3 {
            0 => CONNECT_311,
            1 => CONNECT_5,
            _ => &[],
        };
        client.write_all(prefix).await.ok();
        client.write_all(body).await.ok();
        let mut sink = vec![0u8; 1 << 16];
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut sink)).await;
        drop(client);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(120), task).await;
        drop(sub);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(120), listener).await;
    });
});
