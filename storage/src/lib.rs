//! A broker node's durable storage: its ordered change log written to
//! checksummed, append-only segment files in a data directory, fsynced in
//! groups, and snapshots that let the log be cut short.
//!
//! # Why a log of our own records, and not a storage engine's tables
//! The broker already turns everything it must keep into one ordered
//! change log (sessions' change records, retained writes, state store key
//! copies), numbered under its lock and consumed in order. Durability is
//! then "this batch is on disk": an append and an `fdatasync`. A key-value
//! engine would need each positional change (a message joined the back of
//! a queue, the front one left) turned into keys, written as pages of a
//! tree and fsynced the same. `benches/engines.rs` measures both on our
//! workload (small records, a delete for every acknowledgement, one fsync
//! per group); the numbers are in `docs/durability.md`. redb, the
//! candidate that needs no C++ toolchain, did a fraction of the log's
//! commits per second, and RocksDB (through `rust-rocksdb`) takes longer
//! to build on two cores than our whole test run. The parts that are
//! solved problems come from libraries: checksums from `crc32fast`, the
//! directory lock from std's `File::try_lock`. Nothing needs an index:
//! recovery reads the newest snapshot, then the records after it, in
//! order, and snapshots keep that bounded.
//!
//! # The directory
//! * `FORMAT`: the format version, written first: a directory from another
//!   version is refused with a clear message, never misread.
//! * `LOCK`: held (advisory `flock`) while a process has the directory
//!   open: a second process is refused.
//! * `NNNNNNNNNN.log`: segments of records ([`record`]), oldest first.
//! * `snapshot-SSSSSSSSSSSSSSSSSSSS.snap`: the state after every batch up
//!   to `S`; records numbered `S` or less are skipped on replay.
//!
//! # Faults
//! A torn last record (power lost mid-append) is cut off on open. A record
//! or snapshot whose checksum fails stops the open with the file and
//! offset; [`Options::repair`] then truncates there and moves the rest
//! aside to `.corrupt` files. A write that fails (a full disk) is undone
//! (the file is cut back) and retried in order, never skipped, while
//! [`Store::is_full`] tells the broker to refuse new work; a failed fsync
//! fails the store for good ([`Store::failed`]), since the kernel may
//! have dropped the dirty pages it could not write. [`Faults`] injects
//! each of these for tests.

pub mod record;
mod writer;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

/// The directory format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_FILE: &str = "FORMAT";
const LOCK_FILE: &str = "LOCK";

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Another process has the directory open.
    #[error(
        "data directory {0} is in use by another process (it holds the directory's LOCK file)"
    )]
    Locked(PathBuf),
    /// The directory was written by another format version.
    #[error("data directory {dir} has format {found:?}; this build reads format {FORMAT_VERSION} only (start the version that wrote it, or move the directory aside)")]
    Format {
        /// The directory.
        dir: PathBuf,
        /// What its FORMAT file says.
        found: String,
    },
    /// A record or snapshot failed its checksum.
    #[error("corrupt data in {path} at offset {offset}: {why}; start with --repair to truncate there (what follows is moved aside to a .corrupt file and logged)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// What did not check out.
        why: &'static str,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// When appended records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// One fsync covers every record that arrived during the previous one
    /// (group commit): throughput grows with load.
    #[default]
    Group,
    /// One fsync per record: what group commit saves, for benchmarks.
    EachRecord,
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// When records are fsynced.
    pub sync: SyncMode,
    /// Past this many bytes on disk the store reports itself full (new
    /// work that needs storing is refused; what is in flight still
    /// lands). `None`: only a full filesystem stops it.
    pub max_disk_bytes: Option<u64>,
    /// Truncate at the first corrupt record (or set a corrupt snapshot
    /// aside) instead of refusing to open.
    pub repair: bool,
    /// A segment is closed and a new one begun past this size.
    pub segment_bytes: u64,
    /// Most bytes of appends kept in memory while writes fail (a full
    /// disk): past it the store fails (the node stops and restarts on
    /// what is on disk) rather than let the waiting changes grow without
    /// bound.
    pub max_pending_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sync: SyncMode::Group,
            max_disk_bytes: None,
            repair: false,
            segment_bytes: 64 << 20,
            max_pending_bytes: 256 << 20,
        }
    }
}

/// A snapshot read back on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every batch numbered up to this is in it.
    pub covers: u64,
    /// What the broker wrote.
    pub data: Vec<u8>,
}

/// A record read back on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The batch number it was appended with.
    pub seq: u64,
    /// What the broker wrote.
    pub data: Vec<u8>,
}

/// What an open found: the newest snapshot, the records after it in
/// order, and what it had to cut.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The newest snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Records numbered after the snapshot, in order.
    pub records: Vec<Record>,
    /// Bytes of a torn last record that were cut off.
    pub torn_bytes: u64,
    /// Files or parts moved aside by a repair.
    pub repaired: Vec<PathBuf>,
}

impl Recovered {
    /// The number of the last batch recovered (0: none).
    pub fn last_seq(&self) -> u64 {
        self.records
            .last()
            .map(|r| r.seq)
            .or(self.snapshot.as_ref().map(|s| s.covers))
            .unwrap_or(0)
    }
}

/// The store failed and cannot be trusted to persist anything more (an
/// fsync failed): the node must stop taking part and restart from disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the data directory cannot persist: {0}")]
pub struct Failed(pub String);

/// Called once a record is on disk (`Ok`) or never will be (`Err`).
pub type Done = Box<dyn FnOnce(Result<(), Failed>) + Send>;

/// Injected I/O faults, for tests and the simulator: the store checks
/// them before each write and fsync.
#[derive(Debug, Default)]
pub struct Faults {
    write: Mutex<Option<io::ErrorKind>>,
    tear_after: Mutex<Option<usize>>,
    sync: AtomicBool,
}

impl Faults {
    /// Every write fails with `kind` (e.g. [`io::ErrorKind::StorageFull`])
    /// until called again with `None`.
    pub fn fail_writes(&self, kind: Option<io::ErrorKind>) {
        *lock(&self.write) = kind;
    }

    /// The next write stops after `n` bytes and fails: with the process
    /// then "losing power" (the store dropped), the file ends mid-record.
    pub fn tear_next_write(&self, n: usize) {
        *lock(&self.tear_after) = Some(n);
    }

    /// Every fsync fails from now on.
    pub fn fail_syncs(&self) {
        self.sync.store(true, Ordering::Relaxed);
    }

    fn write(&self, file: &mut File, buf: &[u8]) -> Result<(), Fault> {
        if let Some(kind) = *lock(&self.write) {
            return Err(Fault::Io(io::Error::new(kind, "injected write fault")));
        }
        if let Some(n) = lock(&self.tear_after).take() {
            file.write_all(buf.get(..n.min(buf.len())).unwrap_or_default())
                .map_err(Fault::Io)?;
            return Err(Fault::Torn);
        }
        file.write_all(buf).map_err(Fault::Io)
    }

    fn sync(&self, file: &File) -> io::Result<()> {
        if self.sync.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected fsync failure"));
        }
        file.sync_data()
    }
}

/// How a write failed.
enum Fault {
    /// The disk said no (full, or an I/O error): undone and retried.
    Io(io::Error),
    /// Injected: the power went mid-write.
    Torn,
}

/// What the store counts, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes in the directory's segments and snapshot.
    pub bytes_on_disk: AtomicU64,
    /// Bytes of log written since the last snapshot.
    pub log_bytes: AtomicU64,
    /// Records written.
    pub records: AtomicU64,
    /// fsyncs done.
    pub fsyncs: AtomicU64,
    /// How long each took.
    pub fsync_seconds: mqlb_metrics::Histogram,
    /// Writes that failed (each is retried).
    pub write_errors: AtomicU64,
    /// Snapshots written.
    pub snapshots: AtomicU64,
}

/// What the store's handle and its writer thread share.
#[derive(Debug, Default)]
struct Shared {
    stats: Stats,
    faults: Faults,
    /// The last write failed, or `max_disk_bytes` is reached.
    full: AtomicBool,
    failed: OnceLock<Failed>,
}

/// Work for the writer thread, in order.
enum Job {
    Append {
        seq: u64,
        data: Vec<u8>,
        done: Done,
    },
    Snapshot {
        covers: u64,
        data: Vec<u8>,
        done: Box<dyn FnOnce(io::Result<()>) + Send>,
    },
    Backup {
        to: PathBuf,
        done: Box<dyn FnOnce(io::Result<()>) + Send>,
    },
}

/// An open data directory. Appends go to a writer thread that batches
/// them into one write and one fsync; dropping the store finishes what
/// was appended, then closes the directory.
pub struct Store {
    dir: PathBuf,
    tx: Option<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

impl Store {
    /// Opens (or creates) `dir`, takes its lock, checks its format and
    /// reads back what it holds.
    pub fn open(dir: &Path, options: Options) -> Result<(Store, Recovered), Error> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(Error::Locked(dir.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(io_at(&lock_path)(e)),
        }
        check_format(dir)?;
        let found = recover(dir, &options)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let mut w = writer::Writer::new(
            dir,
            options,
            shared.clone(),
            found.files,
            found.next_segment,
            found.snapshot_path,
            found.snapshot_bytes,
            lock_file,
        )?;
        let thread = std::thread::Builder::new()
            .name("mqlb-storage".into())
            .spawn(move || w.run(rx))
            .map_err(io_at(dir))?;
        let store = Store {
            dir: dir.to_path_buf(),
            tx: Some(tx),
            shared,
            thread: Some(thread),
        };
        Ok((store, found.recovered))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends batch `seq` (each greater than the last); `done` is called
    /// once it is on disk, or with the failure that means it never will
    /// be.
    pub fn append(&self, seq: u64, data: Vec<u8>, done: Done) {
        if let Some(f) = self.shared.failed.get() {
            return done(Err(f.clone()));
        }
        self.send(Job::Append { seq, data, done });
    }

    /// Writes a snapshot of everything up to batch `covers`, then drops
    /// the segments it makes unnecessary; `done` says how it went.
    pub fn snapshot(
        &self,
        covers: u64,
        data: Vec<u8>,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) {
        self.send(Job::Snapshot {
            covers,
            data,
            done: Box::new(done),
        });
    }

    /// Copies the directory's snapshot and segments, as they are once
    /// everything appended so far is on disk, to `to` (which must not
    /// exist): a consistent backup a node can be started on.
    pub fn backup(&self, to: &Path, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        self.send(Job::Backup {
            to: to.to_path_buf(),
            done: Box::new(done),
        });
    }

    fn send(&self, job: Job) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            // The writer is gone only if it panicked: nothing will land.
            let f = Failed("the storage writer stopped".into());
            match job {
                Job::Append { done, .. } => done(Err(f)),
                Job::Snapshot { done, .. } | Job::Backup { done, .. } => {
                    done(Err(io::Error::other(f.0)))
                }
            }
        }
    }

    /// Whether new work that needs storing should be refused: the last
    /// write failed (a full disk) or `max_disk_bytes` is reached. What is
    /// already in flight still lands.
    pub fn is_full(&self) -> bool {
        self.shared.full.load(Ordering::Relaxed)
    }

    /// Why the store failed, once it has: nothing more will persist.
    pub fn failed(&self) -> Option<&Failed> {
        self.shared.failed.get()
    }

    /// What it counts.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Fault injection, for tests.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Prometheus text for the store.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write as _;
        let s = &self.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "# HELP mqlb_broker_disk_bytes Bytes in the data directory's log segments and snapshot.\n\
             # TYPE mqlb_broker_disk_bytes gauge\n\
             mqlb_broker_disk_bytes {}\n\
             # HELP mqlb_broker_disk_log_bytes Bytes of log written since the last snapshot.\n\
             # TYPE mqlb_broker_disk_log_bytes gauge\n\
             mqlb_broker_disk_log_bytes {}\n\
             # HELP mqlb_broker_disk_records_total Change-log batches written to disk.\n\
             # TYPE mqlb_broker_disk_records_total counter\n\
             mqlb_broker_disk_records_total {}\n\
             # HELP mqlb_broker_disk_fsyncs_total fsyncs of the change log (one covers every batch that arrived during the one before).\n\
             # TYPE mqlb_broker_disk_fsyncs_total counter\n\
             mqlb_broker_disk_fsyncs_total {}\n\
             # HELP mqlb_broker_disk_write_errors_total Writes to the data directory that failed (each is retried; a full disk refuses new publishes meanwhile).\n\
             # TYPE mqlb_broker_disk_write_errors_total counter\n\
             mqlb_broker_disk_write_errors_total {}\n\
             # HELP mqlb_broker_disk_snapshots_total Snapshots written (each lets older log segments go).\n\
             # TYPE mqlb_broker_disk_snapshots_total counter\n\
             mqlb_broker_disk_snapshots_total {}\n\
             # HELP mqlb_broker_disk_full 1 while new publishes that need storing are refused (a write failed, or max_disk_bytes is reached).\n\
             # TYPE mqlb_broker_disk_full gauge\n\
             mqlb_broker_disk_full {}\n\
             # HELP mqlb_broker_disk_fsync_seconds How long each fsync of the change log took.\n\
             # TYPE mqlb_broker_disk_fsync_seconds histogram",
            g(&s.bytes_on_disk),
            g(&s.log_bytes),
            g(&s.records),
            g(&s.fsyncs),
            g(&s.write_errors),
            g(&s.snapshots),
            u8::from(self.is_full()),
        );
        s.fsync_seconds
            .render(o, "mqlb_broker_disk_fsync_seconds", "dir=\"data\"");
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fsyncs a directory, so a file created or renamed in it survives a
/// power loss.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `FORMAT` into a new directory, or checks an existing one's.
fn check_format(dir: &Path) -> Result<(), Error> {
    let path = dir.join(FORMAT_FILE);
    let want = format!("mqlb-data {FORMAT_VERSION}\n");
    match fs::read_to_string(&path) {
        Ok(found) if found == want => Ok(()),
        Ok(found) => Err(Error::Format {
            dir: dir.to_path_buf(),
            found: found.trim().to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = dir.join("FORMAT.tmp");
            let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
            f.write_all(want.as_bytes()).map_err(io_at(&tmp))?;
            f.sync_all().map_err(io_at(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_at(&path))?;
            sync_dir(dir).map_err(io_at(dir))
        }
        Err(e) => Err(io_at(&path)(e)),
    }
}

/// A segment file and what is in it.
#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    /// Its highest record number (0: none).
    max_seq: u64,
    bytes: u64,
}

/// What [`recover`] found, for the writer.
struct Found {
    recovered: Recovered,
    files: Vec<Segment>,
    next_segment: u64,
    snapshot_path: Option<PathBuf>,
    snapshot_bytes: u64,
}

fn segment_number(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
}

fn snapshot_number(name: &str) -> Option<u64> {
    name.strip_prefix("snapshot-")?
        .strip_suffix(".snap")?
        .parse()
        .ok()
}

/// Moves `path` aside to `path.corrupt` (a repair), and says so.
fn set_aside(path: &Path, repaired: &mut Vec<PathBuf>) -> Result<(), Error> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside).map_err(io_at(path))?;
    tracing::warn!(file = %path.display(), moved_to = %aside.display(), "repair: moved corrupt data aside");
    repaired.push(aside);
    Ok(())
}

/// Reads the newest good snapshot and every segment, cutting a torn tail
/// and refusing (or, repairing, cutting at) corruption.
fn recover(dir: &Path, options: &Options) -> Result<Found, Error> {
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    let mut snapshots: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = segment_number(name) {
            segments.push((n, entry.path()));
        } else if let Some(n) = snapshot_number(name) {
            snapshots.push((n, entry.path()));
        } else if name.starts_with("snapshot-") && name.ends_with(".snap.tmp") {
            // A snapshot whose rename never happened: never used.
            let _ = fs::remove_file(entry.path());
        }
    }
    segments.sort();
    snapshots.sort();
    let mut recovered = Recovered::default();
    let mut snapshot_path = None;
    let mut snapshot_bytes = 0;
    while let Some((_, path)) = snapshots.pop() {
        let bytes = fs::read(&path).map_err(io_at(&path))?;
        match record::decode_snapshot(&bytes) {
            Ok((covers, data)) => {
                recovered.snapshot = Some(Snapshot {
                    covers,
                    data: data.to_vec(),
                });
                snapshot_bytes = bytes.len() as u64;
                snapshot_path = Some(path);
                break;
            }
            Err(why) if options.repair => {
                tracing::warn!(file = %path.display(), why, "repair: the newest snapshot is corrupt; using the one before it");
                set_aside(&path, &mut recovered.repaired)?;
            }
            Err(why) => {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    why,
                })
            }
        }
    }
    // Older snapshots are superseded.
    for (_, old) in snapshots {
        let _ = fs::remove_file(old);
    }
    let covers = recovered.snapshot.as_ref().map_or(0, |s| s.covers);
    let next_segment = segments.last().map_or(1, |(n, _)| n + 1);
    let mut files = Vec::new();
    let count = segments.len();
    let mut rest = segments.into_iter().enumerate();
    while let Some((i, (_, path))) = rest.next() {
        let bytes = fs::read(&path).map_err(io_at(&path))?;
        let (found, tail) = record::scan(&bytes);
        let mut max_seq = 0;
        for f in &found {
            max_seq = f.seq;
            if f.seq > covers {
                if recovered.records.last().is_some_and(|r| r.seq >= f.seq) {
                    return Err(Error::Corrupt {
                        path,
                        offset: (f.start - record::HEADER) as u64,
                        why: "record sequence number went back across segments",
                    });
                }
                recovered.records.push(Record {
                    seq: f.seq,
                    data: bytes.get(f.start..f.end).unwrap_or_default().to_vec(),
                });
            }
        }
        let last = i + 1 == count;
        let cut = match tail {
            record::Tail::Clean => None,
            record::Tail::Torn(at) if last => {
                let dropped = bytes.len() - at;
                tracing::warn!(file = %path.display(), offset = at, bytes = dropped, "the last record was torn (power lost while it was written); cut off");
                recovered.torn_bytes = dropped as u64;
                Some(at)
            }
            record::Tail::Torn(at) => {
                if !options.repair {
                    return Err(Error::Corrupt {
                        path,
                        offset: at as u64,
                        why: "a segment before the last ends mid-record",
                    });
                }
                Some(at)
            }
            record::Tail::Corrupt(at, why) => {
                if !options.repair {
                    return Err(Error::Corrupt {
                        path,
                        offset: at as u64,
                        why,
                    });
                }
                Some(at)
            }
        };
        if let Some(at) = cut {
            if !matches!(tail, record::Tail::Torn(_)) || !last {
                // Repair: the bad part and every later segment go aside.
                let mut aside = path.as_os_str().to_owned();
                aside.push(format!(".{at}.corrupt"));
                let aside = PathBuf::from(aside);
                fs::write(&aside, bytes.get(at..).unwrap_or_default()).map_err(io_at(&aside))?;
                tracing::warn!(file = %path.display(), offset = at, bytes = bytes.len() - at, moved_to = %aside.display(), "repair: truncated the log at a corrupt record");
                recovered.repaired.push(aside);
                for (_, (_, later)) in rest.by_ref() {
                    set_aside(&later, &mut recovered.repaired)?;
                }
            }
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_at(&path))?;
            f.set_len(at as u64).map_err(io_at(&path))?;
            f.sync_all().map_err(io_at(&path))?;
        }
        files.push(Segment {
            path,
            max_seq,
            bytes: cut.unwrap_or(bytes.len()) as u64,
        });
    }
    Ok(Found {
        recovered,
        files,
        next_segment,
        snapshot_path,
        snapshot_bytes,
    })
}
