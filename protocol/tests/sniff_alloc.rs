//! The CONNECT sniffer runs on every new connection: prove it allocates
//! nothing on the happy path, with a counting global allocator. Only the
//! test's own thread is counted: the test harness's threads allocate when
//! they like (a CI run once saw 2 of theirs).

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::string_slice)]
// A global allocator cannot be written without `unsafe`; the library itself forbids it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use mqlb_protocol::{sniff_connect, Sniff};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread being measured. Const-initialised and without a
    /// destructor, so reading it never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards every call to `System` unchanged, only counting.

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn sniffing_a_v5_connect_allocates_nothing() {
    // v5 CONNECT: session expiry, user property, will with delay, user + password.
    let bytes: Vec<u8> = vec![
        0x10, 0x31, 0, 4, b'M', b'Q', b'T', b'T', 5, 0xEE, 0, 10, 0x0F, 0x11, 0, 0, 0, 30, 0x26, 0,
        1, b'k', 0, 1, b'v', 0x21, 0, 5, 0, 1, b'c', 5, 0x18, 0, 0, 0, 5, 0, 1, b'w', 0, 2, b'h',
        b'i', 0, 1, b'u', 0, 2, b'p', b'w',
    ];
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    let mut ids = 0;
    COUNTING.with(|c| c.set(true));
    for _ in 0..100 {
        match sniff_connect(&bytes, 65536) {
            Sniff::Connect { connect, .. } => {
                ids += connect.client_id.len();
                assert_eq!(connect.session_expiry_interval(), Some(30));
                assert_eq!(connect.properties.iter().count(), 3);
            }
            other => panic!("{other:?}"),
        }
    }
    COUNTING.with(|c| c.set(false));
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(ids, 100);
    assert_eq!(after - before, 0, "sniffer allocated");
}
