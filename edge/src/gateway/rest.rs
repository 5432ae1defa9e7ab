//! REST endpoints: publish (backend services), history, state, presence, health,
//! metrics. Errors are JSON `{"error":{"code","number","message"}}` with the HTTP status
//! the code maps to.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use shared::client::{self, ErrorCode, ServerMsg};
use shared::replica::LocalWrite;
use shared::{token, ChannelName, Payload};

use super::views::{ack_json, members, since, state_view, HistoryQuery};
use super::{channel, credential, now_secs, ApiError, AppState};
use crate::auth::{Action, Principal};

#[derive(Debug, Default, Deserialize)]
pub struct AuthQuery {
    pub token: Option<String>,
}

fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    token: Option<&str>,
    ch: &ChannelName,
    action: Action,
) -> Result<Principal, ApiError> {
    let p = state.principal(credential(headers, token).as_deref())?;
    p.require(ch, action, now_secs())?;
    Ok(p)
}

fn body_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let limit = state.cfg.limits.max_message_bytes;
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::MessageTooLarge,
                format!("body exceeds the limit of {limit} bytes"),
            )
        } else {
            ApiError::new(ErrorCode::BadRequest, e.body_text())
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid JSON body: {e}")))
}

/// A durable write over REST: taken in as every transport does, answered once it is
/// durable.
async fn durable(
    state: &AppState,
    ch: &ChannelName,
    w: LocalWrite,
) -> Result<shared::replica::LocalOutcome, ApiError> {
    state.core.preload(ch).await;
    let (out, gen) = state.take_write(ch, w, "rest")?;
    state.core.wait_durable(gen).await?;
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    pub event: String,
    #[serde(default = "Payload::null")]
    pub data: Payload,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub ephemeral: bool,
}

/// `POST /v1/channels/{channel}/events`
pub async fn publish(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<AuthQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    let p = authorize(&state, &headers, q.token.as_deref(), &ch, Action::Publish)?;
    let b: PublishBody = body_json(&state, body)?;
    if b.ephemeral {
        state.publish_ephemeral(&ch, b.event, b.data, Some(p.subject));
        return Ok(Json(ServerMsg::Ack {
            id: None,
            dot: None,
        })
        .into_response());
    }
    let w = LocalWrite::Event {
        kind: b.event,
        data: b.data,
        idempotency_key: b.key,
        by: Some(p.subject),
    };
    let out = durable(&state, &ch, w).await?;
    Ok(Json(ack_json(&out)).into_response())
}

/// `GET /v1/channels/{channel}/events`: SSE when the client accepts
/// `text/event-stream`, otherwise the same as `/history`.
pub async fn events_get(
    state: State<Arc<AppState>>,
    path: Path<String>,
    q: Query<HistoryQuery>,
    headers: HeaderMap,
    conn: axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> Result<Response, ApiError> {
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        super::sse::stream(state, path, q, headers, conn).await
    } else {
        history(state, path, q, headers).await
    }
}

/// `GET /v1/channels/{channel}/history?since=TOKEN&limit=N`
pub async fn history(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    authorize(&state, &headers, q.token.as_deref(), &ch, Action::Subscribe)?;
    let mut vv = since(q.since.as_deref())?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    state.core.fetch(&ch).await;
    let (ops, truncated) = state.core.history(&ch, &vv, limit + 1);
    let more = ops.len() > limit;
    let msgs: Vec<ServerMsg> = ops
        .iter()
        .take(limit)
        .map(|op| {
            vv.raise(op.dot.origin, op.dot.seq);
            client::op_message(ch.as_str(), op, token::encode(&vv))
        })
        .collect();
    Ok(Json(serde_json::json!({
        "channel": ch.as_str(),
        "ops": msgs,
        "token": token::encode(&vv),
        "more": more,
        "truncated": truncated,
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct StateQuery {
    pub token: Option<String>,
    #[serde(default)]
    pub siblings: bool,
    pub context: Option<String>,
}

/// `GET /v1/channels/{channel}/state`
pub async fn state_all(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<StateQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    authorize(&state, &headers, q.token.as_deref(), &ch, Action::Subscribe)?;
    state.core.fetch(&ch).await;
    let keys: Vec<ServerMsg> = state
        .core
        .state_all(&ch)
        .iter()
        .filter(|(_, r)| !r.is_deleted() || q.siblings)
        .map(|(k, r)| state_view(None, &ch, k, Some(r), q.siblings))
        .collect();
    Ok(Json(serde_json::json!({ "channel": ch.as_str(), "keys": keys })).into_response())
}

/// `GET /v1/channels/{channel}/state/{key}`
pub async fn state_get(
    State(state): State<Arc<AppState>>,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<StateQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    authorize(&state, &headers, q.token.as_deref(), &ch, Action::Subscribe)?;
    state.core.fetch(&ch).await;
    let reg = state.core.state_get(&ch, &key);
    Ok(Json(state_view(None, &ch, &key, reg.as_ref(), q.siblings)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    pub value: Payload,
    #[serde(default)]
    pub context: Option<String>,
}

/// `PUT /v1/channels/{channel}/state/{key}` with `{"value":..., "context":...}`
pub async fn state_put(
    State(state): State<Arc<AppState>>,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<StateQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    let p = authorize(&state, &headers, q.token.as_deref(), &ch, Action::State)?;
    let b: PutBody = body_json(&state, body)?;
    let context = since(b.context.as_deref())?;
    let w = LocalWrite::Set {
        key: key.clone(),
        value: b.value,
        context,
        by: Some(p.subject),
    };
    let out = durable(&state, &ch, w).await?;
    state.core.preload(&ch).await;
    let reg = state.core.state_get(&ch, &key);
    Ok(Json(serde_json::json!({
        "ack": ack_json(&out),
        "state": state_view(None, &ch, &key, reg.as_ref(), false),
    }))
    .into_response())
}

/// `DELETE /v1/channels/{channel}/state/{key}?context=...`
pub async fn state_delete(
    State(state): State<Arc<AppState>>,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<StateQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    let p = authorize(&state, &headers, q.token.as_deref(), &ch, Action::State)?;
    let context = since(q.context.as_deref())?;
    let w = LocalWrite::Delete {
        key,
        context,
        by: Some(p.subject),
    };
    let out = durable(&state, &ch, w).await?;
    Ok(Json(ack_json(&out)).into_response())
}

/// `GET /v1/channels/{channel}/presence`
pub async fn presence(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<AuthQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    authorize(&state, &headers, q.token.as_deref(), &ch, Action::Subscribe)?;
    Ok(Json(ServerMsg::Members {
        id: None,
        channel: ch.to_string(),
        members: members(&state, &ch),
    })
    .into_response())
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready while not shutting down, not drained, and (a clustered coordinator) while its
/// shared log stores ops.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if state.core.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "drained by the operator\n").into_response()
    } else if let Err(why) = state.core.shared_log_health() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("shared log: {why}\n"),
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(want) = &state.cfg.ops.metrics_token_sha256 {
        let given = super::credential(&headers, None).unwrap_or_default();
        if !crate::auth::api_key_hash(&given).eq_ignore_ascii_case(want) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "/metrics needs Authorization: Bearer <the metrics token>\n",
            )
                .into_response();
        }
    }
    let (channels, outbox) = state
        .core
        .with_node(|n| (n.channels().count(), n.outbox_len()));
    metrics::gauge!("outpost_channels").set(channels as f64);
    metrics::gauge!("outpost_outbox_ops").set(outbox as f64);
    if let Ok(storage) = state.core.storage() {
        metrics::gauge!("outpost_storage_bytes").set(storage.size_on_disk() as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// What this server is and where its endpoints are.
/// The flowboard demo page (`edge/src/demo/`), served at `/` to browsers.
const DEMO_HTML: &str = include_str!("../demo/index.html");
const DEMO_APP: &str = include_str!("../demo/app.js");
/// The browser SDK (`clients/js/outpost.js`), served so that pages need no build step.
const SDK: &str = include_str!("../../../clients/js/outpost.js");

fn javascript(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /demo/app.js`
pub async fn demo_app() -> Response {
    javascript(DEMO_APP)
}

/// `GET /sdk/outpost.js`
pub async fn sdk() -> Response {
    javascript(SDK)
}

/// `GET /`: the demo page for browsers (`Accept: text/html`), otherwise what this
/// server is, as JSON.
pub async fn index(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if html {
        return (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            DEMO_HTML,
        )
            .into_response();
    }
    Json(serde_json::json!({
        "name": "outpost",
        "version": env!("CARGO_PKG_VERSION"),
        "replica": state.core.id.to_string(),
        "region": state.cfg.region,
        "endpoints": {
            "websocket": "/v1/ws",
            "sse": "/v1/channels/{channel}/events (Accept: text/event-stream)",
            "publish": "POST /v1/channels/{channel}/events",
            "history": "/v1/channels/{channel}/history?since=TOKEN&limit=N",
            "state": "/v1/channels/{channel}/state[/{key}]",
            "presence": "/v1/channels/{channel}/presence",
            "webrtc": "POST /v1/rtc/offer",
            "demo": "/ (Accept: text/html)",
            "sdk": "/sdk/outpost.js",
            "health": ["/healthz", "/readyz"],
            "metrics": "/metrics",
        },
        "protocol": "docs/PROTOCOL.md",
    }))
    .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint (see / for the list)")
}
