//! Read buffers lent only while bytes move.
//!
//! An idle MQTT connection moves a PINGREQ a minute; giving each direction
//! of each proxied connection its own 16 KiB buffer for its whole life made
//! idle connections cost 20+ KiB. Instead a splice waits for readability
//! first, borrows a buffer for the read and the write that follows, and
//! returns it. Each worker thread keeps a few returned buffers for reuse, so
//! a busy proxy does not allocate per read either.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Size of one buffer: large enough that a busy stream moves in big reads.
pub const BUF_SIZE: usize = 16 * 1024;

/// Buffers each thread keeps for reuse; beyond this they are freed. Small:
/// a kept buffer is 16 KiB a thread holds for good (32 of them were 1 MiB
/// over two workers, a KiB per connection of a 1,000-client fleet; 8 still
/// showed in a fresh process's growth), and a fresh one costs one
/// allocation, next to a read of up to 16 KiB.
const KEEP: usize = 2;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer on loan; it goes back to the pool of the thread that drops it.
#[derive(Debug)]
pub struct Lent(Option<Box<[u8]>>);

/// Borrows a buffer of [`BUF_SIZE`] bytes.
pub fn lend() -> Lent {
    let buf = POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
    Lent(Some(buf))
}

impl Deref for Lent {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            // During thread teardown the pool may be gone: then just free.
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < KEEP {
                    p.push(buf);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_pool_is_bounded() {
        let a = lend();
        let ptr = a.as_ptr();
        assert_eq!(a.len(), BUF_SIZE);
        drop(a);
        let b = lend();
        assert_eq!(b.as_ptr(), ptr, "reused");
        drop(b);
        let many: Vec<Lent> = (0..KEEP * 2).map(|_| lend()).collect();
        drop(many);
        assert_eq!(POOL.with(|p| p.borrow().len()), KEEP);
    }
}
