//! A TCP proxy put in front of PostgreSQL or Redis, to change the network under a running
//! authd without disturbing anything else: the one proxy of the integration tests and of the
//! fault-injection run (`benches/faults`), which include this file.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // each includer uses some of the modes
pub enum Link {
    /// Forwarding.
    Up,
    /// Connections are closed at once (a stopped server).
    Refused,
    /// Connections stay open but nothing passes (a partition, a hung server); once the link
    /// changes again they are dropped, as after a partition.
    Blackhole,
    /// Every chunk waits this long, each way, one after the other (a congested path).
    Slow(Duration),
    /// What the server sends arrives this late, in order and pipelined; what the client sends
    /// passes at once (a server far away).
    Delayed(Duration),
}

pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    target: watch::Sender<SocketAddr>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let addr = listener.local_addr().expect("a proxy address");
        let (link, _) = watch::channel(Link::Up);
        let (target, targets) = watch::channel(target);
        let links = link.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let target = *targets.borrow();
                tokio::spawn(serve(client, target, links.subscribe()));
            }
        });
        Self {
            addr,
            link,
            target,
            task,
        }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// New connections go to `target` from now on (a managed endpoint's name moving to a
    /// promoted standby).
    #[allow(dead_code)] // the fault run's
    pub fn retarget(&self, target: SocketAddr) {
        self.target.send_replace(target);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.link.send_replace(Link::Refused);
    }
}

async fn serve(client: TcpStream, target: SocketAddr, mut link: watch::Receiver<Link>) {
    let state = *link.borrow_and_update();
    match state {
        Link::Refused => return,
        Link::Blackhole => {
            let _ = link.changed().await;
            return;
        }
        Link::Up | Link::Slow(_) | Link::Delayed(_) => {}
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = tokio::spawn(pump(client_read, server_write, link.clone(), false));
    let down = tokio::spawn(pump(server_read, client_write, link, true));
    let _ = tokio::join!(up, down);
}

/// Copies one direction (`replies`: server to client) as the link says, until either end closes
/// or the link is cut.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    replies: bool,
) {
    let (send, mut queue) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut writer_link = link.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = queue.recv().await {
            tokio::time::sleep_until(at).await;
            let state = *writer_link.borrow_and_update();
            if matches!(state, Link::Blackhole | Link::Refused) {
                // Silent (the connection stays open) until the link changes, then dropped.
                if state == Link::Blackhole {
                    let _ = writer_link.changed().await;
                }
                return;
            }
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => {
                let Ok(n @ 1..) = read else { break };
                let now = *link.borrow();
                let at = match now {
                    Link::Slow(delay) => {
                        tokio::time::sleep(delay).await;
                        Instant::now()
                    }
                    Link::Delayed(delay) if replies => Instant::now() + delay,
                    _ => Instant::now(),
                };
                if send.send((at, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            changed = link.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *link.borrow_and_update();
                match now {
                    Link::Refused => break,
                    Link::Blackhole => {
                        // Silent until the link changes again, then dropped (the writer
                        // holds its end open meanwhile).
                        let _ = link.changed().await;
                        return;
                    }
                    Link::Up | Link::Slow(_) | Link::Delayed(_) => {}
                }
            }
        }
    }
    // What was read is still delivered (a close after the last bytes), unless cut.
    drop(send);
    if *link.borrow() == Link::Refused {
        writer.abort();
    } else {
        let _ = writer.await;
    }
}
