//! A UDP proxy for fault injection between real processes: it sits between an edge and
//! the cloud's QUIC port and can drop, delay (and so reorder), duplicate, or cut every
//! datagram in both directions. Its random choices come from a seeded generator, so a
//! schedule's faults are the same on every run with the same seed (process timing
//! still varies).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// What happens to datagrams right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability that a datagram is dropped.
    pub drop: f64,
    /// Probability that a datagram is sent twice.
    pub dup: f64,
    /// Each datagram is held for a uniform random 0..=`delay_ms` (different delays reorder).
    pub delay_ms: u64,
    /// Drop everything: the link is cut.
    pub cut: bool,
}

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub delayed: AtomicU64,
}

struct Shared {
    faults: Mutex<Faults>,
    rng: Mutex<SmallRng>,
    stats: ProxyStats,
}

impl Shared {
    /// The delays with which to send one datagram (empty: drop it).
    fn fate(&self) -> Vec<Duration> {
        let f = *self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        if f.cut || (f.drop > 0.0 && rng.random_bool(f.drop.min(1.0))) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let copies = if f.dup > 0.0 && rng.random_bool(f.dup.min(1.0)) {
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        (0..copies)
            .map(|_| {
                if f.delay_ms == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(rng.random_range(0..=f.delay_ms))
                }
            })
            .collect()
    }
}

/// A running proxy; dropping it stops it.
pub struct UdpProxy {
    /// Where the edge should send (instead of the cloud's QUIC address).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for UdpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpProxy")
            .field("addr", &self.addr)
            .field("faults", &self.faults())
            .finish()
    }
}

/// Sends `buf` on `sock` (to `to`, or the connected peer) after each delay in `fates`.
fn deliver(
    shared: &Arc<Shared>,
    sock: &Arc<UdpSocket>,
    to: Option<SocketAddr>,
    buf: &[u8],
    tasks: &mut JoinSet<()>,
) {
    for delay in shared.fate() {
        shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let send = move |sock: Arc<UdpSocket>, buf: Vec<u8>| async move {
            let _ = match to {
                Some(to) => sock.send_to(&buf, to).await,
                None => sock.send(&buf).await,
            };
        };
        if delay.is_zero() {
            // Best effort, like the network: a full socket buffer drops the datagram.
            let _ = match to {
                Some(to) => sock.try_send_to(buf, to),
                None => sock.try_send(buf),
            };
        } else {
            shared.stats.delayed.fetch_add(1, Ordering::Relaxed);
            let (sock, buf) = (sock.clone(), buf.to_vec());
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                send(sock, buf).await;
            });
        }
    }
}

impl UdpProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr, seed: u64) -> Result<Self> {
        let listen = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = listen.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            stats: ProxyStats::default(),
        });
        let task = tokio::spawn(run(listen, target, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    pub fn set(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    pub fn faults(&self) -> Faults {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cut(&self) {
        self.set(Faults {
            cut: true,
            ..Faults::default()
        });
    }

    pub fn heal(&self) {
        self.set(Faults::default());
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The proxy loop: one upstream socket per client address, so the target sees a
/// distinct source per client (a restarted edge is a new client).
async fn run(listen: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shared>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    // Dropping the set (when this task is aborted) aborts every child task.
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        // Reap finished delayed sends so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
        let Ok((n, from)) = listen.recv_from(&mut buf).await else {
            continue;
        };
        let up = match upstreams.get(&from) {
            Some(up) => up.clone(),
            None => {
                // A loopback source cannot reach a target on another interface.
                let local = if target.ip().is_loopback() {
                    "127.0.0.1:0"
                } else {
                    "0.0.0.0:0"
                };
                let Ok(up) = UdpSocket::bind(local).await else {
                    continue;
                };
                if up.connect(target).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                upstreams.insert(from, up.clone());
                tasks.spawn(reverse(up.clone(), listen.clone(), from, shared.clone()));
                up
            }
        };
        deliver(&shared, &up, None, &buf[..n], &mut tasks);
    }
}

/// Target → client for one client.
async fn reverse(up: Arc<UdpSocket>, listen: Arc<UdpSocket>, to: SocketAddr, shared: Arc<Shared>) {
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        while tasks.try_join_next().is_some() {}
        match up.recv(&mut buf).await {
            Ok(n) => deliver(&shared, &listen, Some(to), &buf[..n], &mut tasks),
            // ICMP "port unreachable" while the target restarts: keep going.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
