//! Data directories (`--data-dir`, [`Config::disk`]): each node's change
//! log on a simulated disk that its crashes leave alone, read back by the
//! broker's own recovery when it starts again.
//!
//! What is the broker's own code: what a batch is written as
//! (`durable::encode`: each session change, copy change, eviction and
//! retained write as the cluster frame that carries it), the record format
//! with its checksums (`mqlb_storage::record::encode`), the scan that reads
//! the records back and cuts a torn last one (`record::scan`), and the
//! recovery that rebuilds sessions, copies and retained messages from them
//! (`durable::restore_at`), after which a cluster member keeps every
//! session as a copy until the view says whose it is
//! (`Replicas::restore`). The Raft state goes through the broker's own
//! persistence (`consensus::StateKeeper`), kept in memory here.
//!
//! The loop around them follows `DiskLog` and the storage engine's writer:
//! a batch handed on in log order is queued for the writer; the writer
//! writes what is queued, then fsyncs once for all of it (group commit); a
//! batch commits once its fsync is done and its chain members have it (the
//! node's own disk counts as one more acknowledgement it waits for). A
//! chain member acknowledges a copy's changes once they are on its disk
//! (`replication::answer_when`).
//!
//! Faults: a `kill -9` keeps what was written (the page cache survives the
//! process); a power loss of the whole site keeps what was fsynced and a
//! torn prefix of the rest (cut at any byte); a failed fsync stops the node
//! (the kernel may have dropped the pages it could not write: as a power
//! loss of that node) and it is restarted on its directory; a full disk
//! fails every write, which the writer undoes and tries again every 0.5 s,
//! in order, never skipping one.

use std::sync::Mutex;

use mqlb_broker::cluster::consensus::StateKeeper;
use mqlb_storage::record;

use super::*;

/// The storage engine's retry interval for a write that failed.
const WRITE_RETRY: Time = 500 * MS;

/// The writer's events on node `n`: a FIFO of their own.
fn disk_stream(n: usize) -> u64 {
    (14 << 32) | n as u64
}

/// What a node's data directory holds, and its writer's state.
#[derive(Debug, Default)]
pub(super) struct Disk {
    /// The log's bytes as written (on the platter or in the page cache).
    bytes: Vec<u8>,
    /// How many of them an fsync has made durable.
    synced: usize,
    /// Batches handed on and not yet written: (log number, payload, the
    /// number their commit waits under).
    queued: Vec<(u64, Vec<u8>, u64)>,
    /// The writer is at work (a write or an fsync is under way).
    busy: bool,
    /// The Raft state, saved by the broker's own persistence.
    raft: Arc<Mutex<Option<Vec<u8>>>>,
    /// Writes fail until then (a full disk).
    full_until: Time,
    /// The next fsync fails.
    fail_sync: bool,
}

impl Disk {
    /// The process died: what was queued in its memory is gone, and its
    /// writer with it (what was written stays).
    pub(super) fn process_died(&mut self) {
        self.queued.clear();
        self.busy = false;
        self.fail_sync = false;
    }
}

/// The Raft state, kept where a crash leaves it.
struct MemKeeper(Arc<Mutex<Option<Vec<u8>>>>);

impl StateKeeper for MemKeeper {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().map_err(|e| e.to_string())?.clone())
    }

    fn save(&self, bytes: &[u8]) -> Result<(), String> {
        *self.0.lock().map_err(|e| e.to_string())? = Some(bytes.to_vec());
        Ok(())
    }
}

/// A disk fault, drawn apart from the others (so runs without data
/// directories keep their schedules).
#[derive(Debug, Clone, Copy)]
pub(super) enum DiskFault {
    /// Every node loses power at once.
    PowerLoss,
    /// Node `n`'s next fsync fails.
    FsyncFails(usize),
    /// Node `n`'s disk is full for this long.
    Full(usize, Time),
}

impl World {
    /// Node `n`'s Raft state keeper: its data directory's, with
    /// [`Config::disk`].
    pub(super) fn raft_keeper(&self, n: usize) -> Option<Box<dyn StateKeeper>> {
        self.cfg
            .disk
            .then(|| Box::new(MemKeeper(self.nodes[n].disk.raft.clone())) as Box<dyn StateKeeper>)
    }

    /// `DiskLog::append`: what batch `log_seq` keeps, queued for the
    /// writer under `rep`; whether the batch waits for the disk.
    pub(super) fn disk_append(
        &mut self,
        n: usize,
        log_seq: u64,
        entries: &[LogEntry],
        rep: u64,
    ) -> bool {
        if !self.cfg.disk {
            return false;
        }
        let Some(data) = mqlb_broker::durable::encode(entries) else {
            return false;
        };
        self.nodes[n].disk.queued.push((log_seq, data, rep));
        if !self.nodes[n].disk.busy {
            self.nodes[n].disk.busy = true;
            let inc = self.nodes[n].inc;
            self.schedule(disk_stream(n), 0, Ev::DiskWrite { node: n, inc });
        }
        true
    }

    /// A copy's changes applied on `n` (`apply_replica`): with a data
    /// directory, numbered in its log; the gate resolves once they are on
    /// its disk. Refused (an older epoch than the copy's): nothing.
    pub(super) fn apply_copy(
        &mut self,
        n: usize,
        client: &str,
        epoch: u64,
        changes: Vec<SessionChange>,
    ) -> Option<usize> {
        let now = self.instant();
        let node = &mut self.nodes[n];
        let entry = mqlb_broker::cluster::seen::apply_copy(
            &mut node.replicas,
            &mut node.seen,
            client,
            epoch,
            changes,
            self.cfg.disk,
            now,
        )?;
        self.sequence(n, vec![entry])
    }

    /// `promote`: the disk's copy ends before the session's own records
    /// (a restart must not find it after the session ended).
    pub(super) fn copy_promoted(&mut self, n: usize, client: &str, epoch: u64) {
        if self.cfg.disk {
            self.sequence(
                n,
                vec![LogEntry::Replica {
                    client: client.to_string(),
                    epoch,
                    changes: vec![SessionChange::Ended],
                }],
            );
        }
    }

    /// The writer writes what is queued, then fsyncs once for it all.
    pub(super) fn disk_write(&mut self, n: usize, inc: u64) {
        if !self.nodes[n].up || self.nodes[n].inc != inc {
            return;
        }
        let now = self.now;
        let d = &mut self.nodes[n].disk;
        if d.queued.is_empty() {
            d.busy = false;
            return;
        }
        if now < d.full_until {
            // Undone and tried again, in order (`Store`'s writer).
            self.cov.disk_write_errors += 1;
            self.schedule(disk_stream(n), WRITE_RETRY, Ev::DiskWrite { node: n, inc });
            return;
        }
        let mut reps = Vec::new();
        for (seq, data, rep) in std::mem::take(&mut d.queued) {
            record::encode(seq, &data, &mut d.bytes);
            reps.push(rep);
        }
        let upto = d.bytes.len();
        let s = disk_stream(n);
        let k = self.streams.get(&s).map_or(0, |s| s.1);
        // An fsync takes 0.5-5 ms (a cloud volume), and now and then
        // 10-40 ms.
        let r = draw(self.seed, s, k);
        let took = if r.is_multiple_of(10) {
            within(r >> 8, 10 * MS, 40 * MS)
        } else {
            within(r >> 8, 500, 5 * MS)
        };
        self.cov.fsyncs += 1;
        self.schedule(
            s,
            took,
            Ev::DiskSynced {
                node: n,
                inc,
                upto,
                reps,
            },
        );
    }

    /// An fsync came back: its batches are on disk (each commits once its
    /// chain has it too); or it failed, and the node stops.
    pub(super) fn disk_synced(&mut self, n: usize, inc: u64, upto: usize, reps: Vec<u64>) {
        if !self.nodes[n].up || self.nodes[n].inc != inc {
            return;
        }
        if self.nodes[n].disk.fail_sync {
            // The node exits; what the fsync was to make durable may or
            // may not be on the platter. Restarted on its directory.
            self.nodes[n].disk.fail_sync = false;
            self.cov.fsync_failures += 1;
            self.tear(n);
            self.crash(n);
            return;
        }
        self.nodes[n].disk.synced = upto;
        let me = node_id(n);
        for rep in reps {
            let released = self.nodes[n].waits.acked(me, rep);
            self.released(n, released, false);
        }
        self.disk_write(n, inc);
    }

    /// Power lost at `n`: what was not fsynced is cut at any byte.
    fn tear(&mut self, n: usize) {
        let d = &mut self.nodes[n].disk;
        let unsynced = d.bytes.len() - d.synced;
        if unsynced == 0 {
            return;
        }
        let keep = within(
            draw(self.seed, disk_stream(n) | 1 << 16, self.cov.fsyncs),
            0,
            unsynced as Time,
        ) as usize;
        d.bytes.truncate(d.synced + keep);
        d.synced = d.bytes.len();
        self.cov.unsynced_bytes_lost += (unsynced - keep) as u64;
    }

    /// A disk fault, when the cluster's promise covers it (one failure at
    /// a time; a power loss takes every node, with none down before).
    pub(super) fn disk_fault(&mut self, f: DiskFault) {
        let down =
            self.nodes.iter().any(|n| !n.up || n.disk.fail_sync) || self.partitioned.is_some();
        let recent = self.now < self.last_join + 1_500 * MS && self.last_join > 0;
        match f {
            DiskFault::PowerLoss => {
                if down || recent {
                    self.cov.crashes_skipped += 1;
                    return;
                }
                // Aimed where it hurts: while some session holds messages
                // not yet delivered and some disk has writes not yet
                // fsynced (looked for again every 1 ms, for up to 2 s).
                let unsynced = self
                    .nodes
                    .iter()
                    .any(|n| n.disk.bytes.len() > n.disk.synced || !n.disk.queued.is_empty());
                let waiting = self.undelivered() && unsynced;
                if !waiting && self.power_tries < 2_000 {
                    self.power_tries += 1;
                    self.schedule_unordered(FAULTS | 7, MS, Ev::DiskFault(f));
                    return;
                }
                self.cov.power_losses += 1;
                self.cov.power_losses_undelivered += u64::from(waiting);
                for n in 0..self.nodes.len() {
                    self.tear(n);
                    self.crash(n);
                }
            }
            DiskFault::FsyncFails(n) => {
                if down || recent || self.spared_as_sole_holder(n) {
                    self.cov.crashes_skipped += 1;
                    return;
                }
                self.nodes[n].disk.fail_sync = true;
            }
            DiskFault::Full(n, d) => {
                if self.nodes[n].up {
                    self.cov.disks_full += 1;
                    self.nodes[n].disk.full_until = self.now + d;
                }
            }
        }
    }

    /// Whether a session on a live node holds messages it has not
    /// delivered (queued, or sent and not acknowledged).
    fn undelivered(&self) -> bool {
        self.nodes.iter().filter(|n| n.up).any(|n| {
            self.clients.iter().any(|c| {
                n.core
                    .export_session(&c.id)
                    .is_some_and(|s| !s.queued.is_empty() || !s.inflight.is_empty())
            })
        })
    }

    /// Draws the disk faults (with [`Config::disk`]) from a generator of
    /// their own.
    pub(super) fn schedule_disk_faults(&mut self) {
        if !self.cfg.disk || !self.cfg.faults {
            return;
        }
        let mut rng = Rng::new(mix(self.seed ^ 0xD15C));
        let nodes = self.nodes.len() as u64;
        let start = 200 * MS + self.warmup();
        let window = self.cfg.fault_window;
        let at = |rng: &mut Rng| start + rng.range(0, window);
        let mut faults = Vec::new();
        // A site-wide power loss in most runs.
        if rng.range(0, 9) < 7 {
            faults.push((at(&mut rng), DiskFault::PowerLoss));
        }
        for _ in 0..rng.range(0, 2) {
            let n = rng.range(0, nodes - 1) as usize;
            faults.push((at(&mut rng), DiskFault::FsyncFails(n)));
        }
        for _ in 0..rng.range(0, 2) {
            let n = rng.range(0, nodes - 1) as usize;
            let d = rng.range(100, 2_000) * MS;
            faults.push((at(&mut rng), DiskFault::Full(n, d)));
        }
        for (t, f) in faults {
            let now = self.now;
            self.now = t;
            self.schedule_unordered(FAULTS | 7, 0, Ev::DiskFault(f));
            self.now = now;
        }
    }

    /// Node `n` starts on its data directory: the records scanned (a torn
    /// last one cut off), the log read back into its core (retained
    /// messages) and its copies (every session, the newest of each), its
    /// log numbered on after the last record.
    pub(super) fn recover(&mut self, n: usize) {
        if !self.cfg.disk {
            return;
        }
        let (found, tail) = record::scan(&self.nodes[n].disk.bytes);
        let end = found.last().map_or(0, |f| f.end);
        match tail {
            record::Tail::Clean => {}
            record::Tail::Torn(_) => {
                self.cov.torn_records_cut += 1;
                self.nodes[n].disk.bytes.truncate(end);
                let d = &mut self.nodes[n].disk;
                d.synced = d.synced.min(end);
            }
            record::Tail::Corrupt(at, why) => {
                self.bad.push(format!(
                    "{}: data directory corrupt at {at}: {why}",
                    self.nodes[n].name
                ));
                return;
            }
        }
        let bytes = &self.nodes[n].disk.bytes;
        let recovered = mqlb_storage::Recovered {
            snapshot: None,
            records: found
                .iter()
                .map(|f| mqlb_storage::Record {
                    seq: f.seq,
                    data: bytes[f.start..f.end].to_vec(),
                })
                .collect(),
            torn_bytes: 0,
            repaired: Vec::new(),
        };
        let now = self.instant();
        let wall = self.wall(n);
        let wall_ms = self.wall_ms(n);
        let node = &mut self.nodes[n];
        node.core.advance(now);
        node.core.calibrate_wall(now, wall);
        let store = &node.store.store;
        match mqlb_broker::durable::restore_at(&mut node.core, store, &recovered, now, wall_ms) {
            Ok(restored) => {
                self.cov.sessions_read_back += restored.sessions.len() as u64;
                node.replicas.restore(restored.sessions);
                // What each was given (`restore_copies`): a promoted copy
                // is told it.
                for (client, prints) in restored.seen {
                    node.seen.note_prints(&client, prints, now);
                }
                node.log.start_after(restored.last_seq);
            }
            Err(e) => self
                .bad
                .push(format!("{}: data directory not read back: {e}", node.name)),
        }
    }
}
