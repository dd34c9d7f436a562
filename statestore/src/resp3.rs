//! RESP3 as the state store speaks it: a request is one array of bulk
//! strings (`*3\r\n$3\r\nGET\r\n...`); a reply is one of `+OK`, a bulk
//! string, the null bulk string, an integer, or `-ERR message`.
//!
//! Parsing is strict and bounded: at most [`MAX_ARGS`] elements, each
//! length checked against what is left of the payload before anything is
//! allocated, and nothing may follow the array. A request that breaks the
//! grammar is a "syntax error"; a known command with the wrong arguments is
//! "wrong number of arguments" (or a syntax error for an unknown option);
//! an unknown command is "unknown command", as the protocol names them.

/// Most elements a request may have (`SET k v NEX PX ms` has six).
pub const MAX_ARGS: usize = 8;

/// When a `SET` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Always.
    Always,
    /// `NX`: only if the key does not exist.
    IfAbsent,
    /// `NEX`: only if the key does not exist or already has this value.
    IfAbsentOrEqual,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `SET key value [NX|NEX] [PX milliseconds]`.
    Set {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// When it applies.
        condition: Condition,
        /// Expiry after this many milliseconds.
        expire_ms: Option<u64>,
    },
    /// `GET key`.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// `DEL key`.
    Del {
        /// The key.
        key: Vec<u8>,
    },
    /// `VDEL key value`: deletes only if the value matches.
    VDel {
        /// The key.
        key: Vec<u8>,
        /// The value it must have.
        value: Vec<u8>,
    },
    /// `KEYNOTIFY key [STOP]`: start (or stop) change notifications for
    /// the requesting client.
    KeyNotify {
        /// The key.
        key: Vec<u8>,
        /// Stop instead of start.
        stop: bool,
    },
}

/// Why a request was refused, with the protocol's error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The payload is not an array of bulk strings.
    Syntax,
    /// Not a command the store knows.
    UnknownCommand,
    /// A known command with too few or too many arguments.
    WrongArguments,
}

impl RequestError {
    /// The text after `-ERR `, as the SDK matches it.
    pub fn message(self) -> &'static str {
        match self {
            RequestError::Syntax => "syntax error",
            RequestError::UnknownCommand => "unknown command",
            RequestError::WrongArguments => "wrong number of arguments",
        }
    }
}

/// Reads `<digits>\r\n` at `at`; returns the number and the index after.
fn number(buf: &[u8], at: usize) -> Result<(usize, usize), RequestError> {
    let rest = buf.get(at..).ok_or(RequestError::Syntax)?;
    let end = rest
        .iter()
        .take(20)
        .position(|b| *b == b'\r')
        .ok_or(RequestError::Syntax)?;
    let digits = rest.get(..end).ok_or(RequestError::Syntax)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(RequestError::Syntax);
    }
    if rest.get(end + 1) != Some(&b'\n') {
        return Err(RequestError::Syntax);
    }
    let n = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<usize>().ok())
        .ok_or(RequestError::Syntax)?;
    Ok((n, at + end + 2))
}

/// Splits a payload into its bulk strings.
pub fn parse_array(buf: &[u8]) -> Result<Vec<&[u8]>, RequestError> {
    if buf.first() != Some(&b'*') {
        return Err(RequestError::Syntax);
    }
    let (count, mut at) = number(buf, 1)?;
    if count == 0 || count > MAX_ARGS {
        return Err(RequestError::Syntax);
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        if buf.get(at) != Some(&b'$') {
            return Err(RequestError::Syntax);
        }
        let (len, start) = number(buf, at + 1)?;
        let end = start.checked_add(len).ok_or(RequestError::Syntax)?;
        if end.checked_add(2).and_then(|e| buf.get(end..e)) != Some(b"\r\n") {
            return Err(RequestError::Syntax);
        }
        out.push(buf.get(start..end).ok_or(RequestError::Syntax)?);
        at = end + 2;
    }
    if at != buf.len() {
        return Err(RequestError::Syntax);
    }
    Ok(out)
}

/// Parses a request payload.
pub fn parse_request(buf: &[u8]) -> Result<Request, RequestError> {
    let args = parse_array(buf)?;
    let (cmd, rest) = args.split_first().ok_or(RequestError::Syntax)?;
    let cmd = cmd.to_ascii_uppercase();
    let owned = |b: &[u8]| b.to_vec();
    match (cmd.as_slice(), rest) {
        (b"GET", [key]) => Ok(Request::Get { key: owned(key) }),
        (b"DEL", [key]) => Ok(Request::Del { key: owned(key) }),
        (b"VDEL", [key, value]) => Ok(Request::VDel {
            key: owned(key),
            value: owned(value),
        }),
        (b"KEYNOTIFY", [key]) => Ok(Request::KeyNotify {
            key: owned(key),
            stop: false,
        }),
        (b"KEYNOTIFY", [key, opt]) if opt.eq_ignore_ascii_case(b"STOP") => Ok(Request::KeyNotify {
            key: owned(key),
            stop: true,
        }),
        (b"KEYNOTIFY", [_, _]) => Err(RequestError::Syntax),
        (b"SET", [key, value, opts @ ..]) => {
            let mut condition = Condition::Always;
            let mut expire_ms = None;
            let mut i = 0;
            while let Some(o) = opts.get(i) {
                let o = o.to_ascii_uppercase();
                match o.as_slice() {
                    b"NX" if condition == Condition::Always => condition = Condition::IfAbsent,
                    b"NEX" if condition == Condition::Always => {
                        condition = Condition::IfAbsentOrEqual
                    }
                    b"PX" if expire_ms.is_none() => {
                        let ms = opts.get(i + 1).ok_or(RequestError::WrongArguments)?;
                        let ms = std::str::from_utf8(ms)
                            .ok()
                            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|s| s.parse::<u64>().ok())
                            .filter(|ms| *ms > 0)
                            .ok_or(RequestError::Syntax)?;
                        expire_ms = Some(ms);
                        i += 1;
                    }
                    _ => return Err(RequestError::Syntax),
                }
                i += 1;
            }
            Ok(Request::Set {
                key: owned(key),
                value: owned(value),
                condition,
                expire_ms,
            })
        }
        (b"SET" | b"GET" | b"DEL" | b"VDEL" | b"KEYNOTIFY", _) => Err(RequestError::WrongArguments),
        _ => Err(RequestError::UnknownCommand),
    }
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`: a `SET` or `KEYNOTIFY` applied.
    Ok,
    /// A `GET`'s value.
    Value(Vec<u8>),
    /// `$-1`: `GET` of a key that does not exist.
    Nil,
    /// `:n`: keys deleted (0: there was none).
    Deleted(u8),
    /// `:-1`: a conditional `SET` or a `VDEL` whose condition did not hold.
    NotApplied,
    /// `-ERR message`.
    Error(&'static str),
}

impl Reply {
    /// The RESP3 bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Ok => b"+OK\r\n".to_vec(),
            Reply::Value(v) => {
                let mut out = format!("${}\r\n", v.len()).into_bytes();
                out.extend_from_slice(v);
                out.extend_from_slice(b"\r\n");
                out
            }
            Reply::Nil => b"$-1\r\n".to_vec(),
            Reply::Deleted(n) => format!(":{n}\r\n").into_bytes(),
            Reply::NotApplied => b":-1\r\n".to_vec(),
            Reply::Error(m) => format!("-ERR {m}\r\n").into_bytes(),
        }
    }
}

/// An array of bulk strings: what a client sends as a request (the SDK's
/// `RequestBufferBuilder`), and what a notification carries. Public for
/// clients, tests and benchmarks that build requests by hand.
pub fn array(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A change notification's payload for a watcher of a key:
/// `NOTIFY SET VALUE v` or `NOTIFY DELETE`.
pub fn notification(value: Option<&[u8]>) -> Vec<u8> {
    match value {
        None => array(&[b"NOTIFY", b"DELETE"]),
        Some(v) => array(&[b"NOTIFY", b"SET", b"VALUE", v]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdks_requests_parse() {
        assert_eq!(
            parse_request(&array(&[b"SET", b"k", b"v", b"NEX", b"PX", b"1500"])),
            Ok(Request::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                condition: Condition::IfAbsentOrEqual,
                expire_ms: Some(1500),
            })
        );
        assert_eq!(
            parse_request(&array(&[b"SET", b"k", b"", b"NX"])),
            Ok(Request::Set {
                key: b"k".to_vec(),
                value: Vec::new(),
                condition: Condition::IfAbsent,
                expire_ms: None,
            })
        );
        assert_eq!(
            parse_request(&array(&[b"get", b"k"])),
            Ok(Request::Get { key: b"k".to_vec() })
        );
        assert_eq!(
            parse_request(&array(&[b"VDEL", b"k", b"v"])),
            Ok(Request::VDel {
                key: b"k".to_vec(),
                value: b"v".to_vec()
            })
        );
        assert_eq!(
            parse_request(&array(&[b"KEYNOTIFY", b"k", b"STOP"])),
            Ok(Request::KeyNotify {
                key: b"k".to_vec(),
                stop: true
            })
        );
        // Binary keys and values, CRLF inside included.
        assert!(parse_request(&array(&[b"SET", b"a\r\nb", b"\0\xff"])).is_ok());
    }

    #[test]
    fn bad_requests_get_the_protocols_errors() {
        use RequestError::*;
        for (payload, want) in [
            (array(&[b"FLUSHALL"]), UnknownCommand),
            (array(&[b"GET"]), WrongArguments),
            (array(&[b"GET", b"a", b"b"]), WrongArguments),
            (array(&[b"SET", b"k"]), WrongArguments),
            (array(&[b"SET", b"k", b"v", b"PX"]), WrongArguments),
            (array(&[b"SET", b"k", b"v", b"PX", b"abc"]), Syntax),
            (array(&[b"SET", b"k", b"v", b"PX", b"0"]), Syntax),
            (array(&[b"SET", b"k", b"v", b"NX", b"NEX"]), Syntax),
            (array(&[b"SET", b"k", b"v", b"XX"]), Syntax),
            (array(&[b"KEYNOTIFY", b"k", b"GO"]), Syntax),
            (b"GET k\r\n".to_vec(), Syntax),
            (b"*1\r\n$3\r\nGET\r\nextra".to_vec(), Syntax),
            (b"*2\r\n$3\r\nGET\r\n$99\r\nk\r\n".to_vec(), Syntax),
            (b"*9\r\n".to_vec(), Syntax),
            (b"*0\r\n".to_vec(), Syntax),
            (b"*1\r\n$18446744073709551615\r\n".to_vec(), Syntax),
            (b"*1\r\n$-1\r\n".to_vec(), Syntax),
            (Vec::new(), Syntax),
        ] {
            assert_eq!(parse_request(&payload), Err(want), "{payload:?}");
        }
    }

    #[test]
    fn random_bytes_and_mutations_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let valid = array(&[b"SET", b"key", b"value", b"NEX", b"PX", b"100"]);
        for _ in 0..100_000 {
            let mut p = valid.clone();
            for _ in 0..rng.usize(1..4) {
                let n = p.len();
                match rng.u8(..3) {
                    0 if n > 0 => p[rng.usize(..n)] = rng.u8(..),
                    1 => p.insert(rng.usize(..=n), rng.u8(..)),
                    _ if n > 0 => {
                        p.remove(rng.usize(..n));
                    }
                    _ => {}
                }
            }
            let _ = parse_request(&p);
        }
    }

    #[test]
    fn replies_are_what_the_sdk_reads() {
        assert_eq!(Reply::Ok.encode(), b"+OK\r\n");
        assert_eq!(Reply::Value(b"hi".to_vec()).encode(), b"$2\r\nhi\r\n");
        assert_eq!(Reply::Nil.encode(), b"$-1\r\n");
        assert_eq!(Reply::Deleted(1).encode(), b":1\r\n");
        assert_eq!(Reply::Deleted(0).encode(), b":0\r\n");
        assert_eq!(Reply::NotApplied.encode(), b":-1\r\n");
        assert_eq!(
            Reply::Error("syntax error").encode(),
            b"-ERR syntax error\r\n"
        );
        assert_eq!(
            notification(Some(b"v1")),
            b"*4\r\n$6\r\nNOTIFY\r\n$3\r\nSET\r\n$5\r\nVALUE\r\n$2\r\nv1\r\n"
        );
        assert_eq!(
            notification(None),
            b"*2\r\n$6\r\nNOTIFY\r\n$6\r\nDELETE\r\n"
        );
    }
}
