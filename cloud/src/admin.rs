//! The operator API, served by the cloud under `/v1/admin` and guarded by an operator
//! key (`[[auth.operator_keys]]`): the fleet, channels, a timeline of fleet events, the
//! reconciliation report, and actions (drain an edge, revoke an edge, evict a channel
//! from the edges).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edge::core::{now_ms, Core};
use edge::gateway::{channel, credential, ApiError, AppState};
use serde::Deserialize;
use shared::client::ErrorCode;
use shared::ReplicaId;

use crate::fleet::Fleet;
use crate::session::Sessions;
use crate::shared_fleet::{self, FleetCommand, SharedFleet};

/// Edges whose credentials an operator revoked at run time (persisted).
#[derive(Debug, Default)]
pub struct Revocations {
    names: Mutex<BTreeSet<String>>,
}

const REVOKED_KEY: &str = "revoked_edges";

impl Revocations {
    pub fn load(core: &Core) -> Self {
        let names = core
            .storage()
            .ok()
            .and_then(|s| s.meta(REVOKED_KEY).ok().flatten())
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        Self {
            names: Mutex::new(names),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.lock().map(|g| g.contains(name)).unwrap_or(false)
    }

    /// Adds `name` to the persisted list.
    pub fn add(&self, core: &Core, name: &str) -> Result<(), ApiError> {
        let bytes = {
            let mut g = self.names.lock().unwrap_or_else(|p| p.into_inner());
            g.insert(name.to_owned());
            serde_json::to_vec(&*g).unwrap_or_default()
        };
        core.storage()
            .map_err(|e| ApiError::new(ErrorCode::StorageUnavailable, e.to_string()))?
            .set_meta(REVOKED_KEY, &bytes)
            .map_err(|e| ApiError::new(ErrorCode::StorageUnavailable, e.to_string()))
    }
}

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub struct Admin {
    pub state: Arc<AppState>,
    pub fleet: Arc<Fleet>,
    pub revoked: Arc<Revocations>,
    /// Clustered: the fleet state shared with the other coordinators.
    pub shared: Option<Arc<SharedFleet>>,
    /// The dashboard's sessions (cookie instead of the key).
    pub sessions: Arc<Sessions>,
}

impl Admin {
    /// Sends `c` to every coordinator; alone (embedded, or NATS unreachable) acts on
    /// this one's links. Says whether it reached the whole fleet.
    async fn command(&self, c: FleetCommand) -> bool {
        if let Some(shared) = &self.shared {
            match shared.command(&c).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "fleet command not sent to the other coordinators; acting on this one's links")
                }
            }
        }
        shared_fleet::act(&self.fleet, &self.state.core, &c);
        self.shared.is_none()
    }
}

/// The operator a request comes from: its key (`Authorization: Bearer`, `X-Api-Key`)
/// or its dashboard session cookie.
fn operator(admin: &Admin, headers: &HeaderMap) -> Result<String, ApiError> {
    let key = credential(headers, None);
    if key.is_none() {
        if let Some(who) = admin.sessions.operator(headers) {
            return Ok(who);
        }
    }
    admin
        .state
        .auth
        .verify_operator(key.as_deref())
        .map_err(ApiError::from)
}

/// Trades the operator key (in a header, never in the URL) for a session cookie.
async fn open_session(State(a): State<Admin>, headers: HeaderMap) -> Result<Response, ApiError> {
    let key = credential(&headers, None);
    let who = a
        .state
        .auth
        .verify_operator(key.as_deref())
        .map_err(ApiError::from)?;
    let cookie = a
        .sessions
        .open(&who, a.state.cfg.tls.is_some())
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "no randomness for a session id"))?;
    Ok((
        axum::http::StatusCode::NO_CONTENT,
        [(axum::http::header::SET_COOKIE, cookie)],
    )
        .into_response())
}

async fn close_session(State(a): State<Admin>, headers: HeaderMap) -> Response {
    let cookie = a.sessions.close(&headers);
    (
        axum::http::StatusCode::NO_CONTENT,
        [(axum::http::header::SET_COOKIE, cookie)],
    )
        .into_response()
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/dashboard", get(dashboard))
        .route("/dashboard.js", get(dashboard_js))
        .route(
            "/v1/admin/session",
            post(open_session).delete(close_session),
        )
        .route("/v1/admin/stream", get(stream))
        .route("/v1/admin/edges", get(edges))
        .route("/v1/admin/channels", get(channels))
        .route("/v1/admin/timeline", get(timeline))
        .route("/v1/admin/conflicts", get(conflicts))
        .route("/v1/admin/edges/{edge}/drain", post(drain))
        .route("/v1/admin/edges/{edge}/revoke", post(revoke))
        .route("/v1/admin/channels/{channel}/evict", post(evict))
        .with_state(admin)
}

/// The dashboard's Content-Security-Policy: its own script file only (no inline
/// script, so markup that slipped through unescaped cannot run), requests to this
/// origin only, never framed.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard page (it asks for the operator key once and trades it for a session
/// cookie, `crate::session`).
async fn dashboard() -> Response {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        include_str!("../assets/dashboard.html"),
    )
        .into_response()
}

/// The dashboard's script; it renders everything it shows as escaped text.
async fn dashboard_js() -> Response {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/dashboard.js"),
    )
        .into_response()
}

/// Everything the dashboard shows, as one JSON value.
fn snapshot(a: &Admin) -> serde_json::Value {
    let names = a.fleet.names();
    let edges: Vec<serde_json::Value> = a
        .fleet
        .list()
        .into_iter()
        .map(|e| {
            let id = names.iter().find(|(_, n)| **n == e.name).map(|(id, _)| *id);
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            v["ops_in"] = id.map_or(0, |id| a.state.core.received_ops(id)).into();
            v
        })
        .collect();
    let events = a.fleet.events_since(0);
    let events = &events[events.len().saturating_sub(50)..];
    let conflicts = a
        .state
        .core
        .storage()
        .ok()
        .and_then(|s| s.conflicts(None, 0, u64::MAX, 10_000).ok())
        .unwrap_or_default();
    let conflicts: Vec<serde_json::Value> = conflicts[conflicts.len().saturating_sub(20)..]
        .iter()
        .map(|r| conflict_json(&names, r))
        .collect();
    serde_json::json!({
        "time_ms": now_ms(),
        "edges": edges,
        "events": events,
        "conflicts": conflicts,
    })
}

/// `GET /v1/admin/stream?key=...`: the dashboard's live feed, a `fleet` event per
/// second (server-sent events; EventSource cannot send headers, hence the query key).
async fn stream(State(a): State<Admin>, headers: HeaderMap) -> Result<Response, ApiError> {
    operator(&a, &headers)?;
    let shutdown = a.state.shutdown.clone();
    let s = futures_util::stream::unfold((a, true), move |(a, first)| {
        let shutdown = shutdown.clone();
        async move {
            if !first {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
            let ev = axum::response::sse::Event::default()
                .event("fleet")
                .data(snapshot(&a).to_string());
            Some((Ok::<_, std::convert::Infallible>(ev), (a, false)))
        }
    });
    Ok(axum::response::sse::Sse::new(s)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

fn conflict_json(
    names: &HashMap<ReplicaId, String>,
    r: &edge::storage::ConflictRecord,
) -> serde_json::Value {
    let w = |x: &shared::state::WriteInfo| {
        serde_json::json!({
            "dot": x.dot.to_string(),
            "origin": x.dot.origin.to_string(),
            "origin_edge": names.get(&x.dot.origin).cloned(),
            "hlc": format!("{:?}", x.hlc),
            "deleted": x.deleted,
        })
    };
    serde_json::json!({
        "time_ms": r.time_ms,
        "channel": r.channel,
        "key": r.conflict.key,
        "reason": r.conflict.reason,
        "winner": w(&r.conflict.winner),
        "losers": r.conflict.losers.iter().map(w).collect::<Vec<_>>(),
    })
}

async fn edges(State(a): State<Admin>, headers: HeaderMap) -> Result<Response, ApiError> {
    operator(&a, &headers)?;
    Ok(Json(serde_json::json!({ "edges": a.fleet.list() })).into_response())
}

async fn channels(State(a): State<Admin>, headers: HeaderMap) -> Result<Response, ApiError> {
    operator(&a, &headers)?;
    let names = a.fleet.names();
    let now = now_ms();
    let list = a.state.core.with_node(|n| {
        n.channels()
            .map(|c| {
                let held_by: Vec<String> = n
                    .peers()
                    .iter()
                    .filter(|(_, p)| p.interest.contains(c.channel()))
                    .map(|(id, _)| names.get(id).cloned().unwrap_or_else(|| id.to_string()))
                    .collect();
                let recent = c
                    .log()
                    .rev()
                    .take_while(|op| op.hlc.wall_ms + 60_000 >= now)
                    .count();
                serde_json::json!({
                    "channel": c.channel().as_str(),
                    "ops": c.vv().total(),
                    "retained_ops": c.log().len(),
                    "bytes": c.approx_bytes(),
                    "keys": c.state().len(),
                    "edges": held_by,
                    "ops_per_sec_1m": recent as f64 / 60.0,
                })
            })
            .collect::<Vec<_>>()
    });
    Ok(Json(serde_json::json!({ "channels": list })).into_response())
}

#[derive(Debug, Deserialize)]
struct SinceQuery {
    #[serde(default)]
    since_ms: u64,
}

async fn timeline(
    State(a): State<Admin>,
    headers: HeaderMap,
    Query(q): Query<SinceQuery>,
) -> Result<Response, ApiError> {
    operator(&a, &headers)?;
    Ok(Json(serde_json::json!({ "events": a.fleet.events_since(q.since_ms) })).into_response())
}

#[derive(Debug, Deserialize)]
struct ConflictQuery {
    channel: Option<String>,
    #[serde(default)]
    from_ms: u64,
    to_ms: Option<u64>,
    limit: Option<usize>,
}

async fn conflicts(
    State(a): State<Admin>,
    headers: HeaderMap,
    Query(q): Query<ConflictQuery>,
) -> Result<Response, ApiError> {
    operator(&a, &headers)?;
    let ch = q.channel.as_deref().map(channel).transpose()?;
    let recs = a
        .state
        .core
        .storage()
        .map_err(|e| ApiError::new(ErrorCode::StorageUnavailable, e.to_string()))?
        .conflicts(
            ch.as_ref(),
            q.from_ms,
            q.to_ms.unwrap_or(u64::MAX),
            q.limit.unwrap_or(1000).clamp(1, 10_000),
        )
        .map_err(|e| ApiError::new(ErrorCode::StorageUnavailable, e.to_string()))?;
    let names = a.fleet.names();
    let entries: Vec<serde_json::Value> = recs.iter().map(|r| conflict_json(&names, r)).collect();
    Ok(Json(serde_json::json!({ "conflicts": entries })).into_response())
}

/// Finds an edge by name or replica id among those that ever connected.
fn find_edge(a: &Admin, key: &str) -> Result<(ReplicaId, String), ApiError> {
    a.fleet
        .names()
        .into_iter()
        .find(|(id, name)| name == key || id.to_string() == key)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no edge named {key:?} has connected"),
            )
        })
}

async fn drain(
    State(a): State<Admin>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let who = operator(&a, &headers)?;
    let (id, name) = find_edge(&a, &key)?;
    let fleet_wide = a
        .command(FleetCommand::Drain {
            edge: id.to_string(),
        })
        .await;
    a.fleet
        .event(&name, "drained", &format!("by operator {who}"));
    tracing::warn!(edge = %name, operator = %who, "drain requested");
    Ok(Json(serde_json::json!({ "drained": name, "fleet_wide": fleet_wide })).into_response())
}

async fn revoke(
    State(a): State<Admin>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let who = operator(&a, &headers)?;
    let (id, name) = find_edge(&a, &key)?;
    a.revoked.add(&a.state.core, &name)?;
    a.state.core.router.kill(id);
    // Clustered: every coordinator refuses it and drops its link.
    let fleet_wide = match &a.shared {
        None => true,
        Some(shared) => match shared.revoke(&name).await {
            Ok(()) => true,
            Err(e) => {
                return Err(ApiError::new(
                    ErrorCode::StorageUnavailable,
                    format!("revoked on this coordinator only; the fleet state is unreachable ({e}): try again"),
                ))
            }
        },
    };
    a.fleet
        .event(&name, "revoked", &format!("by operator {who}"));
    tracing::warn!(edge = %name, operator = %who, "edge credentials revoked");
    Ok(Json(serde_json::json!({ "revoked": name, "fleet_wide": fleet_wide })).into_response())
}

async fn evict(
    State(a): State<Admin>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let who = operator(&a, &headers)?;
    let ch = channel(&name)?;
    let edges = a.fleet.list().iter().filter(|e| e.connected).count();
    let fleet_wide = a
        .command(FleetCommand::Evict {
            channel: ch.to_string(),
        })
        .await;
    tracing::info!(channel = %ch, operator = %who, edges, "eviction requested");
    Ok(
        Json(serde_json::json!({ "evict": ch.as_str(), "edges": edges, "fleet_wide": fleet_wide }))
            .into_response(),
    )
}
