//! The writer thread: the only code that writes the directory. It takes
//! jobs in order, writes every append that is waiting as one write, then
//! fsyncs once (group commit), so a burst of publishes costs one fsync.
//! It runs on its own thread: an fsync blocks, and must not hold up an
//! async worker.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::{record, sync_dir, Done, Error, Failed, Job, Options, Segment, Shared, SyncMode};

/// Most jobs taken into one group.
const MAX_GROUP: usize = 4096;
/// How often a failed write (a full disk) is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// One append waiting to be written.
struct Pending {
    seq: u64,
    data: Vec<u8>,
    done: Done,
}

pub(crate) struct Writer {
    dir: PathBuf,
    options: Options,
    shared: Arc<Shared>,
    /// Closed segments, oldest first.
    closed: Vec<Segment>,
    active: Segment,
    file: File,
    next_segment: u64,
    snapshot: Option<(PathBuf, u64)>,
    /// Appends not yet on disk, in order (after a failed write, they wait
    /// here to be tried again: none is ever skipped).
    pending: VecDeque<Pending>,
    /// Bytes of data in `pending`.
    pending_bytes: usize,
    buf: Vec<u8>,
    /// Held while the directory is open.
    _lock: File,
}

fn open_segment(dir: &Path, n: u64) -> io::Result<(File, PathBuf)> {
    let path = dir.join(format!("{n:010}.log"));
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    sync_dir(dir)?;
    Ok((file, path))
}

impl Writer {
    #[expect(
        clippy::too_many_arguments,
        reason = "called once, from Store::open, with what recovery found"
    )]
    pub(crate) fn new(
        dir: &Path,
        options: Options,
        shared: Arc<Shared>,
        closed: Vec<Segment>,
        next_segment: u64,
        snapshot: Option<PathBuf>,
        snapshot_bytes: u64,
        lock: File,
    ) -> Result<Writer, Error> {
        let (file, path) = open_segment(dir, next_segment).map_err(crate::io_at(dir))?;
        let w = Writer {
            dir: dir.to_path_buf(),
            options,
            shared,
            closed,
            active: Segment {
                path,
                max_seq: 0,
                bytes: 0,
            },
            file,
            next_segment: next_segment + 1,
            snapshot: snapshot.map(|p| (p, snapshot_bytes)),
            pending: VecDeque::new(),
            pending_bytes: 0,
            buf: Vec::new(),
            _lock: lock,
        };
        w.note_size();
        Ok(w)
    }

    pub(crate) fn run(&mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let first = if self.pending.is_empty() {
                match rx.recv() {
                    Ok(j) => Some(j),
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(RETRY) {
                    Ok(j) => Some(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut jobs: Vec<Job> = first.into_iter().collect();
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            for job in jobs {
                match job {
                    Job::Append { seq, data, done } => {
                        self.pending_bytes += data.len();
                        self.pending.push_back(Pending { seq, data, done });
                        if self.pending_bytes > self.options.max_pending_bytes
                            && self.shared.full.load(Ordering::Relaxed)
                        {
                            let limit = self.options.max_pending_bytes;
                            self.fail(format!(
                                "the disk stayed full while more than {limit} bytes of changes waited to be written"
                            ));
                        }
                    }
                    Job::Snapshot { covers, data, done } => {
                        self.flush();
                        done(self.write_snapshot(covers, &data));
                    }
                    Job::Backup { to, done } => {
                        self.flush();
                        done(self.backup(&to));
                    }
                }
            }
            self.flush();
        }
        // The store was dropped: one last try for what is still waiting.
        self.flush();
        let why = Failed("the store was closed before this was written".into());
        self.pending_bytes = 0;
        for p in self.pending.drain(..) {
            (p.done)(Err(why.clone()));
        }
    }

    /// Everything on disk: segments and the snapshot.
    fn note_size(&self) {
        let log: u64 = self.closed.iter().map(|s| s.bytes).sum::<u64>() + self.active.bytes;
        let snap = self.snapshot.as_ref().map_or(0, |s| s.1);
        let s = &self.shared.stats;
        s.bytes_on_disk.store(log + snap, Ordering::Relaxed);
        s.log_bytes.store(log, Ordering::Relaxed);
    }

    fn over_limit(&self) -> bool {
        self.options
            .max_disk_bytes
            .is_some_and(|m| self.shared.stats.bytes_on_disk.load(Ordering::Relaxed) >= m)
    }

    /// Fails the store for good: what waits and whatever comes later is
    /// told it will never be on disk.
    fn fail(&mut self, why: String) {
        tracing::error!(dir = %self.dir.display(), why, "the data directory cannot persist any more; nothing more is acknowledged");
        let f = self.shared.failed.get_or_init(|| Failed(why)).clone();
        self.pending_bytes = 0;
        for p in self.pending.drain(..) {
            (p.done)(Err(f.clone()));
        }
    }

    /// Writes what is pending (one write and one fsync per group, or per
    /// record in [`SyncMode::EachRecord`]).
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self.shared.failed.get().is_some() {
            let why = self
                .shared
                .failed
                .get()
                .map(|f| f.0.clone())
                .unwrap_or_default();
            return self.fail(why);
        }
        let each = self.options.sync == SyncMode::EachRecord;
        while !self.pending.is_empty() {
            let n = if each { 1 } else { self.pending.len() };
            if !self.write_group(n) {
                return;
            }
        }
        if self.active.bytes >= self.options.segment_bytes {
            self.rotate();
        }
    }

    /// Writes and fsyncs the first `n` pending appends; false if they
    /// could not be (they stay pending, or the store failed).
    fn write_group(&mut self, n: usize) -> bool {
        self.buf.clear();
        let mut max_seq = self.active.max_seq;
        for p in self.pending.iter().take(n) {
            record::encode(p.seq, &p.data, &mut self.buf);
            max_seq = p.seq;
        }
        match self.shared.faults.write(&mut self.file, &self.buf) {
            Ok(()) => {}
            Err(crate::Fault::Torn) => {
                // Injected power loss mid-write: the file is left as it
                // is, and nothing more is written.
                self.fail("power lost mid-write (injected)".into());
                return false;
            }
            Err(crate::Fault::Io(e)) => {
                self.shared
                    .stats
                    .write_errors
                    .fetch_add(1, Ordering::Relaxed);
                if !self.shared.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "a write to the data directory failed; new publishes that need storing are refused until it succeeds (it is retried)");
                }
                // Undo what part of it landed, so the file still ends
                // with a whole record.
                if let Err(e) = self.file.set_len(self.active.bytes) {
                    self.fail(format!("could not undo a failed write: {e}"));
                }
                return false;
            }
        }
        let started = Instant::now();
        if let Err(e) = self.shared.faults.sync(&self.file) {
            self.fail(format!("fsync failed: {e}"));
            return false;
        }
        let s = &self.shared.stats;
        s.fsync_seconds.observe(started.elapsed());
        s.fsyncs.fetch_add(1, Ordering::Relaxed);
        s.records.fetch_add(n as u64, Ordering::Relaxed);
        self.active.bytes += self.buf.len() as u64;
        self.active.max_seq = max_seq;
        self.note_size();
        let full = self.over_limit();
        if self.shared.full.swap(full, Ordering::Relaxed) && !full {
            tracing::info!(dir = %self.dir.display(), "the data directory takes writes again");
        }
        for p in self.pending.drain(..n) {
            self.pending_bytes = self.pending_bytes.saturating_sub(p.data.len());
            (p.done)(Ok(()));
        }
        true
    }

    /// Closes the active segment and begins the next.
    fn rotate(&mut self) {
        match open_segment(&self.dir, self.next_segment) {
            Ok((file, path)) => {
                self.next_segment += 1;
                self.file = file;
                let old = std::mem::replace(
                    &mut self.active,
                    crate::Segment {
                        path,
                        max_seq: 0,
                        bytes: 0,
                    },
                );
                self.closed.push(old);
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not begin a new log segment; the current one grows");
            }
        }
    }

    /// Writes a snapshot covering batches up to `covers` (to a temporary
    /// file, fsynced, renamed, the directory fsynced), then deletes the
    /// older snapshot and every closed segment it covers.
    fn write_snapshot(&mut self, covers: u64, data: &[u8]) -> io::Result<()> {
        if let Some(f) = self.shared.failed.get() {
            return Err(io::Error::other(f.0.clone()));
        }
        let name = format!("snapshot-{covers:020}.snap");
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let bytes = record::encode_snapshot(covers, data);
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some((old, _)) = self.snapshot.replace((path.clone(), bytes.len() as u64)) {
            if old != path {
                let _ = fs::remove_file(old);
            }
        }
        if self.active.bytes > 0 {
            self.rotate();
        }
        let dir = &self.dir;
        self.closed.retain(|s| {
            if s.max_seq > covers {
                return true;
            }
            match fs::remove_file(&s.path) {
                Ok(()) => false,
                Err(e) => {
                    tracing::warn!(file = %s.path.display(), error = %e, "could not delete a log segment a snapshot covers");
                    true
                }
            }
        });
        sync_dir(dir)?;
        self.shared.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        self.note_size();
        let full = self.over_limit();
        self.shared.full.store(full, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the directory as it is now (everything appended before the
    /// backup was asked for is on disk) to `to`.
    fn backup(&mut self, to: &Path) -> io::Result<()> {
        fs::create_dir(to)?;
        let copy = |from: &Path| -> io::Result<()> {
            let name = from
                .file_name()
                .ok_or_else(|| io::Error::other("a file without a name"))?;
            let dest = to.join(name);
            fs::copy(from, &dest)?;
            File::open(&dest)?.sync_all()
        };
        copy(&self.dir.join(crate::FORMAT_FILE))?;
        if let Some((snap, _)) = &self.snapshot {
            copy(snap)?;
        }
        for s in self.closed.iter().chain(std::iter::once(&self.active)) {
            copy(&s.path)?;
        }
        sync_dir(to)
    }
}
