//! A TCP proxy between one authd instance and Redis or PostgreSQL, whose link the fault
//! schedule cuts, blackholes or slows.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Connections are closed (a stopped server).
    Refused,
    /// Connections stay open, nothing passes (a partition).
    Blackhole,
    /// Every chunk waits this long each way.
    Slow(Duration),
}

pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let addr = listener.local_addr().expect("a proxy address");
        let (link, _) = watch::channel(Link::Up);
        let links = link.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                tokio::spawn(serve(client, target, links.subscribe()));
            }
        });
        Self { addr, link, task }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.link.send_replace(Link::Refused);
    }
}

async fn serve(mut client: TcpStream, target: SocketAddr, mut link: watch::Receiver<Link>) {
    let state = *link.borrow_and_update();
    match state {
        Link::Refused => return,
        Link::Blackhole => {
            let _ = link.changed().await;
            return;
        }
        Link::Up | Link::Slow(_) => {}
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        let delay = match *link.borrow() {
            Link::Slow(delay) => Some(delay),
            _ => None,
        };
        tokio::select! {
            read = client.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                if let Some(delay) = delay { tokio::time::sleep(delay).await; }
                if server.write_all(&up[..n]).await.is_err() { return; }
            }
            read = server.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                if let Some(delay) = delay { tokio::time::sleep(delay).await; }
                if client.write_all(&down[..n]).await.is_err() { return; }
            }
            changed = link.changed() => {
                if changed.is_err() { return; }
                match *link.borrow_and_update() {
                    Link::Refused => return,
                    // Both ends stay open and silent until the link changes again; then the
                    // connection is dropped (its state is lost, as after a partition).
                    Link::Blackhole => break,
                    Link::Up | Link::Slow(_) => {}
                }
            }
        }
    }
    let _ = link.changed().await;
    drop((client, server));
}
