//! Connecting to a backend and splicing bytes both ways.
//!
//! Client→backend is a plain copy. Backend→client is a copy that also feeds a
//! [`BoundaryTracker`], so the balancer always knows whether the client's
//! stream sits between two packets: that is where a DISCONNECT can be
//! injected when a backend is drained. Half-close is honoured in both
//! directions: EOF on one side shuts down writing on the other while the
//! reverse direction keeps flowing. An error on either side ends both.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use mqlb_protocol::BoundaryTracker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::select::Backend;

/// Read buffer per direction. Large enough to carry a burst of small PUBLISH
/// frames in one syscall, small enough for 100k idle connections... which is
/// why it is allocated per read loop, not per connection up front.
const BUF_SIZE: usize = 16 * 1024;

/// Connects to the first candidate that accepts within `timeout`.
///
/// Returns the stream and the backend, or `None` when every candidate failed.
/// Each failure is counted on its backend.
pub async fn connect_first(
    candidates: &[Arc<Backend>],
    timeout: Duration,
) -> Option<(TcpStream, Arc<Backend>)> {
    for backend in candidates {
        match tokio::time::timeout(timeout, TcpStream::connect(backend.address.as_str())).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, backend.clone()));
            }
            Ok(Err(e)) => {
                tracing::debug!(backend = %backend.name, error = %e, "backend connect failed");
            }
            Err(_) => {
                tracing::debug!(backend = %backend.name, ?timeout, "backend connect timed out");
            }
        }
        backend
            .connect_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    None
}

/// Byte counts of a finished splice.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes client→backend, the initial CONNECT included.
    pub to_backend: u64,
    /// Bytes backend→client.
    pub to_client: u64,
}

/// Writes `prefix` (the buffered CONNECT) to the backend, then forwards both
/// ways until both directions are closed or one fails.
pub async fn splice(client: TcpStream, backend: TcpStream, prefix: &[u8]) -> io::Result<Spliced> {
    let (mut cr, mut cw) = client.into_split();
    let (mut br, mut bw) = backend.into_split();
    bw.write_all(prefix).await?;

    let up = async {
        let n = tokio::io::copy(&mut cr, &mut bw).await?;
        // Client sent FIN: pass it on, keep reading the backend.
        bw.shutdown().await?;
        Ok::<u64, io::Error>(n)
    };
    let down = copy_tracking(&mut br, &mut cw);

    tokio::pin!(up, down);
    let mut to_backend = None;
    let mut to_client = None;
    while to_backend.is_none() || to_client.is_none() {
        tokio::select! {
            r = &mut up, if to_backend.is_none() => to_backend = Some(r?),
            r = &mut down, if to_client.is_none() => to_client = Some(r?),
        }
    }
    Ok(Spliced {
        to_backend: to_backend.unwrap_or(0) + prefix.len() as u64,
        to_client: to_client.unwrap_or(0),
    })
}

/// Copies backend→client, tracking packet boundaries, then shuts down the
/// client's write side on EOF.
async fn copy_tracking(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) -> io::Result<u64> {
    let mut tracker = BoundaryTracker::default();
    let mut tracking = true;
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        if tracking {
            if let Err(e) = tracker.feed(&buf[..n]) {
                // Not MQTT framing: keep forwarding, never inject.
                tracing::debug!(error = %e, "backend stream is not MQTT-framed; boundary tracking off");
                tracking = false;
            }
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}
