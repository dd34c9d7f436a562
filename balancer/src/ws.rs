//! MQTT over WebSocket on a balancer listener: the upgrade and framing are
//! [`mqlb_listener::ws`]'s; this adds what the data path needs to read and
//! write a WebSocket client like any other (split halves, read through a lent buffer).

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

pub use mqlb_listener::ws::{accept, connect, Capped, Limits, WsStream, MAX_MESSAGE, MAX_UPGRADE};

use crate::forward::{Buffered, ClientStream};

impl<S> ClientStream for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Read<'a> = Buffered<ReadHalf<&'a mut WsStream<S>>>;
    type Write<'a> = WriteHalf<&'a mut WsStream<S>>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        let (r, w) = tokio::io::split(self);
        (Buffered::new(r), w)
    }
}
