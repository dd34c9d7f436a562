//! MQTT over WebSocket on a balancer listener: the upgrade and framing are
//! [`mqlb_listener::ws`]'s; this adds what the data path needs to read and
//! write a WebSocket client like any other (lent buffers, split halves).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf};

pub use mqlb_listener::ws::{accept, connect, Capped, Limits, WsStream, MAX_MESSAGE, MAX_UPGRADE};

use crate::bufpool;
use crate::forward::{ClientStream, LentRead};

impl<S> LentRead for ReadHalf<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn read_lent(&mut self) -> io::Result<Option<(bufpool::Lent, usize)>> {
        let mut buf = bufpool::lend();
        let n = self.read(&mut buf).await?;
        Ok(Some((buf, n)))
    }
}

impl<S> ClientStream for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Read = ReadHalf<WsStream<S>>;
    type Write = WriteHalf<WsStream<S>>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}
