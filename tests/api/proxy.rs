//! A TCP proxy the tests put in front of PostgreSQL or Redis, to cut the network under a running
//! authd without disturbing any other test.
use std::net::SocketAddr;

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Forwarding.
    Up,
    /// Connections are closed at once (a stopped server).
    Refused,
    /// Connections stay open but nothing passes (a partition, a hung server).
    Blackhole,
}

pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, _) = watch::channel(Link::Up);
        let links = link.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, target, links.subscribe()));
            }
        });
        Self { addr, link, task }
    }

    pub fn set(&self, state: Link) {
        self.link.send_replace(state);
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
            // Hold the connection silently until the link changes, then drop it.
            let _ = link.changed().await;
            return;
        }
        Link::Up => {}
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        cut = link.wait_for(|l| *l != Link::Up) => cut.map(|l| *l).unwrap_or(Link::Refused),
    };
    if cut == Link::Blackhole {
        // Keep both ends open but silent until the link changes again.
        let _ = link.changed().await;
    }
}
