//! Hybrid logical clock timestamps, as the state store protocol writes
//! them: `{wall milliseconds}:{counter}:{node id}` (the SDK zero-pads the
//! first two fields). Ordered by time, then counter, then node, so two
//! writers never tie.

use std::fmt;

/// One timestamp: a version, a request's time, or a fencing token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Orders events within one millisecond.
    pub counter: u64,
    /// Who made it.
    pub node: String,
}

impl Hlc {
    /// Parses `wall:counter:node`; `None` if malformed (the protocol's
    /// "malformed timestamp").
    pub fn parse(s: &str) -> Option<Hlc> {
        let mut parts = s.splitn(3, ':');
        let wall = parts.next()?;
        let counter = parts.next()?;
        let node = parts.next()?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(wall) || !digits(counter) || node.is_empty() {
            return None;
        }
        Some(Hlc {
            wall_ms: wall.parse().ok()?,
            counter: counter.parse().ok()?,
            node: node.to_string(),
        })
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:015}:{:05}:{}", self.wall_ms, self.counter, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_writes_and_orders_by_time_counter_node() {
        let a = Hlc {
            wall_ms: 1_700_000_000_000,
            counter: 3,
            node: "n1".into(),
        };
        assert_eq!(a.to_string(), "001700000000000:00003:n1");
        assert_eq!(Hlc::parse(&a.to_string()), Some(a.clone()));
        let b = Hlc {
            counter: 4,
            ..a.clone()
        };
        assert!(a < b);
        for bad in [
            "",
            "1:2",
            "x:1:n",
            "1:y:n",
            "1:2:",
            "-1:2:n",
            "123456789012345678901:0:n",
        ] {
            assert_eq!(Hlc::parse(bad), None, "{bad:?}");
        }
        // The node id may itself hold colons.
        assert_eq!(Hlc::parse("5:0:a:b").map(|h| h.node), Some("a:b".into()));
    }
}
