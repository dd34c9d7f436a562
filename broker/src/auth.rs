//! Authentication (password file) and authorization (topic ACL).
//!
//! The password file uses Mosquitto's format, so `mosquitto_passwd` files
//! work unchanged and operators keep their tooling:
//! `user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>` (what
//! mosquitto_passwd 2.x writes) or `user:$6$<base64 salt>$<base64
//! SHA512(password ++ salt)>` (1.x). Plain-text passwords are refused.
//!
//! Hashing uses the pure-Rust RustCrypto crates (sha2, pbkdf2): no C
//! toolchain, small to build.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use mqlb_config::broker::{AclRule, BrokerConfig};
use sha2::{Digest, Sha512};

/// Iterations for new `$7$` hashes (Mosquitto's default is 101; we pick a
/// stronger default, the iteration count is stored in each line).
pub const DEFAULT_ITERATIONS: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Hash {
    fn parse(s: &str) -> Result<Hash, String> {
        let parts: Vec<&str> = s.split('$').collect();
        let b64 = |x: &str| B64.decode(x).map_err(|e| format!("bad base64: {e}"));
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => Ok(Hash::Pbkdf2 {
                iterations: iterations
                    .parse()
                    .map_err(|_| "bad iteration count".to_string())?,
                salt: b64(salt)?,
                hash: b64(hash)?,
            }),
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64(salt)?,
                hash: b64(hash)?,
            }),
            _ => Err("not a $6$ or $7$ hash (plain-text passwords are refused)".into()),
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        let computed = match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out
            }
            Hash::Sha512 { salt, .. } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                h.finalize().to_vec()
            }
        };
        let expected = match self {
            Hash::Pbkdf2 { hash, .. } | Hash::Sha512 { hash, .. } => hash,
        };
        constant_time_eq(&computed, expected)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A `$7$` password line for `user` (what `mqlb passwd` prints).
pub fn hash_line(user: &str, password: &str) -> Result<String, String> {
    let mut salt = [0u8; 12];
    getrandom::getrandom(&mut salt).map_err(|e| format!("no randomness: {e}"))?;
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), &salt, DEFAULT_ITERATIONS, &mut out);
    Ok(format!(
        "{user}:$7${DEFAULT_ITERATIONS}${}${}",
        B64.encode(salt),
        B64.encode(out)
    ))
}

/// The CONNECT verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the client in.
    Allow,
    /// Wrong or unknown credentials (CONNACK 0x86 / 3.x code 4).
    BadCredentials,
    /// Anonymous clients are not allowed (CONNACK 0x87 / 3.x code 5).
    NotAuthorized,
}

/// Users, passwords and topic rules.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    allow_anonymous: bool,
    users: HashMap<String, Hash>,
    acl: Vec<AclRule>,
}

impl Auth {
    /// Everything allowed: the default without a configuration.
    pub fn open() -> Auth {
        Auth {
            allow_anonymous: true,
            ..Default::default()
        }
    }

    /// From a broker configuration, reading its password file.
    pub fn from_config(c: &BrokerConfig) -> Result<Auth, String> {
        let users = match &c.password_file {
            Some(p) => load_passwords(p)?,
            None => HashMap::new(),
        };
        Ok(Auth {
            allow_anonymous: c.allow_anonymous,
            users,
            acl: c.acl.clone(),
        })
    }

    /// Checks CONNECT credentials.
    pub fn connect(&self, username: Option<&str>, password: Option<&[u8]>) -> Verdict {
        match username {
            None => {
                if self.allow_anonymous {
                    Verdict::Allow
                } else {
                    Verdict::NotAuthorized
                }
            }
            Some(user) => match (self.users.get(user), password) {
                (Some(h), Some(p)) if h.verify(p) => Verdict::Allow,
                // With no password file, user names are only labels for ACLs.
                (None, _) if self.users.is_empty() && self.allow_anonymous => Verdict::Allow,
                _ => Verdict::BadCredentials,
            },
        }
    }

    fn granted(
        &self,
        user: Option<&str>,
        client_id: &str,
        topic_or_filter: &str,
        write: bool,
    ) -> bool {
        if self.acl.is_empty() {
            return true;
        }
        self.acl.iter().any(|r| {
            let applies = match &r.user {
                None => true,
                Some(u) => Some(u.as_str()) == user,
            };
            if !applies || (write && !r.access.writes()) || (!write && !r.access.reads()) {
                return false;
            }
            // %u for an anonymous client matches nothing.
            if r.topic.contains("%u") && user.is_none() {
                return false;
            }
            let pattern = r
                .topic
                .replace("%u", user.unwrap_or(""))
                .replace("%c", client_id);
            if write {
                crate::trie::filter_matches(&pattern, topic_or_filter)
            } else {
                filter_covers(&pattern, topic_or_filter)
            }
        })
    }

    /// Whether the client may publish to `topic`.
    pub fn may_publish(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.granted(user, client_id, topic, true)
    }

    /// Whether the client may subscribe to `filter`.
    pub fn may_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        let inner = filter
            .strip_prefix("$share/")
            .and_then(|r| r.split_once('/'))
            .map_or(filter, |(_, f)| f);
        self.granted(user, client_id, inner, false)
    }
}

fn load_passwords(path: &Path) -> Result<HashMap<String, Hash>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("{}:{}: expected user:hash", path.display(), i + 1))?;
        let hash = Hash::parse(hash)
            .map_err(|e| format!("{}:{}: user {user}: {e}", path.display(), i + 1))?;
        users.insert(user.to_string(), hash);
    }
    Ok(users)
}

/// Whether every topic matched by `filter` is also matched by `pattern`, so
/// a subscription to `filter` only ever receives what `pattern` grants.
pub fn filter_covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_config::broker::Access;

    #[test]
    fn mosquitto_passwd_hashes_verify() {
        // Written by mosquitto_passwd 2.0.11 for alice / secret.
        let line = "$7$101$sc/gVPNyHdYhkV4q$i3kzWEPNPqCDZyBaJ/Q7V++QDXFFpxtHz6X3OZdKEVTRMZCuwshZBONx9x6yJUtAf+ZC821CCZ+I7nKBHIgNVA==";
        let h = Hash::parse(line).unwrap();
        assert!(h.verify(b"secret"));
        assert!(!h.verify(b"Secret"));
        let ours = hash_line("bob", "pw").unwrap();
        let (_, hash) = ours.split_once(':').unwrap();
        assert!(Hash::parse(hash).unwrap().verify(b"pw"));
        assert!(Hash::parse("plaintext").is_err());
    }

    #[test]
    fn acl_substitution_and_coverage() {
        let auth = Auth {
            allow_anonymous: true,
            users: HashMap::new(),
            acl: vec![
                AclRule {
                    user: None,
                    topic: "devices/%c/#".into(),
                    access: Access::ReadWrite,
                },
                AclRule {
                    user: Some("ops".into()),
                    topic: "#".into(),
                    access: Access::Read,
                },
                AclRule {
                    user: None,
                    topic: "users/%u/inbox".into(),
                    access: Access::Read,
                },
            ],
        };
        assert!(auth.may_publish(None, "d1", "devices/d1/temp"));
        assert!(!auth.may_publish(None, "d1", "devices/d2/temp"));
        assert!(auth.may_subscribe(None, "d1", "devices/d1/+"));
        assert!(
            !auth.may_subscribe(None, "d1", "devices/+/temp"),
            "+ would reach other devices"
        );
        assert!(auth.may_subscribe(Some("ops"), "x", "#"));
        assert!(!auth.may_publish(Some("ops"), "x", "a"));
        assert!(auth.may_subscribe(Some("ann"), "x", "users/ann/inbox"));
        assert!(
            !auth.may_subscribe(None, "x", "users//inbox"),
            "%u never matches anonymous"
        );
        assert!(auth.may_subscribe(None, "d1", "$share/g/devices/d1/#"));
    }

    #[test]
    fn coverage() {
        assert!(filter_covers("a/#", "a/b/+"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(filter_covers("#", "#"));
    }
}
