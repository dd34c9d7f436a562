//! Cluster frames arrive from peers: decoding arbitrary bytes must never
//! panic or allocate without bound, and whatever decodes must encode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqlb_broker::cluster::wire::Frame;

fuzz_target!(|data: &[u8]| {
    let mut buf = bytes::BytesMut::from(data);
    // Several frames may share one read: decode until an error or more
    // bytes are needed.
    while let Ok(Some(f)) = Frame::decode(&mut buf) {
        let mut again = bytes::BytesMut::new();
        let _ = f.encode(&mut again);
    }
});
