//! A stream that first replays bytes already read from it.
//!
//! The PROXY header is read greedily, so the start of a TLS ClientHello can
//! arrive with it; the TLS handshake must still see those bytes first.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `inner`, with `pending` read before anything from the socket.
#[derive(Debug)]
pub struct Rewind {
    pending: BytesMut,
    inner: TcpStream,
}

impl Rewind {
    /// Replays `pending`, then reads `inner`.
    pub fn new(pending: BytesMut, inner: TcpStream) -> Self {
        Rewind { pending, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(self.pending.get(..n).unwrap_or_default());
            self.pending.advance(n);
            if self.pending.is_empty() {
                // Replayed: its buffer is freed, not kept for the life of
                // the connection.
                self.pending = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The replayed bytes come first, then the socket's; once replayed,
    /// their buffer is freed (an idle connection keeps none).
    #[tokio::test]
    async fn replays_then_reads_and_frees_the_replayed_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut pending = BytesMut::with_capacity(4096);
        pending.extend_from_slice(b"hello ");
        let mut r = Rewind::new(pending, server);
        client.write_all(b"world").await.unwrap();
        let mut got = vec![0u8; 6];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"hello ");
        assert_eq!(r.pending.capacity(), 0, "the replayed buffer is kept");
        let mut rest = vec![0u8; 5];
        r.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, b"world");
    }
}
