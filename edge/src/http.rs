//! The gateway's HTTP accept loop (over TLS with `[tls]`, see `crate::https`). `axum::serve` sets no header-read timeout and no
//! cap on open sockets, so a slowloris client or a connection flood could hold file
//! descriptors forever. This loop (hyper's HTTP/1 server with upgrades):
//!
//! - closes a connection that has not sent a request's headers within
//!   `limits.header_timeout_secs` (slowloris);
//! - accepts and immediately closes sockets beyond `limits.max_sockets` (counted until
//!   a WebSocket upgrade, after which `max_connections` applies), so the process keeps
//!   descriptors for storage, the uplink and its clients;
//! - backs off when `accept` fails (out of descriptors) instead of spinning, and
//!   keeps serving the connections it has.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::https::ClientTls;
use crate::proxy::{client_addr, Network};

/// Socket-level limits of the accept loop.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub max_sockets: usize,
    pub header_timeout: Duration,
    /// Proxies whose forwarding headers name the client (`crate::proxy`).
    pub trusted_proxies: Arc<[Network]>,
}

/// How the accept loop stops: `drain` after `shutdown` fires it stops accepting (in
/// between, new connections are served one request each: `/readyz` says 503, so a
/// load balancer sees the node draining before connections are refused), then open
/// requests get at most `grace` to finish.
#[derive(Clone, Copy, Debug)]
pub struct Stopping {
    pub drain: Duration,
    pub grace: Duration,
}

/// Runs one connection: until it ends, or until shutdown (then gracefully). A
/// connection accepted while draining gets `grace` in all.
macro_rules! drive {
    ($conn:expr, $draining:expr, $stopping:expr, $stop:expr, $addr:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        if $draining {
            let _ = tokio::time::timeout($stopping.grace, conn.as_mut()).await;
        } else {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!(peer = %$addr, error = %e, "connection ended");
                    }
                }
                () = $stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        }
    }};
}

/// Serves `app` on `listener` until `shutdown` (and `stopping.drain` after it); over
/// TLS when `tls` is set.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<ClientTls>,
    shutdown: CancellationToken,
    stopping: Stopping,
) {
    let max = limits.max_sockets.clamp(1, u32::MAX as usize);
    let open = Arc::new(Semaphore::new(max));
    let mut last_warn: Option<Instant> = None;
    let stop_accepting = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(stopping.drain).await;
        }
    };
    tokio::pin!(stop_accepting);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut stop_accepting => break,
        };
        let (stream, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Most likely out of file descriptors (EMFILE): wait for some to free
                // up; the connections already open keep working.
                metrics::counter!("outpost_accept_errors_total").increment(1);
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    last_warn = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics::counter!("outpost_sockets_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let trusted = limits.trusted_proxies.clone();
        let svc = service_fn(move |mut req: hyper::Request<Incoming>| {
            // Handlers see the client's address: behind a trusted proxy, the one its
            // forwarding headers name.
            let client = client_addr(addr, req.headers(), &trusted);
            req.extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(client));
            let mut app = app.clone();
            async move { app.call(req).await }
        });
        let stop = shutdown.clone();
        // Accepted while draining: one request, then the connection closes.
        let draining = shutdown.is_cancelled();
        let tls = tls.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            // HTTP/1.1 with upgrades (WebSockets), over TCP or TLS.
            macro_rules! serve_h1 {
                ($io:expr) => {{
                    let mut b = http1::Builder::new();
                    b.timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .keep_alive(!draining);
                    drive!(
                        b.serve_connection(TokioIo::new($io), svc).with_upgrades(),
                        draining,
                        stopping,
                        stop,
                        addr
                    );
                }};
            }
            let Some(tls) = tls else {
                serve_h1!(stream);
                drop(permit);
                return;
            };
            // The handshake is bounded like the request headers (slowloris).
            let stream =
                match tokio::time::timeout(header_timeout, tls.acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        metrics::counter!("outpost_tls_handshake_failures_total").increment(1);
                        tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                        drop(permit);
                        return;
                    }
                    Err(_) => {
                        metrics::counter!("outpost_tls_handshake_failures_total").increment(1);
                        drop(permit);
                        return;
                    }
                };
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                // HTTP/2: a page's SSE streams and REST calls share this connection.
                // (WebSockets go over HTTP/1.1 connections: browsers open one when the
                // server does not offer extended CONNECT.)
                let mut b = http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new());
                drive!(
                    b.serve_connection(TokioIo::new(stream), svc),
                    draining,
                    stopping,
                    stop,
                    addr
                );
            } else {
                serve_h1!(stream);
            }
            drop(permit);
        });
    }
    drop(listener);
    // Wait for open HTTP requests to finish (WebSockets close themselves on shutdown).
    let _ = tokio::time::timeout(stopping.grace, open.acquire_many(max as u32)).await;
}
