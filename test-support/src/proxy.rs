//! A TCP forwarder on a free loopback port whose target can be switched
//! while it runs: connections made after the switch reach the new target,
//! connections made before stay where they were. It stands in for a DNS
//! name or a cloud "primary endpoint" that moves to the promoted node in a
//! failover, and for a bad network between a client and its server: the
//! link can be slowed (every byte arrives `delay` after it was sent) or cut
//! (bytes are held, in both directions and on every connection, as a
//! partition that drops packets would: no FIN, no RST, the sender's
//! writes block once about 1 MiB is held; a connection made meanwhile is
//! accepted and reaches its target once the cut heals). Connections can
//! also be stranded: those open now never carry another byte and are
//! never closed, as when a NAT or load balancer forgets them, while new
//! ones work; or stranded from birth, for a while: accepted, never
//! forwarded, never closed, as behind a load balancer whose backend went
//! silent; or stranded or slowed once they send given bytes (a query's
//! text), so that one question of a client goes unanswered for ever, or
//! is answered late.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::free_port;

/// What the link between the proxy's clients and the target does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Forwards at once.
    Up,
    /// Forwards every chunk `delay` after it arrived (order kept).
    Delayed(Duration),
    /// Forwards nothing until the link changes.
    Cut,
}

/// Chunks held per direction of a connection (each up to 16 KiB).
const HELD_CHUNKS: usize = 64;

/// A running forwarder; stops accepting when dropped.
pub struct Proxy {
    /// Where clients connect (127.0.0.1).
    pub port: u16,
    target: Arc<AtomicU16>,
    link: watch::Sender<Link>,
    /// Connections made before this stranding are stranded.
    stranded: Arc<AtomicU64>,
    /// Whether connections made now are stranded from the start.
    swallowing: Arc<AtomicBool>,
    /// How many connections were stranded from the start.
    swallowed: Arc<AtomicU64>,
    /// Bytes that strand the connection that sends them.
    marker: Marker,
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
        let (link, watching) = watch::channel(Link::Up);
        let stranded = Arc::new(AtomicU64::new(0));
        let strandings = Arc::clone(&stranded);
        let swallowing = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let (swallow, count) = (Arc::clone(&swallowing), Arc::clone(&swallowed));
        let marker = Marker::default();
        let marking = marker.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = current.load(Ordering::SeqCst);
                let mut link = watching.clone();
                if swallow.load(Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::SeqCst);
                    // Held, silent, until the proxy goes.
                    tokio::spawn(async move {
                        let _client = client;
                        while link.changed().await.is_ok() {}
                    });
                    continue;
                }
                let open = Open {
                    strandings: Arc::clone(&strandings),
                    made_after: strandings.load(Ordering::SeqCst),
                    marked: Arc::new(Mutex::new(None)),
                    marker: marking.clone(),
                };
                tokio::spawn(async move {
                    // A connection made during a cut waits for it to heal.
                    if link.wait_for(|l| *l != Link::Cut).await.is_err() {
                        return;
                    }
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await {
                        forward(client, server, link, open).await;
                    }
                });
            }
        });
        Proxy {
            port,
            target,
            link,
            stranded,
            swallowing,
            swallowed,
            marker,
            task,
        }
    }

    /// New connections go to `127.0.0.1:target` from now on.
    pub fn switch(&self, target: u16) {
        self.target.store(target, Ordering::SeqCst);
    }

    /// Sets what the link does, for every connection, open or new.
    pub fn set_link(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// Every connection open now carries nothing more, in either
    /// direction, and stays open (until the proxy is dropped); new ones
    /// work.
    pub fn strand(&self) {
        self.stranded.fetch_add(1, Ordering::SeqCst);
        // Wakes every pump, so a stranded one stops at once.
        self.link.send_modify(|_| {});
    }

    /// While `on`, every connection made is stranded from the start:
    /// accepted, never forwarded, never closed (until the proxy is
    /// dropped), even after this is turned off.
    pub fn strand_new(&self, on: bool) {
        self.swallowing.store(on, Ordering::SeqCst);
    }

    /// How many connections [`Proxy::strand_new`] has stranded so far.
    pub fn stranded_new(&self) -> u64 {
        self.swallowed.load(Ordering::SeqCst)
    }

    /// From now on (`Some`) until `None`, a connection that sends a chunk
    /// containing `bytes` is marked there, for good: [`Marked::Strand`]
    /// strands it (that chunk is not forwarded either), as if the network
    /// dropped it at that moment: with a query's text, that question is
    /// never answered; [`Marked::Delay`] delays that chunk and every later
    /// one, both ways; [`Marked::Close`] closes the connection.
    pub fn mark_on(&self, bytes: Option<Mark>) {
        *self.marker.bytes.lock().expect("marker") = bytes;
    }

    /// How many connections [`Proxy::mark_on`] has marked so far.
    pub fn marked(&self) -> u64 {
        self.marker.hits.load(Ordering::SeqCst)
    }
}

/// What becomes of a connection that sent the bytes of [`Proxy::mark_on`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// Stranded: carries nothing more, never closed.
    Strand,
    /// Every chunk forwarded this long after it arrived.
    Delay(Duration),
    /// Closed at once, both ways (that chunk is not forwarded): as a
    /// server that went away (restarted, failed over) in the middle of
    /// the question.
    Close,
}

/// Bytes that mark a connection, and what becomes of it.
type Mark = (&'static [u8], Marked);

/// Bytes that mark a connection (see [`Proxy::mark_on`]).
#[derive(Clone, Default)]
struct Marker {
    bytes: Arc<Mutex<Option<Mark>>>,
    hits: Arc<AtomicU64>,
}

/// Whether a connection has been stranded (see [`Proxy::strand`]) or
/// marked (see [`Proxy::mark_on`]).
#[derive(Clone)]
struct Open {
    strandings: Arc<AtomicU64>,
    made_after: u64,
    /// What became of it once it sent the marker's bytes.
    marked: Arc<Mutex<Option<Marked>>>,
    marker: Marker,
}

impl Open {
    fn stranded(&self) -> bool {
        self.marked() == Some(Marked::Strand)
            || self.strandings.load(Ordering::SeqCst) > self.made_after
    }

    fn marked(&self) -> Option<Marked> {
        *self.marked.lock().expect("marked")
    }

    /// Marks the connection if `chunk` holds the marker's bytes.
    fn mark(&self, chunk: &[u8]) {
        let Some((bytes, then)) = *self.marker.bytes.lock().expect("marker") else {
            return;
        };
        let mut marked = self.marked.lock().expect("marked");
        if marked.is_none() && chunk.windows(bytes.len()).any(|w| w == bytes) {
            *marked = Some(then);
            self.marker.hits.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards both directions until either ends.
async fn forward(client: TcpStream, server: TcpStream, link: watch::Receiver<Link>, open: Open) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, link.clone(), open.clone());
    let down = pump(server_read, client_write, link, open);
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

/// Reads chunks from `from` as they come and writes each to `to` when the
/// link lets it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    open: Open,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(HELD_CHUNKS);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((arrived, chunk)) = rx.recv().await {
            open.mark(&chunk);
            if open.marked() == Some(Marked::Close) {
                // Both halves are dropped with the connection's task.
                return;
            }
            loop {
                let now = match (*link.borrow_and_update(), open.marked()) {
                    (Link::Cut, _) => Link::Cut,
                    (Link::Delayed(link), Some(Marked::Delay(marked))) => {
                        Link::Delayed(link.max(marked))
                    }
                    (_, Some(Marked::Delay(marked))) => Link::Delayed(marked),
                    (now, _) => now,
                };
                if open.stranded() {
                    // Held open, silent, until the proxy goes.
                    while link.changed().await.is_ok() {}
                    return;
                }
                match now {
                    Link::Up => break,
                    Link::Delayed(delay) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(arrived + delay) => break,
                            changed = link.changed() => if changed.is_err() { return },
                        }
                    }
                    Link::Cut => {
                        if link.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        if open.stranded() {
            // Not even the end is passed on.
            while link.changed().await.is_ok() {}
            return;
        }
        let _ = to.shutdown().await;
    };
    // The write side ends once the read side's EOF is forwarded.
    let reading = tokio::spawn(read);
    write.await;
    reading.abort();
}
