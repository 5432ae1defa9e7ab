//! Outpost edge node: the I/O shell around the replication core.
//!
//! - [`config`]: TOML + environment + flags, validated.
//! - [`storage`]: sled behind `shared::store::Store`; [`core`]: the node, residency,
//!   output execution; [`commit`]: the group-commit queue.
//! - [`fanout`]: fan-out to local subscribers, per-connection send queues, presence.
//! - [`link`]: the QUIC link to the cloud; [`startup`]: what the binaries share.
//! - [`auth`]: JWT and API keys; [`gateway`]: WebSocket, SSE and REST (axum).
//!
//! [`run`] serves the gateway on a listener until a shutdown token fires.

pub mod auth;
pub mod commit;
pub mod config;
pub mod core;
pub mod fanout;
pub mod gateway;
pub mod http;
pub mod https;
pub mod jwks;
pub mod link;
pub mod proxy;
pub mod startup;
pub mod storage;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use shared::sync::Role;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::EdgeConfig;
use crate::core::Core;
use crate::gateway::AppState;

/// Why the edge could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Core(#[from] crate::core::CoreError),
    #[error("auth configuration: {0}")]
    Auth(String),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("[tls]: {0}")]
    Tls(String),
}

/// A started server, for callers that embed it (the cloud, tests).
#[derive(Debug)]
pub struct Running {
    pub core: Arc<Core>,
    pub state: Arc<AppState>,
    /// `[tls]`: the listener serves HTTPS and WSS.
    pub tls: Option<https::ClientTls>,
}

impl Running {
    /// `https` with `[tls]`, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Opens storage and builds the gateway state for a replica in `role`.
pub fn build(
    cfg: EdgeConfig,
    role: Role,
    shutdown: CancellationToken,
) -> Result<Running, RunError> {
    build_with_log(cfg, role, None, shutdown)
}

/// [`build`] for a coordinator of the clustered cloud tier: ops are durable once
/// `shared_log` stored them.
pub fn build_with_log(
    cfg: EdgeConfig,
    role: Role,
    shared_log: Option<Arc<dyn core::SharedLog>>,
    shutdown: CancellationToken,
) -> Result<Running, RunError> {
    // Certificates first: a bad [tls] section fails before anything starts.
    let tls = cfg
        .tls
        .as_ref()
        .map(https::ClientTls::new)
        .transpose()
        .map_err(|e| RunError::Tls(e.to_string()))?;
    let cfg = Arc::new(cfg);
    // The recorder first: opening storage already records (e.g. a repair).
    let _ = gateway::metrics_handle();
    telemetry::register(role, shared_log.is_some());
    let auth = Authenticator::new(&cfg.auth).map_err(RunError::Auth)?;
    let core = Core::open(&cfg, role, shared_log)?;
    core.spawn_background(shutdown.clone());
    let state = Arc::new(AppState::new(
        core.clone(),
        auth,
        cfg.clone(),
        shutdown.clone(),
    ));
    if let Some(url) = &cfg.auth.jwks_url {
        core.tasks.spawn(jwks::refresh(
            state.auth.clone(),
            url.clone(),
            Duration::from_secs(cfg.auth.jwks_refresh_secs.max(1)),
            shutdown.clone(),
        ));
    }
    // Presence expiry.
    let hub_state = state.clone();
    let stop = shutdown.clone();
    core.tasks.spawn(async move {
        let ttl = Duration::from_secs(hub_state.cfg.presence.ttl_secs);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    hub_state.core.fanout.expire_presence(ttl);
                    hub_state.core.set_clients(hub_state.conns.count() as u64);
                }
            }
        }
    });
    Ok(Running { core, state, tls })
}

/// Serves the client gateway on `listener` until `shutdown` fires, then closes
/// clients with a "go elsewhere and resume" code and flushes storage.
pub async fn serve(running: &Running, listener: TcpListener) -> Result<(), RunError> {
    serve_with(running, listener, axum::Router::new()).await
}

/// Like [`serve`], with extra routes merged in (the cloud's operator API).
pub async fn serve_with(
    running: &Running,
    listener: TcpListener,
    extra: axum::Router,
) -> Result<(), RunError> {
    let state = running.state.clone();
    let shutdown = state.shutdown.clone();
    // `extra` (the cloud's operator API and dashboard) and `/metrics` go to the
    // operations listener when there is one.
    let (app, ops) = match state.cfg.ops.listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "operations listener (metrics, operator API)");
            (
                gateway::router(state.clone()),
                Some((listener, extra.merge(gateway::ops_router(state.clone())))),
            )
        }
        None => (extra.merge(gateway::router(state.clone())), None),
    };
    let grace = Duration::from_millis(state.cfg.shutdown_grace_ms);
    let limits = http::HttpLimits {
        max_sockets: state.cfg.limits.max_sockets,
        header_timeout: Duration::from_secs(state.cfg.limits.header_timeout_secs),
        trusted_proxies: state.cfg.limits.trusted_proxies.clone().into(),
    };
    // WebSocket connections see the token and close themselves with 4101.
    let stopping = http::Stopping {
        drain: Duration::from_millis(state.cfg.shutdown_drain_ms),
        grace,
    };
    if let Some(tls) = &running.tls {
        running
            .core
            .tasks
            .spawn(tls.clone().watch(shutdown.clone()));
    }
    let tls = running.tls.clone();
    match ops {
        Some((ops_listener, ops_app)) => {
            let ops_limits = limits.clone();
            tokio::join!(
                http::serve(
                    listener,
                    app,
                    limits,
                    tls.clone(),
                    shutdown.clone(),
                    stopping
                ),
                http::serve(ops_listener, ops_app, ops_limits, tls, shutdown, stopping),
            );
        }
        None => http::serve(listener, app, limits, tls, shutdown, stopping).await,
    }
    // Give connection tasks a moment to send their close frames, wait for every
    // background task (each stops on `shutdown`; the group committer flushes last),
    // then make sure everything acknowledged is on disk.
    tokio::time::sleep(grace.min(Duration::from_millis(200))).await;
    running.core.tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), running.core.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = running.core.tasks.len(),
            "background tasks still running 10 s after shutdown"
        );
    }
    running
        .core
        .storage()
        .map_err(RunError::Core)?
        .flush()
        .await
        .map_err(|e| RunError::Core(e.into()))?;
    tracing::info!("edge stopped");
    Ok(())
}

/// Runs an edge: storage, gateway, the uplink to the cloud (when configured),
/// background tasks, until `shutdown`.
pub async fn run(
    cfg: EdgeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let running = start(cfg, shutdown)?;
    serve(&running, listener).await
}

/// The first half of [`run`]: opens storage (which fails if another process holds the
/// data dir) and starts the uplink and background tasks; [`serve`] is the second.
pub fn start(cfg: EdgeConfig, shutdown: CancellationToken) -> Result<Running, RunError> {
    let uplink = cfg.uplink.clone();
    let region = cfg.region.clone();
    let data_dir = cfg.data_dir.clone();
    let running = build(cfg, Role::Edge, shutdown.clone())?;
    if let Some(up) = uplink {
        let (core, cache, stop) = (
            running.core.clone(),
            running.state.cfg.cache.clone(),
            shutdown.clone(),
        );
        running.core.tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(cache.sweep_secs));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        core.evict(Duration::from_secs(cache.ttl_secs), cache.max_bytes);
                    }
                }
            }
        });
        let core = running.core.clone();
        let status = link::uplink::Reporting {
            status: running.state.uplink.clone(),
            state: running.state.uplink_state.clone(),
        };
        let stop = shutdown.clone();
        running.core.tasks.spawn(async move {
            if let Err(e) = link::uplink::run(core, data_dir, up, region, status, stop).await {
                tracing::error!(error = %e, "uplink stopped");
            }
        });
    }
    Ok(running)
}
