//! Lock-free counters, latency histograms and the standard `process_*`
//! metrics, written as Prometheus text, for the balancer and the broker.
//!
//! Why not the `prometheus-client` crate: every counter on a hot path here
//! is a plain atomic resolved once (an array indexed by a closed enum, so
//! label cardinality is bounded by the type), and exposition is a
//! `write!` per line. `prometheus-client`'s labelled families look a
//! label set up in a locked map on each increment unless every handle is
//! resolved and kept by hand, which is what these arrays already are; its
//! exposition would add an encoder and a registry for the same text. The
//! text is checked by a parser in the admin API tests instead.

use std::sync::atomic::{AtomicU64, Ordering};

/// Adds one to counter `i` of a family kept as an array indexed by an
/// enum's discriminant (an index out of range counts nothing: it cannot
/// happen for a total enum, and a panic would cost a connection).
pub fn bump(counters: &[AtomicU64], i: usize) {
    if let Some(c) = counters.get(i) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counter `i` of such a family.
pub fn value(counters: &[AtomicU64], i: usize) -> u64 {
    counters.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
}

/// Bucket upper bounds, in seconds: 50 µs to 5 s, for RTTs and latencies.
pub const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// A fixed-bucket latency histogram with lock-free recording.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        self.observe_n(d, 1);
    }

    /// Records `n` observations of the same duration (a batch of
    /// acknowledgements released together), with one update per field.
    pub fn observe_n(&self, d: std::time::Duration, n: u64) {
        if n == 0 {
            return;
        }
        let secs = d.as_secs_f64();
        if let Some(c) = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .and_then(|i| self.buckets.get(i))
        {
            c.fetch_add(n, Ordering::Relaxed);
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(n),
            Ordering::Relaxed,
        );
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends Prometheus text for this histogram with the given labels.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The standard `process_*` metrics (CPU, resident memory, open and maximum
/// file descriptors, start time), as Prometheus's client libraries name
/// them, read from `/proc/self`: what an operator graphs next to the
/// connection counts. Nothing is written where `/proc` cannot be read.
pub fn render_process(o: &mut String) {
    use std::fmt::Write as _;
    // Linux reports times in clock ticks and memory in pages: 100 Hz and
    // 4 KiB on every platform mqlb is built for.
    const TICKS: f64 = 100.0;
    const PAGE: u64 = 4096;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold
    // spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n).and_then(|f| f.parse::<u64>().ok());
    // utime, stime, starttime, rss: fields 14, 15, 22, 24 of stat(5), so
    // 11, 12, 19, 21 after the name.
    if let (Some(user), Some(system)) = (field(11), field(12)) {
        let _ = write!(
            o,
            "# HELP process_cpu_seconds_total User and system CPU time spent.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n",
            (user + system) as f64 / TICKS
        );
    }
    if let Some(rss) = field(21) {
        let _ = write!(
            o,
            "# HELP process_resident_memory_bytes Resident memory.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n",
            rss * PAGE
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    });
    if let (Some(boot), Some(start)) = (boot, field(19)) {
        let _ = write!(
            o,
            "# HELP process_start_time_seconds Start time since the Unix epoch.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}\n",
            boot as f64 + start as f64 / TICKS
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = write!(
            o,
            "# HELP process_open_fds Open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}\n",
            fds.count()
        );
    }
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = write!(
            o,
            "# HELP process_max_fds The open-file limit.\n# TYPE process_max_fds gauge\nprocess_max_fds {soft}\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe_n(Duration::from_millis(3), 2);
        h.observe(Duration::from_secs(9));
        let mut o = String::new();
        h.render(&mut o, "x_seconds", "k=\"v\"");
        assert!(
            o.contains("x_seconds_bucket{k=\"v\",le=\"0.00005\"} 1\n"),
            "{o}"
        );
        assert!(
            o.contains("x_seconds_bucket{k=\"v\",le=\"0.0025\"} 1\n"),
            "{o}"
        );
        assert!(
            o.contains("x_seconds_bucket{k=\"v\",le=\"0.005\"} 3\n"),
            "{o}"
        );
        assert!(o.contains("x_seconds_bucket{k=\"v\",le=\"5\"} 3\n"), "{o}");
        assert!(
            o.contains("x_seconds_bucket{k=\"v\",le=\"+Inf\"} 4\n"),
            "{o}"
        );
        assert!(o.contains("x_seconds_count{k=\"v\"} 4\n"), "{o}");
        h.observe_n(Duration::from_secs(1), 0);
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let mut o = String::new();
        render_process(&mut o);
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(o.contains(name), "{name} missing from\n{o}");
        }
    }
}
