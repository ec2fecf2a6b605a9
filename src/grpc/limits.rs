//! A cap on the connections served at once: a connection is accepted only while fewer than
//! `GRPC__MAX_CONNECTIONS` are open, and holds its place until it closes. (tonic bounds streams
//! per connection and message sizes, but not connections.) Together with the per-connection
//! HTTP/2 flow-control window, this bounds the memory unauthenticated callers can make the
//! server hold. So that one host cannot take every place with silent sockets:
//!
//! - one address holds at most `GRPC__MAX_CONNECTIONS_PER_ADDRESS` places (a connection over
//!   that is closed at once);
//! - a connection must send its opening bytes within [`FIRST_BYTE_TIMEOUT`] — on the gRPC ports
//!   the whole HTTP/2 preface and the header of its SETTINGS frame ([`HTTP2_OPENING`]), so one
//!   byte does not hold a place — after its TLS handshake, which must itself finish within
//!   [`HANDSHAKE_TIMEOUT`], in a task of its own;
//! - and, in `app`, every connection lives at most a bounded age, and HTTP/2 keepalive pings
//!   drop peers that stop answering.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
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
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that has not sent its opening bytes by then is closed.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);
/// What an HTTP/2 client sends first: the 24-byte preface, then a SETTINGS frame (9-byte header).
pub const HTTP2_OPENING: usize = 24 + 9;

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

/// How many connections to serve at once, and what each must send in time.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// In all (at least 1).
    pub total: usize,
    /// Per client address — an IPv6 address counted per /64, as the rate limits count it (0: no
    /// cap).
    pub per_address: usize,
    /// Bytes a connection must send within [`FIRST_BYTE_TIMEOUT`] (after TLS).
    pub opening_bytes: usize,
    /// `RATE_LIMIT__IPV6_PREFIX`: IPv6 addresses are counted per network of this many bits.
    pub ipv6_prefix: u8,
}

/// How many places each client address holds.
type Held = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// An accepted connection's place: among all connections, and among its address's.
struct Place {
    _total: OwnedSemaphorePermit,
    address: Option<(IpAddr, Held)>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some((ip, counts)) = self.address.take() {
            let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

/// An accepted connection and its place among the connections served.
pub struct Limited {
    conn: Conn,
    info: PeerInfo,
    /// Until the opening bytes have arrived: when the connection is given up, and how many
    /// bytes are still awaited.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
    awaited: usize,
    _place: Place,
}

/// Places, then connections: past the cap, connections queue in the kernel's backlog instead of
/// costing memory here. A connection from an address already holding its share is closed.
fn accepted(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    caps: Caps,
) -> impl Stream<Item = io::Result<(TcpStream, Place)>> + Send + 'static {
    let places = Arc::new(Semaphore::new(caps.total));
    let counts: Held = Arc::default();
    let incoming = Box::pin(incoming);
    futures::stream::unfold(
        (incoming, places, counts),
        move |(mut incoming, places, counts)| async move {
            loop {
                let total = places.clone().acquire_owned().await.ok()?;
                let stream = match incoming.next().await? {
                    Ok(stream) => stream,
                    Err(error) => return Some((Err(error), (incoming, places, counts))),
                };
                let ip = stream
                    .peer_addr()
                    .ok()
                    .map(|a| crate::auth::input::network(a.ip(), caps.ipv6_prefix));
                let address = match (ip, caps.per_address) {
                    (Some(ip), cap) if cap > 0 => {
                        let mut held = counts.lock().unwrap_or_else(|e| e.into_inner());
                        let n = held.entry(ip).or_default();
                        if *n >= cap {
                            tracing::debug!(%ip, "connection refused: its address holds its share");
                            continue;
                        }
                        *n += 1;
                        Some((ip, counts.clone()))
                    }
                    _ => None,
                };
                let place = Place {
                    _total: total,
                    address,
                };
                return Some((Ok((stream, place)), (incoming, places, counts)));
            }
        },
    )
}

fn first_byte_deadline() -> Option<Pin<Box<tokio::time::Sleep>>> {
    Some(Box::pin(tokio::time::sleep(FIRST_BYTE_TIMEOUT)))
}

/// `incoming`, accepting a connection only while the caps allow.
pub fn limit(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    caps: Caps,
) -> impl Stream<Item = io::Result<Limited>> + Send + 'static {
    accepted(incoming, caps).map(move |next| {
        next.map(|(stream, place)| Limited {
            info: PeerInfo {
                remote: stream.peer_addr().ok(),
                certificates: None,
            },
            conn: Conn::Plain(stream),
            first_byte: first_byte_deadline(),
            awaited: caps.opening_bytes,
            _place: place,
        })
    })
}

/// The same, each connection through a TLS handshake with the server's current configuration.
/// Connections whose handshake fails or times out are dropped (and logged at debug level).
pub fn limit_tls(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    caps: Caps,
    tls: Arc<TlsServer>,
) -> impl Stream<Item = io::Result<Limited>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Limited>>(64);
    tokio::spawn(async move {
        let mut accepted = Box::pin(accepted(incoming, caps));
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
                            first_byte: first_byte_deadline(),
                            awaited: caps.opening_bytes,
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
        let filled = buf.filled().len();
        let polled = match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if self.first_byte.is_some() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > filled => {
                    self.awaited = self.awaited.saturating_sub(buf.filled().len() - filled);
                    if self.awaited == 0 {
                        self.first_byte = None;
                    }
                }
                Poll::Pending => {
                    if let Some(deadline) = self.first_byte.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "nothing received",
                        )));
                    }
                }
                _ => {}
            }
        }
        polled
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
