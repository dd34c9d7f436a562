//! The open-file limit. Every proxied connection costs the balancer two
//! file descriptors, so the default soft limit (often 1,024) caps a fleet at
//! about 500 clients. At start-up the soft limit is raised to the hard one,
//! as HAProxy does, and a configuration whose `max_connections` cannot fit
//! is reported with the numbers.
//!
//! Uses the `rlimit` crate: a small, safe wrapper over getrlimit/setrlimit,
//! so this crate keeps `unsafe` out.

/// Descriptors kept for listeners, the admin API, health probes, DNS and
/// log files, beyond the two per proxied connection.
pub const SLACK: u64 = 64;

/// Descriptors `max_connections` proxied clients need, probes to `backends`
/// included.
pub fn needed(max_connections: usize, backends: usize) -> u64 {
    (max_connections as u64).saturating_mul(2) + backends as u64 + SLACK
}

/// Raises the soft limit to the hard limit; returns the limit in force.
pub fn raise() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// How many proxied clients `limit` descriptors hold with `backends`.
pub fn fits(limit: u64, backends: usize) -> usize {
    usize::try_from(limit.saturating_sub(backends as u64 + SLACK) / 2).unwrap_or(usize::MAX)
}

/// A warning when `limit` descriptors cannot hold `max_connections`
/// clients, naming both numbers and the fix.
pub fn shortfall(limit: u64, max_connections: usize, backends: usize) -> Option<String> {
    let need = needed(max_connections, backends);
    (need > limit).then(|| {
        let fits = fits(limit, backends);
        format!(
            "max_connections = {max_connections} needs {need} file descriptors (2 per client + {}), \
             but the limit is {limit}: about {fits} clients fit. Raise the hard limit \
             (LimitNOFILE= in systemd, ulimit -Hn) or lower max_connections",
            backends as u64 + SLACK
        )
    })
}

/// What [`apply`] did to a configuration's `max_connections`.
#[derive(Debug, PartialEq, Eq)]
pub enum Sized {
    /// It fits the limit.
    Fits,
    /// The default (never chosen by the user) did not fit and was lowered
    /// to this.
    Lowered(usize),
    /// The user's own value does not fit: this warning says by how much.
    Short(String),
}

/// Fits `config`'s `max_connections` to `limit` descriptors: a default the
/// user never chose is lowered to what fits instead of warned about; a
/// value the user set is kept and warned about. Used at start and on every
/// reload, so a reload does not bring back a default that cannot fit.
pub fn apply(config: &mut mqlb_config::Config, limit: u64) -> Sized {
    let max = config.balancer.max_connections;
    let backends = config.backends.len();
    match shortfall(limit, max, backends) {
        None => Sized::Fits,
        Some(_) if max == mqlb_config::DEFAULT_MAX_CONNECTIONS => {
            let fits = fits(limit, backends).max(1);
            config.balancer.max_connections = fits;
            Sized::Lowered(fits)
        }
        Some(warning) => Sized::Short(warning),
    }
}

/// The soft open-file limit in force now (after [`raise`]).
pub fn current() -> std::io::Result<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_is_lowered_and_a_chosen_value_kept() {
        let mut c = match mqlb_config::Config::parse(
            "<test>",
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n",
        ) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            c.balancer.max_connections,
            mqlb_config::DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(apply(&mut c, 20_000), Sized::Lowered(fits(20_000, 1)));
        assert_eq!(c.balancer.max_connections, fits(20_000, 1));
        // Sized again (a reload of the same file): still fits.
        assert_eq!(apply(&mut c, 20_000), Sized::Fits);
        c.balancer.max_connections = 50_000;
        assert!(matches!(apply(&mut c, 20_000), Sized::Short(w) if w.contains("50000")));
        assert_eq!(c.balancer.max_connections, 50_000);
    }

    #[test]
    fn budget_and_warning() {
        assert_eq!(needed(9000, 3), 18_000 + 3 + SLACK);
        assert!(shortfall(20_000, 9000, 3).is_none());
        let w = shortfall(20_000, 100_000, 3).unwrap_or_default();
        assert!(w.contains("needs 200067"), "{w}");
        assert!(w.contains("limit is 20000"), "{w}");
        assert!(w.contains("about 9966 clients fit"), "{w}");
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let limit = raise().unwrap_or(0);
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
        assert_eq!(soft, limit);
        assert!(soft <= hard);
    }
}
