//! A minimal HTTP/1.1 server for the admin API and the health sidecar:
//! accept, serve each connection with hyper, answer from a pure handler.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A response before it becomes HTTP; handlers return this so tests can
/// call them without a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Reply {
    /// A JSON reply.
    pub fn json(status: StatusCode, v: serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: v.to_string(),
        }
    }

    /// An HTML page.
    pub fn html(body: impl Into<String>) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "text/html; charset=utf-8",
            body: body.into(),
        }
    }

    /// A plain-text reply.
    pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Who may call an admin API; see [`mqlb_config::AdminAccess`] for the
/// rules. The token is compared in constant time (subtle), re-read when
/// its file changes, and every refused attempt is counted.
#[derive(Debug)]
pub struct Access {
    token_file: Option<std::path::PathBuf>,
    /// The token and the file's size and modification time when read.
    token: std::sync::Mutex<(Option<FileStamp>, Option<String>)>,
    allowed_hosts: Vec<String>,
    /// The API's own address, which its `Host` may name.
    own: std::net::SocketAddr,
    /// Requests refused for a missing or wrong token or a foreign `Host`.
    pub refused: std::sync::atomic::AtomicU64,
}

/// Reads a token file: its first line, trimmed; at least 16 bytes.
fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.len() < 16 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: an admin token must be at least 16 characters (for example `head -c 32 /dev/urandom | base64`)",
                path.display()
            ),
        ));
    }
    Ok(token)
}

/// A file's size and modification time: what tells that it changed.
type FileStamp = (u64, std::time::SystemTime);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl Access {
    /// The rules for an API bound to `own`; reads the token file now, so a
    /// missing or short one stops the start with a message that names it.
    pub fn new(
        access: &mqlb_config::AdminAccess,
        own: std::net::SocketAddr,
    ) -> std::io::Result<Access> {
        let token = match &access.token_file {
            Some(p) => (file_stamp(p), Some(read_token(p)?)),
            None => (None, None),
        };
        Ok(Access {
            token_file: access.token_file.clone(),
            token: std::sync::Mutex::new(token),
            allowed_hosts: access.allowed_hosts.clone(),
            own,
            refused: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The current token, re-read if its file changed (a file that no
    /// longer reads keeps the old token, and is logged).
    fn token(&self) -> Option<String> {
        let path = self.token_file.as_ref()?;
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        let now = file_stamp(path);
        if now != t.0 {
            match read_token(path) {
                Ok(new) => {
                    *t = (now, Some(new));
                    tracing::info!(file = %path.display(), "admin token re-read");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin token file changed but does not read; keeping the old token")
                }
            }
        }
        t.1.clone()
    }

    /// Whether a `Host` header names this API: a loopback address or
    /// `localhost`, the API's own address, or an allowed name (the port is
    /// not compared). A browser on a rebound DNS name sends that name.
    fn host_allowed(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            // HTTP/1.0 without Host: not a browser.
            return true;
        };
        let host = host.trim().to_ascii_lowercase();
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
            None => host
                .rsplit_once(':')
                .map_or(host.as_str(), |(h, _)| h)
                .to_string(),
        };
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            return ip.is_loopback() || (ip == self.own.ip() && !ip.is_unspecified());
        }
        self.allowed_hosts.contains(&name)
    }

    /// `Ok` when the request may be served, else the refusal to send.
    pub fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Reply> {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let read = method == Method::GET || method == Method::HEAD;
        // Probes carry the pod's address as Host and say nothing: always
        // answered. So is the console's page (static; its data needs the
        // token like any read).
        if read && matches!(path, "/healthz" | "/readyz" | "/") {
            return Ok(());
        }
        let refuse = |status: StatusCode, why: &str| {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(Reply::json(status, serde_json::json!({ "error": why })))
        };
        if !self.host_allowed(get("host")) {
            return refuse(
                StatusCode::FORBIDDEN,
                "the Host header names neither this API nor an allowed host (allowed_hosts)",
            );
        }
        if !read && cross_site(headers) {
            return refuse(StatusCode::FORBIDDEN, "cross-site request refused");
        }
        let needs_token = !read || !self.own.ip().is_loopback();
        if !needs_token {
            return Ok(());
        }
        let Some(token) = self.token() else {
            return refuse(
                StatusCode::FORBIDDEN,
                if read {
                    "this API is not on loopback: reads need a token (token_file)"
                } else {
                    "changing state needs a token: set one (token_file / --admin-token-file)"
                },
            );
        };
        let given = get("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or_default()
            .trim();
        use subtle::ConstantTimeEq as _;
        if given.len() == token.len() && bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
        }
    }
}

/// Admin and health connections served at once; more wait in the backlog.
/// An HTTP port is not a data path: this bounds what a misbehaving scraper
/// or a stranger holding sockets open can cost.
const MAX_CONNECTIONS: usize = 64;

/// Connections one source address may hold at once: one client cannot
/// take every slot (probes would then time out and a liveness probe
/// restart the process).
const PER_SOURCE: usize = 8;

/// Connections served past [`MAX_CONNECTIONS`] only to answer `/healthz`
/// and `/readyz`, each for at most [`PROBE_LIFETIME`]: probes get through
/// however many sockets strangers hold.
const PROBE_RESERVE: usize = 8;

/// Longest life of a connection served from [`PROBE_RESERVE`].
const PROBE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Time for a request's headers to arrive (slowloris).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest life of one HTTP connection, keep-alive included.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves `handler` on `listener` until `shutdown`. Accept errors are logged
/// and the loop goes on. At most `MAX_CONNECTIONS` are served at once,
/// `PER_SOURCE` from one address, each for at most
/// `CONNECTION_LIFETIME`, with `HEADER_TIMEOUT` for each request's
/// headers; past the cap, `PROBE_RESERVE` more are served only
/// `/healthz` and `/readyz`, briefly, and the rest are closed at once.
pub async fn serve<F>(listener: TcpListener, shutdown: CancellationToken, handler: F)
where
    F: Fn(&Method, &str, &HeaderMap) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let general = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let reserve = Arc::new(tokio::sync::Semaphore::new(PROBE_RESERVE));
    let sources: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let source = SourceSlot::take(&sources, peer.ip());
        let Some(source) = source else {
            tracing::debug!(%peer, "admin connection refused: too many from this address");
            continue;
        };
        let (permit, probes_only) = match general.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) => (p, true),
                Err(_) => {
                    tracing::debug!(%peer, "admin connection refused: every slot is taken");
                    continue;
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let path = req.uri().path();
                let probe = req.method() == Method::GET && matches!(path, "/healthz" | "/readyz");
                let reply = if probes_only && !probe {
                    Reply::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "busy: every admin slot is taken\n",
                    )
                } else {
                    handler(req.method(), path, req.headers())
                };
                let resp = Response::builder()
                    .status(reply.status)
                    .header("content-type", reply.content_type)
                    .body(Full::new(Bytes::from(reply.body)))
                    .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let (header_timeout, lifetime) = if probes_only {
                (PROBE_LIFETIME, PROBE_LIFETIME)
            } else {
                (HEADER_TIMEOUT, CONNECTION_LIFETIME)
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(io, svc);
            let _ = tokio::time::timeout(lifetime, conn).await;
            drop(permit);
            drop(source);
        });
    }
}

/// One connection's place in its source address's count.
struct SourceSlot {
    sources: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    /// A place for one more connection from `ip`, if it holds fewer than
    /// [`PER_SOURCE`].
    fn take(
        sources: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<SourceSlot> {
        let mut m = sources.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: sources.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Whether a request comes from a browser page of another origin: its
/// `Sec-Fetch-Site` says so, or its `Origin` names another host than the
/// one it was sent to.
pub fn cross_site(headers: &hyper::HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return true;
        }
    }
    match (get("origin"), get("host")) {
        (None, _) => false,
        (Some(origin), Some(host)) => {
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .unwrap_or(origin);
            origin_host != host
        }
        (Some(_), None) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_site_posts_are_recognised() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = hyper::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, hyper::header::HeaderValue::from_static(v));
            }
            m
        };
        assert!(!cross_site(&h(&[])), "curl");
        assert!(!cross_site(&h(&[
            ("origin", "http://127.0.0.1:9100"),
            ("host", "127.0.0.1:9100")
        ])));
        assert!(cross_site(&h(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:9100")
        ])));
        assert!(cross_site(&h(&[("sec-fetch-site", "cross-site")])));
        assert!(cross_site(&h(&[("sec-fetch-site", "same-site")])));
        assert!(!cross_site(&h(&[("sec-fetch-site", "same-origin")])));
    }
}
