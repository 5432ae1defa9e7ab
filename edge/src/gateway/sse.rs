//! Server-sent events: `GET /v1/channels/{channel}/events` with
//! `Accept: text/event-stream`. Each op is an `op` event whose `id:` is the resume
//! token; `Last-Event-ID` (or `?since=`) resumes; comment heartbeats keep proxies open.
//! A slow consumer's stream ends; EventSource reconnects with `Last-Event-ID`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use shared::client::{self, ErrorCode, ServerMsg, UplinkState};
use shared::ChannelName;
use tokio_util::sync::CancellationToken;

use super::views::{since, HistoryQuery};
use super::{channel, credential, now_secs, ApiError, AppState, ConnGuard};
use crate::auth::Action;
use crate::fanout::{Push, SendQueueRx};

/// Unsubscribes when the stream is dropped (client gone, slow, or shutdown).
struct SubGuard {
    state: Arc<AppState>,
    channel: ChannelName,
    conn: u64,
    _slot: ConnGuard,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        self.state.core.unsubscribe(&self.channel, self.conn);
    }
}

struct Live {
    replay: VecDeque<Event>,
    rx: SendQueueRx,
    uplink: tokio::sync::watch::Receiver<UplinkState>,
    kill: CancellationToken,
    shutdown: CancellationToken,
    draining: CancellationToken,
    /// When the credential expires (a token's `exp`); the stream says so and ends.
    expires: Option<tokio::time::Instant>,
    expired: bool,
    _guard: SubGuard,
}

/// The event that ends a stream whose token expired: `token_expired`, with the same
/// JSON as the WebSocket's error. `EventSource` would reconnect with the old token (and
/// be refused): open a new one with a fresh token.
fn expired_event() -> Event {
    Event::default().event("token_expired").data(
        serde_json::to_string(&ServerMsg::error(
            None,
            ErrorCode::TokenExpired,
            "token expired; open a new stream with a fresh token",
        ))
        .unwrap_or_default(),
    )
}

fn event(p: &Push) -> Event {
    let e = Event::default().event(p.event).data(&*p.json);
    match &p.token {
        Some(t) => e.id(&**t),
        None => e,
    }
}

/// An `uplink` event: the same JSON as the WebSocket's `uplink` message.
fn uplink_event(state: UplinkState) -> Event {
    Event::default()
        .event("uplink")
        .data(serde_json::to_string(&ServerMsg::Uplink { state }).unwrap_or_default())
}

pub async fn stream(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
    headers: HeaderMap,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError> {
    let ch = channel(&name)?;
    let p = state.principal(credential(&headers, q.token.as_deref()).as_deref())?;
    p.require(&ch, Action::Subscribe, now_secs())?;
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let since = since(last_id.as_deref().or(q.since.as_deref()))?;
    let slot = state.conns.try_acquire(addr.ip())?;
    let (conn, rx) = state.new_conn(&p.subject);
    // Not synced live here yet: catch up with the cloud first, so the replay is whole.
    state.core.fetch(&ch).await;
    let replay = state.core.subscribe(&ch, &conn, &since);
    let mut events: VecDeque<Event> = replay
        .ops
        .iter()
        .map(|(op, token)| {
            Event::default().event("op").id(token).data(
                serde_json::to_string(&client::op_message(ch.as_str(), op, token.clone()))
                    .unwrap_or_default(),
            )
        })
        .collect();
    let subscribed = ServerMsg::Subscribed {
        id: None,
        channel: ch.to_string(),
        token: replay.token.clone(),
        replayed: replay.ops.len(),
        truncated: replay.truncated,
    };
    events.push_back(
        Event::default()
            .event("subscribed")
            .id(&replay.token)
            .data(serde_json::to_string(&subscribed).unwrap_or_default()),
    );
    // Whether this endpoint syncs with the fleet now, then each change.
    let mut uplink = state.uplink_state.subscribe();
    events.push_back(uplink_event(*uplink.borrow_and_update()));
    let live = Live {
        replay: events,
        rx,
        uplink,
        kill: conn.kill.clone(),
        shutdown: state.shutdown.clone(),
        draining: state.core.draining.clone(),
        expires: p.expires_at.map(|exp| {
            let left = exp.saturating_sub(now_secs()) + 1;
            tokio::time::Instant::now() + Duration::from_secs(left)
        }),
        expired: false,
        _guard: SubGuard {
            state: state.clone(),
            channel: ch,
            conn: conn.id,
            _slot: slot,
        },
    };
    let s = stream::unfold(live, |mut live| async move {
        if let Some(e) = live.replay.pop_front() {
            return Some((Ok::<Event, Infallible>(e), live));
        }
        if live.expired {
            return None;
        }
        let expiry = async {
            match live.expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = live.kill.cancelled() => None,
            () = expiry => {
                live.expired = true;
                Some((Ok(expired_event()), live))
            }
            _ = live.shutdown.cancelled() => None,
            _ = live.draining.cancelled() => None,
            p = live.rx.recv() => Some((Ok(event(&p)), live)),
            Ok(()) = live.uplink.changed() => {
                let now = *live.uplink.borrow_and_update();
                Some((Ok(uplink_event(now)), live))
            }
        }
    });
    let beat = Duration::from_secs(state.cfg.sse_heartbeat_secs);
    Ok(Sse::new(s)
        .keep_alive(KeepAlive::new().interval(beat).text("hb"))
        .into_response())
}
