//! Session snapshots arrive from other nodes: decoding arbitrary bytes must
//! never panic, and whatever decodes must re-encode to the same snapshot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqlb_broker::snapshot::SessionSnapshot;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SessionSnapshot::from_bytes(bytes::Bytes::copy_from_slice(data)) {
        let again = s.to_bytes().expect("a decoded snapshot encodes");
        assert_eq!(SessionSnapshot::from_bytes(again).expect("re-decodes"), s);
    }
});
