//! Our workload on two engines, same machine, same disk: a broker's
//! durable change log (small records: a message joining a queue, then the
//! acknowledgement that removes it), with 64 publishes always waiting for
//! their commit, as a pipelined publisher load keeps them, so each commit
//! covers whatever arrived during the one before (group commit); and with
//! one commit per record.
//!
//! * `log`: this crate (append + one fdatasync per group, on its writer
//!   thread).
//! * `redb`: a copy-on-write B-tree; each message a key, each
//!   acknowledgement a delete, one durable transaction per group, driven
//!   by the same kind of writer thread.
//!
//! `cargo bench -p mqlb-storage --bench engines` (figures in
//! docs/durability.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::time::Instant;

use mqlb_storage::{Options, Store, SyncMode};

const TABLE: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("messages");

/// Publishes waiting for their commit at any time.
const IN_FLIGHT: u64 = 64;

/// Keeps [`IN_FLIGHT`] records waiting until `records` are committed;
/// `submit(seq, done)` hands one to the engine. Records per second.
fn drive(records: u64, mut submit: impl FnMut(u64, mpsc::Sender<()>)) -> f64 {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let mut seq = 0;
    while seq < IN_FLIGHT.min(records) {
        seq += 1;
        submit(seq, tx.clone());
    }
    for _ in 0..records {
        rx.recv().unwrap();
        if seq < records {
            seq += 1;
            submit(seq, tx.clone());
        }
    }
    records as f64 / started.elapsed().as_secs_f64()
}

fn log(records: u64, sync: SyncMode) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        dir.path(),
        Options {
            sync,
            ..Options::default()
        },
    )
    .unwrap();
    let rate = drive(records, |seq, done| {
        // Half the records are messages joining a queue, half the
        // acknowledgements removing one.
        let data = if seq % 2 == 1 {
            vec![7u8; 150]
        } else {
            vec![1u8; 24]
        };
        store.append(
            seq,
            data,
            Box::new(move |r| {
                assert!(r.is_ok());
                let _ = done.send(());
            }),
        );
    });
    let fsyncs = store
        .stats()
        .fsyncs
        .load(std::sync::atomic::Ordering::Relaxed);
    (rate, records / fsyncs.max(1))
}

fn redb(records: u64, per_record: bool) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("bench.redb")).unwrap();
    let (tx, rx) = mpsc::channel::<(u64, mpsc::Sender<()>)>();
    let writer = std::thread::spawn(move || {
        let message = vec![7u8; 150];
        let mut commits = 0u64;
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            if !per_record {
                group.extend(rx.try_iter());
            }
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(TABLE).unwrap();
                for (seq, _) in &group {
                    if seq % 2 == 1 {
                        t.insert(*seq, message.as_slice()).unwrap();
                    } else {
                        t.remove(seq - 1).unwrap();
                    }
                }
            }
            txn.commit().unwrap();
            commits += 1;
            for (_, done) in group {
                let _ = done.send(());
            }
        }
        commits
    });
    let rate = drive(records, |seq, done| tx.send((seq, done)).unwrap());
    drop(tx);
    let commits = writer.join().unwrap();
    (rate, records / commits.max(1))
}

fn median(mut v: Vec<(f64, u64)>) -> (f64, u64) {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn main() {
    let rounds = 5;
    let grouped = 64_000;
    let single = 2_000;
    let rows = [
        (
            "log, group commit",
            median((0..rounds).map(|_| log(grouped, SyncMode::Group)).collect()),
        ),
        (
            "redb, group commit",
            median((0..rounds).map(|_| redb(grouped, false)).collect()),
        ),
        (
            "log, fsync per record",
            median(
                (0..rounds)
                    .map(|_| log(single, SyncMode::EachRecord))
                    .collect(),
            ),
        ),
        (
            "redb, commit per record",
            median((0..rounds).map(|_| redb(single, true)).collect()),
        ),
    ];
    println!("records committed per second, median of {rounds} ({IN_FLIGHT} waiting at any time):");
    println!(
        "  {:<26} {:>10} {:>18}",
        "engine", "records/s", "records per commit"
    );
    for (name, (rate, per)) in rows {
        println!("  {name:<26} {rate:>10.0} {per:>18}");
    }
}
