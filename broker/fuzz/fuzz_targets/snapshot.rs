//! Session snapshots arrive from other nodes: decoding arbitrary bytes must
//! never panic, and whatever decodes must re-encode to the same snapshot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqlb_broker::snapshot::SessionSnapshot;

fuzz_target!(|data: &[u8]| {
    // Start past the magic most of the time, so the fuzzer explores the body.
    let mut input = Vec::with_capacity(data.len() + 6);
    // (Both layouts: the current one, and the one before the epoch's
    // change count, which data directories may still hold.)
    if data.first().is_some_and(|b| b % 8 != 0) {
        input.extend_from_slice(if data[0] % 2 == 0 { b"MQLBS2" } else { b"MQLBS3" });
        input.extend_from_slice(&data[1..]);
    } else {
        input.extend_from_slice(data);
    }
    if let Ok(s) = SessionSnapshot::from_bytes(bytes::Bytes::from(input)) {
        let again = s.to_bytes().expect("a decoded snapshot encodes");
        assert_eq!(SessionSnapshot::from_bytes(again).expect("re-decodes"), s);
    }
});
