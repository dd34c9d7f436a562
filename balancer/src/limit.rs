//! The concurrent-connection cap, resizable while connections are open.
//!
//! A semaphore with one permit per connection. Growing adds permits at
//! once. Shrinking forgets the permits that are free and records the rest
//! as a debt: connections that close while the debt is positive forget
//! their permit instead of returning it, so the cap converges to the new
//! value without closing anyone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A resizable cap on concurrent connections.
#[derive(Debug)]
pub struct ConnectionLimit {
    sem: Arc<Semaphore>,
    /// The cap in force; the lock serialises resizes.
    max: Mutex<usize>,
    /// Permits still to be forgotten when connections close.
    debt: AtomicUsize,
}

/// One connection's slot; returned (or forgotten, to pay a debt) on drop.
#[derive(Debug)]
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<ConnectionLimit>,
}

impl ConnectionLimit {
    /// A cap of `max` connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            sem: Arc::new(Semaphore::new(max)),
            max: Mutex::new(max),
            debt: AtomicUsize::new(0),
        })
    }

    /// Waits for a free slot; `None` once the limit is closed.
    pub async fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.sem.clone().acquire_owned().await.ok()?;
        Some(Slot {
            permit: Some(permit),
            limit: self.clone(),
        })
    }

    /// The cap in force.
    pub fn max(&self) -> usize {
        *self.max.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections that may still be accepted now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// Changes the cap. Open connections are never closed: above a lowered
    /// cap, new ones wait until enough of them have closed.
    pub fn resize(&self, new: usize) {
        let mut max = self.max.lock().unwrap_or_else(|p| p.into_inner());
        if new > *max {
            let mut add = new - *max;
            // Cancel outstanding debt before adding permits.
            let _ = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    let pay = d.min(add);
                    add -= pay;
                    Some(d - pay)
                });
            self.sem.add_permits(add);
        } else {
            let cut = *max - new;
            let forgotten = self.sem.forget_permits(cut);
            self.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        }
        *max = new;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let paid = self
            .limit
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if let (true, Some(p)) = (paid, self.permit.take()) {
            p.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_and_shrinks_without_closing_anyone() {
        let l = ConnectionLimit::new(3);
        let a = l.acquire().await.unwrap();
        let b = l.acquire().await.unwrap();
        assert_eq!(l.available(), 1);
        // Shrink below what is open: the free permit goes, one is owed.
        l.resize(1);
        assert_eq!(l.available(), 0);
        drop(a); // pays the debt
        assert_eq!(l.available(), 0);
        drop(b); // returns: one open slot for a cap of one
        assert_eq!(l.available(), 1);
        // Grow.
        l.resize(4);
        assert_eq!(l.available(), 4);
        assert_eq!(l.max(), 4);
    }

    #[tokio::test]
    async fn growing_cancels_debt_first() {
        let l = ConnectionLimit::new(2);
        let a = l.acquire().await.unwrap();
        let b = l.acquire().await.unwrap();
        l.resize(0); // two owed
        l.resize(1); // one owed
        drop(a); // pays it
        assert_eq!(l.available(), 0);
        drop(b);
        assert_eq!(l.available(), 1);
    }
}
