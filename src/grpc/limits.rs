//! A cap on the connections served at once: a connection is accepted only while fewer than
//! `GRPC__MAX_CONNECTIONS` are open, and holds its place until it closes. (tonic bounds streams
//! per connection and message sizes, but not connections.) Together with the per-connection
//! HTTP/2 flow-control window, this bounds the memory unauthenticated callers can make the
//! server hold.
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted connection and its place among the connections served.
pub struct Limited {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
}

/// `incoming`, accepting a connection only while fewer than `max` are open.
pub fn limit(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    max: usize,
) -> impl Stream<Item = io::Result<Limited>> + Send + 'static {
    let places = Arc::new(Semaphore::new(max));
    let incoming = Box::pin(incoming);
    futures::stream::unfold((incoming, places), |(mut incoming, places)| async move {
        // Wait for a place before accepting: past the cap, connections queue in the kernel's
        // backlog instead of costing memory here.
        let place = places.clone().acquire_owned().await.ok()?;
        let next = incoming.next().await?;
        let next = next.map(|stream| Limited {
            stream,
            _place: place,
        });
        Some((next, (incoming, places)))
    })
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
