//! The store against a real directory: what was acknowledged comes back,
//! and each fault it must survive is injected.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::ErrorKind;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use mqlb_storage::{Error, Failed, Options, Recovered, Store};

fn open(dir: &Path) -> (Store, Recovered) {
    Store::open(dir, Options::default()).expect("open")
}

/// Appends `seq` and waits until it is on disk (or failed).
fn put(store: &Store, seq: u64, data: &str) -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    store.append(
        seq,
        data.as_bytes().to_vec(),
        Box::new(move |r| drop(tx.send(r))),
    );
    rx.recv_timeout(Duration::from_secs(10)).expect("an answer")
}

fn datas(r: &Recovered) -> Vec<String> {
    r.records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.data).into_owned())
        .collect()
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn what_was_acknowledged_comes_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, found) = open(dir.path());
        assert_eq!(found.last_seq(), 0);
        for i in 1..=50 {
            put(&store, i, &format!("r{i}")).unwrap();
        }
    }
    let (store, found) = open(dir.path());
    assert_eq!(
        datas(&found),
        (1..=50).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
    assert_eq!(found.last_seq(), 50);
    put(&store, 51, "r51").unwrap();
    drop(store);
    assert_eq!(open(dir.path()).1.records.len(), 51);
}

/// Many appenders at once share fsyncs: fewer fsyncs than records.
#[test]
fn appends_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let (tx, rx) = mpsc::channel();
    for i in 1..=2000u64 {
        let tx = tx.clone();
        store.append(i, vec![0; 100], Box::new(move |r| drop(tx.send(r))));
    }
    for _ in 0..2000 {
        rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    }
    let fsyncs = store
        .stats()
        .fsyncs
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(fsyncs < 2000 / 4, "{fsyncs} fsyncs for 2000 records");
}

#[test]
fn a_snapshot_replaces_the_log_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        for i in 1..=10 {
            put(&store, i, &format!("r{i}")).unwrap();
        }
        let (tx, rx) = mpsc::channel();
        store.snapshot(10, b"state at 10".to_vec(), move |r| {
            let _ = tx.send(r.is_ok());
        });
        assert!(rx.recv().unwrap());
        put(&store, 11, "r11").unwrap();
        assert_eq!(
            segments(dir.path()).len(),
            1,
            "covered segments are deleted"
        );
    }
    let (_, found) = open(dir.path());
    let snap = found.snapshot.as_ref().unwrap();
    assert_eq!((snap.covers, &snap.data[..]), (10, &b"state at 10"[..]));
    assert_eq!(datas(&found), ["r11"]);
    assert_eq!(found.last_seq(), 11);
}

/// Power lost mid-append: the whole records before it come back, the
/// torn one is cut off, and the store takes appends again.
#[test]
fn a_torn_last_write_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        for i in 1..=3 {
            put(&store, i, "whole").unwrap();
        }
        store.faults().tear_next_write(30);
        assert!(put(&store, 4, "torn torn torn torn torn torn").is_err());
    }
    let (store, found) = open(dir.path());
    assert_eq!(datas(&found), ["whole", "whole", "whole"]);
    assert_eq!(found.torn_bytes, 30);
    put(&store, 4, "again").unwrap();
    drop(store);
    assert_eq!(open(dir.path()).1.records.len(), 4);
}

/// A flipped byte: the open is refused naming file and offset; a repair
/// truncates there and keeps what it cut in a .corrupt file.
#[test]
fn a_corrupt_record_refuses_to_open_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        for i in 1..=3 {
            put(&store, i, "0123456789").unwrap();
        }
    }
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let second = 20 + 10; // one header and payload in
    bytes[second + 25] ^= 0x10; // a payload byte of record 2
    std::fs::write(&seg, &bytes).unwrap();
    match Store::open(dir.path(), Options::default()) {
        Err(Error::Corrupt { path, offset, .. }) => {
            assert_eq!(path, seg);
            assert_eq!(offset, second as u64);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let msg = Store::open(dir.path(), Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("--repair") && msg.contains("offset 30"),
        "{msg}"
    );
    let (_, found) = Store::open(
        dir.path(),
        Options {
            repair: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(found.records.len(), 1);
    assert_eq!(found.repaired.len(), 1);
    assert_eq!(std::fs::read(&found.repaired[0]).unwrap().len(), 60);
    drop(found);
    // Repaired: it opens normally now.
    assert_eq!(open(dir.path()).1.records.len(), 1);
}

/// A full disk: the append waits (undone, retried, never skipped), the
/// store says it is full, and once there is room everything lands in
/// order with nothing damaged.
#[test]
fn a_full_disk_holds_appends_until_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    put(&store, 1, "before").unwrap();
    store.faults().fail_writes(Some(ErrorKind::StorageFull));
    let (tx, rx) = mpsc::channel();
    for (seq, d) in [(2, "during-1"), (3, "during-2")] {
        let tx = tx.clone();
        store.append(
            seq,
            d.as_bytes().to_vec(),
            Box::new(move |r| drop(tx.send(r))),
        );
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(800)).is_err(),
        "nothing lands while full"
    );
    assert!(store.is_full());
    store.faults().fail_writes(None);
    rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert!(!store.is_full());
    assert!(
        store
            .stats()
            .write_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    drop(store);
    assert_eq!(
        datas(&open(dir.path()).1),
        ["before", "during-1", "during-2"]
    );
}

/// A failed fsync fails the store: nothing more is acknowledged.
#[test]
fn a_failed_fsync_fails_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    put(&store, 1, "fine").unwrap();
    store.faults().fail_syncs();
    assert!(put(&store, 2, "lost").is_err());
    assert!(store.failed().is_some());
    assert!(put(&store, 3, "refused").is_err());
}

#[test]
fn max_disk_bytes_reports_full_until_a_snapshot_frees_room() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        dir.path(),
        Options {
            max_disk_bytes: Some(4096),
            ..Options::default()
        },
    )
    .unwrap();
    let mut seq = 0;
    while !store.is_full() {
        seq += 1;
        put(&store, seq, &"x".repeat(200)).unwrap();
        assert!(seq < 100);
    }
    let (tx, rx) = mpsc::channel();
    store.snapshot(seq, b"small".to_vec(), move |r| {
        let _ = tx.send(r.is_ok());
    });
    assert!(rx.recv().unwrap());
    assert!(!store.is_full());
}

#[test]
fn a_second_process_and_a_foreign_format_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let err = Store::open(dir.path(), Options::default()).unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err}");
    drop(store);
    std::fs::write(dir.path().join("FORMAT"), "mqlb-data 99\n").unwrap();
    let err = Store::open(dir.path(), Options::default()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("mqlb-data 99"), "{err}");
}

#[test]
fn a_backup_opens_with_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    for i in 1..=5 {
        put(&store, i, &format!("r{i}")).unwrap();
    }
    let (tx, rx) = mpsc::channel();
    store.snapshot(3, b"at 3".to_vec(), move |r| {
        let _ = tx.send(r.is_ok());
    });
    assert!(rx.recv().unwrap());
    put(&store, 6, "r6").unwrap();
    let to = dir.path().join("backup");
    let (tx, rx) = mpsc::channel();
    store.backup(&to, move |r| drop(tx.send(r.map_err(|e| e.to_string()))));
    rx.recv().unwrap().unwrap();
    let (_, found) = open(&to);
    assert_eq!(found.snapshot.as_ref().unwrap().covers, 3);
    assert_eq!(datas(&found), ["r4", "r5", "r6"]);
}

/// A disk that stays full does not let the waiting changes grow without
/// bound: past `max_pending_bytes` the store fails (the node stops and
/// restarts on what is on disk), and what waited is told so.
#[test]
fn a_disk_full_for_long_fails_the_store_rather_than_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        dir.path(),
        Options {
            max_pending_bytes: 4096,
            ..Options::default()
        },
    )
    .unwrap();
    put(&store, 1, "before").unwrap();
    store.faults().fail_writes(Some(ErrorKind::StorageFull));
    let (tx, rx) = mpsc::channel();
    for seq in 2..100u64 {
        let tx = tx.clone();
        store.append(seq, vec![0; 200], Box::new(move |r| drop(tx.send(r))));
        if store.failed().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        first.is_err(),
        "the waiting changes should be told they failed"
    );
    assert!(store.failed().is_some());
    drop(store);
    assert_eq!(
        datas(&open(dir.path()).1),
        ["before"],
        "nothing stored was damaged"
    );
}
