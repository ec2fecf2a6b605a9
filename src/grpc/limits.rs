//! A cap on the connections served at once: a connection is accepted only while fewer than
//! `GRPC__MAX_CONNECTIONS` are open, and holds its place until it closes. (tonic bounds streams
//! per connection and message sizes, but not connections.) Together with the per-connection
//! HTTP/2 flow-control window, this bounds the memory unauthenticated callers can make the
//! server hold. With TLS on (see `grpc::tls`), each handshake runs in a task of its own, bounded
//! in time, so slow handshakes cannot hold up the accepting of others.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use rustls_pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::Connected;

use super::tls::TlsServer;

/// A TLS handshake must complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What handlers learn of the connection (in the request's extensions).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, end entity first (mutual TLS).
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection and its place among the connections served.
pub struct Limited {
    conn: Conn,
    info: PeerInfo,
    _place: OwnedSemaphorePermit,
}

/// Places, then connections: past the cap, connections queue in the kernel's backlog instead of
/// costing memory here.
fn accepted(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    max: usize,
) -> impl Stream<Item = io::Result<(TcpStream, OwnedSemaphorePermit)>> + Send + 'static {
    let places = Arc::new(Semaphore::new(max));
    let incoming = Box::pin(incoming);
    futures::stream::unfold((incoming, places), |(mut incoming, places)| async move {
        let place = places.clone().acquire_owned().await.ok()?;
        let next = incoming.next().await?;
        Some((next.map(|stream| (stream, place)), (incoming, places)))
    })
}

/// `incoming`, accepting a connection only while fewer than `max` are open.
pub fn limit(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    max: usize,
) -> impl Stream<Item = io::Result<Limited>> + Send + 'static {
    accepted(incoming, max).map(|next| {
        next.map(|(stream, place)| Limited {
            info: PeerInfo {
                remote: stream.peer_addr().ok(),
                certificates: None,
            },
            conn: Conn::Plain(stream),
            _place: place,
        })
    })
}

/// The same, each connection through a TLS handshake with the server's current configuration.
/// Connections whose handshake fails or times out are dropped (and logged at debug level).
pub fn limit_tls(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    max: usize,
    tls: Arc<TlsServer>,
) -> impl Stream<Item = io::Result<Limited>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Limited>>(64);
    tokio::spawn(async move {
        let mut accepted = Box::pin(accepted(incoming, max));
        loop {
            let next = tokio::select! {
                () = sender.closed() => return,
                next = accepted.next() => next,
            };
            let (stream, place) = match next {
                Some(Ok(next)) => next,
                Some(Err(error)) => {
                    if sender.send(Err(error)).await.is_err() {
                        return;
                    }
                    continue;
                }
                None => return,
            };
            let (acceptor, sender) = (tls.acceptor(), sender.clone());
            tokio::spawn(async move {
                let remote = stream.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let certificates = stream.get_ref().1.peer_certificates().map(|chain| {
                            Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect())
                        });
                        let limited = Limited {
                            conn: Conn::Tls(Box::new(stream)),
                            info: PeerInfo {
                                remote,
                                certificates,
                            },
                            _place: place,
                        };
                        let _ = sender.send(Ok(limited)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, ?remote, "TLS handshake failed"),
                    Err(_) => tracing::debug!(?remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

impl Connected for Limited {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.conn {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
