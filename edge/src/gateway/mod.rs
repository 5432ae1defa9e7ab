//! The client gateway (axum): WebSocket, SSE and REST over one listener, with auth,
//! limits, health and metrics. The cloud serves the same gateway.

mod conn;
pub mod paths;
mod protocol;
pub mod rest;
pub mod rtc;
pub mod sse;
pub mod views;
pub mod ws;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use shared::client::ErrorCode;
use shared::ChannelName;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Authenticator, Principal};
use crate::config::EdgeConfig;
use crate::core::Core;

/// Everything a request handler needs.
pub struct AppState {
    pub core: Arc<Core>,
    pub auth: Arc<Authenticator>,
    pub cfg: Arc<EdgeConfig>,
    pub conns: Arc<ConnLimiter>,
    pub shutdown: CancellationToken,
    pub metrics: PrometheusHandle,
    /// The edge's link to the cloud, when it has one.
    pub uplink: Arc<Mutex<crate::link::uplink::UplinkStatus>>,
    /// Whether it is up, for clients (`connected.uplink` and `uplink` messages).
    pub uplink_state: Arc<tokio::sync::watch::Sender<shared::client::UplinkState>>,
    /// Permits for WebRTC peer connections (`webrtc.max_peers`).
    pub rtc_peers: Arc<tokio::sync::Semaphore>,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(
        core: Arc<Core>,
        auth: Authenticator,
        cfg: Arc<EdgeConfig>,
        shutdown: CancellationToken,
    ) -> Self {
        let uplink = if cfg.uplink.is_some() {
            shared::client::UplinkState::Disconnected
        } else {
            shared::client::UplinkState::NoUplink
        };
        Self {
            uplink_state: Arc::new(tokio::sync::watch::Sender::new(uplink)),
            conns: Arc::new(ConnLimiter::new(
                cfg.limits.max_connections,
                cfg.limits.max_connections_per_ip,
            )),
            rtc_peers: Arc::new(tokio::sync::Semaphore::new(cfg.webrtc.max_peers)),
            core,
            auth: Arc::new(auth),
            cfg,
            shutdown,
            metrics: metrics_handle(),
            uplink: Arc::default(),
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh connection handle for the fan-out, with its bounded queue.
    pub fn new_conn(
        &self,
        subject: &str,
    ) -> (crate::fanout::ConnHandle, crate::fanout::SendQueueRx) {
        let id = self.next_conn_id();
        let (tx, rx) = crate::fanout::SendQueue::new(self.cfg.limits.send_queue);
        (
            crate::fanout::ConnHandle {
                id,
                client: format!("{}-{id:x}", self.core.id).into(),
                subject: subject.into(),
                tx,
                kill: CancellationToken::new(),
                kill_reason: Arc::new(std::sync::atomic::AtomicU8::new(crate::fanout::KILL_NONE)),
            },
            rx,
        )
    }

    /// A client's durable write, as every transport takes it in: counted by kind and
    /// transport (`outpost_ops_in_total`), then applied. Returns its outcome and the
    /// generation whose flush makes it durable (ack after `core.wait_durable`).
    pub(crate) fn take_write(
        &self,
        ch: &ChannelName,
        w: shared::replica::LocalWrite,
        via: &'static str,
    ) -> Result<(shared::replica::LocalOutcome, u64), ApiError> {
        let kind = match &w {
            shared::replica::LocalWrite::Event { .. } => "event",
            shared::replica::LocalWrite::Set { .. } => "set",
            shared::replica::LocalWrite::Delete { .. } => "delete",
        };
        metrics::counter!("outpost_ops_in_total", "kind" => kind, "via" => via).increment(1);
        Ok(self.core.apply(ch, w)?)
    }

    /// A client's ephemeral publish, as every transport takes it in: fanned out to the
    /// channel's subscribers now (and to other edges), never stored.
    pub(crate) fn publish_ephemeral(
        &self,
        ch: &ChannelName,
        event: String,
        data: shared::Payload,
        from: Option<String>,
    ) {
        self.core.ephemeral(
            ch,
            shared::Ephemeral {
                kind: event,
                data,
                from,
            },
        );
    }

    /// Verifies the request's credential.
    pub fn principal(&self, credential: Option<&str>) -> Result<Principal, ApiError> {
        self.auth.verify(credential).map_err(|e| {
            metrics::counter!("outpost_auth_failures_total", "code" => e.code.to_string())
                .increment(1);
            ApiError::from(e)
        })
    }
}

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0,
                ])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed; the handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Connection counting, global and per IP.
#[derive(Debug)]
pub struct ConnLimiter {
    max: usize,
    max_per_ip: usize,
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Releases a connection slot when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        Self {
            max,
            max_per_ip,
            inner: Mutex::new((0, HashMap::new())),
        }
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, ApiError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 >= self.max {
            return Err(ApiError::new(
                ErrorCode::TooManyConnections,
                format!("this server is at its limit of {} connections", self.max),
            ));
        }
        let n = g.1.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(ApiError::new(
                ErrorCode::TooManyConnections,
                format!(
                    "{ip} already has {} connections (the per-IP limit)",
                    self.max_per_ip
                ),
            ));
        }
        *n += 1;
        g.0 += 1;
        metrics::gauge!("outpost_connections").set(g.0 as f64);
        Ok(ConnGuard {
            limiter: self.clone(),
            ip,
        })
    }

    pub fn count(&self) -> usize {
        self.inner.lock().map(|g| g.0).unwrap_or(0)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut g = self.limiter.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
        metrics::gauge!("outpost_connections").set(g.0 as f64);
    }
}

/// An error answer: HTTP status from the code, JSON body `{"error":{code,message}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::new(e.code, e.message)
    }
}

impl From<crate::core::CoreError> for ApiError {
    fn from(e: crate::core::CoreError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("outpost_errors_total", "code" => self.code.to_string()).increment(1);
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(serde_json::json!({
                "error": { "code": self.code, "number": self.code.number(), "message": self.message }
            })),
        )
            .into_response()
    }
}

/// Parses a channel name from a path or message.
pub fn channel(name: &str) -> Result<ChannelName, ApiError> {
    ChannelName::new(name)
        .map_err(|e| ApiError::new(ErrorCode::BadChannel, format!("channel {name:?}: {e}")))
}

/// The credential of a request: `Authorization: Bearer`, `X-Api-Key`, or `?token=`.
pub fn credential(headers: &HeaderMap, query_token: Option<&str>) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or(query_token)
        .map(str::to_owned)
}

/// Unix seconds.
pub fn now_secs() -> u64 {
    crate::core::now_ms() / 1000
}

/// The operations listener's router (`[ops] listen`): `/metrics` and the probes.
pub fn ops_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(rest::metrics))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .with_state(state)
}

/// The whole client-facing router.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.limits.max_message_bytes;
    let channels = paths::channel_routes().with_state(state.clone());
    let r = paths::channel_routes()
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/rtc/offer", axum::routing::post(rtc::offer))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .route("/", get(rest::index))
        .route("/demo/app.js", get(rest::demo_app))
        .route("/sdk/outpost.js", get(rest::sdk));
    // `/metrics` here unless the operations listener serves it (`ops_router`).
    let r = if state.cfg.ops.listen.is_none() {
        r.route("/metrics", get(rest::metrics))
    } else {
        r
    };
    let r = if state.cfg.testing.websocket_echo {
        r.route("/v1/test/echo", get(ws::echo))
    } else {
        r
    };
    // Credentials travel in headers or the query string, never in cookies, so any
    // origin may call: a page served by one endpoint fails over to the others.
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods(tower_http::cors::Any)
        .allow_headers(tower_http::cors::Any)
        .max_age(std::time::Duration::from_secs(3600));
    r.fallback(move |req| paths::fallback(channels.clone(), req))
        .layer(DefaultBodyLimit::max(limit))
        .layer(cors)
        .with_state(state)
}
