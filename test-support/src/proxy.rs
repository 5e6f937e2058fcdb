//! A TCP forwarder on a free loopback port whose target can be switched
//! while it runs: connections made after the switch reach the new target,
//! connections made before stay where they were. It stands in for a DNS
//! name or a cloud "primary endpoint" that moves to the promoted node in a
//! failover.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::free_port;

/// A running forwarder; stops accepting when dropped.
pub struct Proxy {
    /// Where clients connect (127.0.0.1).
    pub port: u16,
    target: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards a free port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Proxy {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy");
        let target = Arc::new(AtomicU16::new(target));
        let current = Arc::clone(&target);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = current.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { port, target, task }
    }

    /// New connections go to `127.0.0.1:target` from now on.
    pub fn switch(&self, target: u16) {
        self.target.store(target, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
