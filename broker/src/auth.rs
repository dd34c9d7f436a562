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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// Password verifications that may run at once. PBKDF2 is CPU work by
/// design; more in parallel than there are cores only queues them inside
/// the OS instead of here, and a CONNECT storm must not take every blocking
/// thread tokio has.
const MAX_PARALLEL_VERIFICATIONS: usize = 4;

/// Users, passwords and topic rules.
#[derive(Debug)]
pub struct Auth {
    allow_anonymous: bool,
    users: HashMap<String, Hash>,
    acl: Vec<AclRule>,
    /// Verified against for an unknown user name (or a missing password),
    /// so that it costs what a wrong password costs and does not reveal
    /// which user names exist.
    decoy: Hash,
    /// Bounds concurrent verifications on the blocking pool.
    verify_slots: Arc<tokio::sync::Semaphore>,
    /// Hash computations done, for tests and metrics.
    verifications: AtomicU64,
}

impl Default for Auth {
    fn default() -> Self {
        Self::with_users(false, HashMap::new(), Vec::new())
    }
}

impl Auth {
    /// Everything allowed: the default without a configuration.
    pub fn open() -> Auth {
        Self::with_users(true, HashMap::new(), Vec::new())
    }

    /// From a broker configuration, reading its password file.
    pub fn from_config(c: &BrokerConfig) -> Result<Auth, String> {
        let users = match &c.password_file {
            Some(p) => load_passwords(p)?,
            None => HashMap::new(),
        };
        Ok(Self::with_users(c.allow_anonymous, users, c.acl.clone()))
    }

    fn with_users(allow_anonymous: bool, users: HashMap<String, Hash>, acl: Vec<AclRule>) -> Auth {
        // The decoy costs what the file's most expensive hash costs.
        let iterations = users
            .values()
            .map(|h| match h {
                Hash::Pbkdf2 { iterations, .. } => *iterations,
                Hash::Sha512 { .. } => 1,
            })
            .max()
            .unwrap_or(DEFAULT_ITERATIONS);
        Auth {
            allow_anonymous,
            users,
            acl,
            decoy: Hash::Pbkdf2 {
                iterations,
                salt: vec![0; 12],
                hash: vec![0; 64],
            },
            verify_slots: Arc::new(tokio::sync::Semaphore::new(MAX_PARALLEL_VERIFICATIONS)),
            verifications: AtomicU64::new(0),
        }
    }

    /// Password hashes computed so far.
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// Whether checking these credentials computes a password hash (and so
    /// belongs off the async workers).
    fn needs_hashing(&self, username: Option<&str>) -> bool {
        username.is_some() && !self.users.is_empty()
    }

    /// Checks CONNECT credentials, synchronously. A user name always costs
    /// exactly one hash when a password file is loaded, whether the user
    /// exists, the password is missing or wrong.
    pub fn connect(&self, username: Option<&str>, password: Option<&[u8]>) -> Verdict {
        let Some(user) = username else {
            return if self.allow_anonymous {
                Verdict::Allow
            } else {
                Verdict::NotAuthorized
            };
        };
        if self.users.is_empty() {
            // With no password file, user names are only labels for ACLs.
            return if self.allow_anonymous {
                Verdict::Allow
            } else {
                Verdict::BadCredentials
            };
        }
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h, true),
            None => (&self.decoy, false),
        };
        let ok = hash.verify(password.unwrap_or_default());
        if ok && known && password.is_some() {
            Verdict::Allow
        } else {
            Verdict::BadCredentials
        }
    }

    /// [`Auth::connect`] for async callers: hashing runs on tokio's blocking
    /// pool, at most `MAX_PARALLEL_VERIFICATIONS` at once, so a CONNECT
    /// with a password never stalls the other connections of its worker.
    pub async fn check(
        self: &Arc<Self>,
        username: Option<String>,
        password: Option<bytes::Bytes>,
    ) -> Verdict {
        if !self.needs_hashing(username.as_deref()) {
            return self.connect(username.as_deref(), password.as_deref());
        }
        let Ok(_slot) = self.verify_slots.clone().acquire_owned().await else {
            return Verdict::BadCredentials;
        };
        let auth = self.clone();
        tokio::task::spawn_blocking(move || auth.connect(username.as_deref(), password.as_deref()))
            .await
            .unwrap_or(Verdict::BadCredentials)
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
            let mut pattern = r
                .topic
                .replace("%u", user.unwrap_or(""))
                .replace("%c", client_id);
            if pattern.contains("%X") {
                // The client ID in upper-case hex: how the state store
                // names a client's notification topic.
                let hex: String = client_id.bytes().map(|b| format!("{b:02X}")).collect();
                pattern = pattern.replace("%X", &hex);
            }
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

    /// An unknown user name, a missing password and a wrong password each
    /// cost exactly one hash of the file's strength, as a right one does, so
    /// response time does not reveal which user names exist.
    #[test]
    fn unknown_users_cost_what_wrong_passwords_cost() {
        let (_, alice) = hash_line("alice", "secret")
            .unwrap()
            .split_once(':')
            .map(|(u, h)| (u.to_string(), h.to_string()))
            .unwrap();
        let users = HashMap::from([("alice".to_string(), Hash::parse(&alice).unwrap())]);
        let auth = Auth::with_users(false, users, Vec::new());
        let Hash::Pbkdf2 { iterations, .. } = auth.decoy else {
            panic!("decoy is not PBKDF2")
        };
        assert_eq!(iterations, DEFAULT_ITERATIONS);
        for (user, pw, want) in [
            ("alice", Some(&b"secret"[..]), Verdict::Allow),
            ("alice", Some(&b"wrong"[..]), Verdict::BadCredentials),
            ("alice", None, Verdict::BadCredentials),
            ("mallory", Some(&b"secret"[..]), Verdict::BadCredentials),
            ("mallory", None, Verdict::BadCredentials),
        ] {
            let before = auth.verifications();
            assert_eq!(auth.connect(Some(user), pw), want, "{user} {pw:?}");
            assert_eq!(auth.verifications() - before, 1, "{user} {pw:?}");
        }
        // Anonymous clients compute nothing.
        let before = auth.verifications();
        assert_eq!(auth.connect(None, None), Verdict::NotAuthorized);
        assert_eq!(auth.verifications(), before);
    }

    /// Hashing runs off the async worker: on a single-threaded runtime, a
    /// PINGREQ from a connected client is answered while a slow password
    /// check is still running. On the worker, the CONNACK would come first.
    #[test]
    fn a_password_check_does_not_stall_other_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Slow on purpose: ~1 s of PBKDF2 even in a release build.
        let mut salt = [0u8; 12];
        salt[0] = 1;
        let mut out = [0u8; 64];
        let iterations = 1_000_000;
        pbkdf2::pbkdf2_hmac::<Sha512>(b"pw", &salt, 10, &mut out);
        let slow = Hash::Pbkdf2 {
            iterations,
            salt: salt.to_vec(),
            hash: out.to_vec(),
        };
        let state = crate::state::State::new(
            crate::core::Core::new(),
            Auth::with_users(
                true,
                HashMap::from([("slow".to_string(), slow)]),
                Vec::new(),
            ),
            Arc::new(crate::effects::LocalLog::default()),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let settings = crate::conn::Settings::default();
            // A connected bystander.
            let (mut by, server) = tokio::io::duplex(1024);
            tokio::spawn(crate::conn::handle(
                server,
                crate::node::Node::single(state.clone()),
                settings,
            ));
            by.write_all(&[
                0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'b', b'y',
            ])
            .await
            .unwrap();
            let mut ack = [0u8; 4];
            by.read_exact(&mut ack).await.unwrap();
            assert_eq!(ack, [0x20, 2, 0, 0]);
            // A client with a password for the slow user.
            let (mut slow, server) = tokio::io::duplex(1024);
            tokio::spawn(crate::conn::handle(
                server,
                crate::node::Node::single(state),
                settings,
            ));
            let mut c = vec![
                0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 1, b's',
            ];
            c.extend_from_slice(&[0, 4, b's', b'l', b'o', b'w', 0, 2, b'p', b'x']);
            c[1] = (c.len() - 2) as u8;
            slow.write_all(&c).await.unwrap();
            tokio::task::yield_now().await;
            // The bystander's ping is answered before the slow CONNACK.
            by.write_all(&[0xC0, 0]).await.unwrap();
            let mut pong = [0u8; 2];
            let first = tokio::select! {
                r = by.read_exact(&mut pong) => { r.unwrap(); "pingresp" }
                r = slow.read_exact(&mut ack) => { r.unwrap(); "connack" }
            };
            assert_eq!(first, "pingresp");
            assert_eq!(pong, [0xD0, 0]);
        });
        // Do not wait for the hash to finish.
        rt.shutdown_background();
    }

    #[test]
    fn acl_substitution_and_coverage() {
        let auth = Auth::with_users(
            true,
            HashMap::new(),
            vec![
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
        );
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
