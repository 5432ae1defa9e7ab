//! The WebSocket endpoint `/v1/ws`: JSON messages (see `shared::client` and
//! docs/PROTOCOL.md). One task per connection reads requests, writes replies and
//! queued pushes, and keeps acks in request order while writes are pipelined.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesOrdered;
use futures_util::task::AtomicWaker;
use futures_util::{Future, FutureExt, Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use shared::client::{self, dot_string, ClientMsg, CloseCode, ErrorCode, ServerMsg, UplinkState};
use shared::replica::{LocalOutcome, LocalWrite};
use shared::{ChannelName, Ephemeral};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::rest::{members, since, state_view};
use super::{channel, credential, now_secs, ApiError, AppState, ConnGuard};
use crate::auth::{Action, Principal};
use crate::fanout::{ConnHandle, SendQueueRx};

/// Requests whose acks wait (for durability, or for their turn) before the connection
/// stops reading more.
const MAX_PENDING_ACKS: usize = 256;

/// tungstenite's read chunk: an idle connection keeps one allocated, so it is most of
/// an idle connection's memory; a larger message takes a few more reads.
const READ_BUFFER: usize = 1024;

#[derive(Debug, Default, Deserialize)]
pub struct WsQuery {
    pub token: Option<String>,
}

/// `GET /v1/ws`
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_cancelled() || state.core.draining.is_cancelled() {
        return ApiError::new(ErrorCode::BadState, "shutting down: use another endpoint")
            .into_response();
    }
    let slot = match state.conns.try_acquire(addr.ip()) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let cred = credential(&headers, q.token.as_deref());
    // tungstenite's own limit sits above ours, so an oversized message gets our error
    // code and the connection stays up; far larger frames are refused by tungstenite.
    let max = state.cfg.limits.max_message_bytes;
    // Frames gather in an 8 KiB write buffer until the connection task flushes (after
    // a batch of queued messages): one write per batch instead of one per message.
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(8 * 1024)
        .max_message_size(max * 4 + 4096)
        .max_frame_size(max * 4 + 4096)
        .on_upgrade(move |socket| {
            // A debug-level span: with the default `info` filter it is disabled, so
            // polling the connection does not enter and leave it on every wake (7 %
            // of a fan-out's instructions); `RUST_LOG=edge=debug` brings it back.
            let span = tracing::debug_span!("ws", peer = %addr);
            async move { serve(state, socket, slot, cred).await }.instrument(span)
        })
}

/// `GET /v1/test/echo` (only with `[testing] websocket_echo`): echoes every text and
/// binary message on the production WebSocket stack and limits, for the Autobahn
/// conformance cases.
pub async fn echo(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let slot = match state.conns.try_acquire(addr.ip()) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let max = state.cfg.limits.max_message_bytes;
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(max * 4 + 4096)
        .max_frame_size(max * 4 + 4096)
        .on_upgrade(move |mut socket| async move {
            let _slot = slot;
            while let Some(Ok(m)) = socket.recv().await {
                let reply = match m {
                    Message::Text(_) | Message::Binary(_) => m,
                    // tungstenite answers pings and completes the closing handshake
                    // itself; reading on until the stream ends lets it do so.
                    Message::Close(_) | Message::Ping(_) | Message::Pong(_) => continue,
                };
                if socket.send(reply).await.is_err() {
                    break;
                }
            }
        })
}

type Ack = Pin<Box<dyn Future<Output = ServerMsg> + Send>>;

struct Conn {
    state: Arc<AppState>,
    principal: Option<Principal>,
    handle: Option<ConnHandle>,
    queue: Option<SendQueueRx>,
    subs: HashSet<ChannelName>,
    acks: FuturesOrdered<Ack>,
    tokens: f64,
    refilled: Instant,
    _slot: ConnGuard,
}

async fn close<K: Sink<Message> + Unpin>(sink: &mut K, code: CloseCode, reason: &str) {
    close_with(sink, code as u16, reason).await;
}

async fn close_with<K: Sink<Message> + Unpin>(sink: &mut K, code: u16, reason: &str) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: client::close_reason(reason).into(),
        })))
        .await;
}

/// A transport's read error, as the close frame that tells the client why its
/// connection ends (RFC 6455 §7.4.1), if one is owed.
pub(crate) trait ReadError {
    fn close_frame(self) -> Option<(u16, String)>;
}

impl ReadError for axum::Error {
    fn close_frame(self) -> Option<(u16, String)> {
        use tungstenite::error::{CapacityError, Error as WsError};
        let e = self.into_inner().downcast::<WsError>().ok()?;
        match *e {
            WsError::Utf8(_) => Some((1007, "text message is not valid UTF-8".into())),
            WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => Some((
                1009,
                format!("message of {size} bytes exceeds the limit of {max_size}"),
            )),
            WsError::Capacity(e) => Some((1009, e.to_string())),
            WsError::Protocol(e) => Some((1002, e.to_string())),
            _ => None,
        }
    }
}

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

/// The `id` of a request that could not be served (too large, or not a valid
/// message), when it is a JSON object with a numeric `id`: the error then answers
/// that request. Skims the rest without building it.
fn request_id(t: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<u64>,
    }
    serde_json::from_str::<IdOnly>(t).ok().and_then(|m| m.id)
}

/// Waits until queued messages are ready to pop (none before `connect`).
fn queue_ready(q: &mut Option<SendQueueRx>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match q {
        Some(q) => q.poll_ready(cx),
        None => Poll::Pending,
    })
}

async fn next_ack(acks: &mut FuturesOrdered<Ack>) -> ServerMsg {
    if acks.is_empty() {
        return std::future::pending().await;
    }
    match acks.next().await {
        Some(m) => m,
        None => std::future::pending().await,
    }
}

async fn sleep_until_expiry(exp: Option<u64>) {
    match exp {
        Some(exp) => {
            let left = exp.saturating_sub(now_secs()) + 1;
            tokio::time::sleep(Duration::from_secs(left)).await
        }
        None => std::future::pending().await,
    }
}

/// What ended a connection's wait for rare events.
enum Event {
    Stop(&'static str),
    Kill,
    Idle,
    Expired,
    /// The endpoint's cloud link came up or went down.
    Uplink(UplinkState),
}

/// Resolves when the uplink state changes, handing the receiver back to wait again.
type UplinkWatch =
    Pin<Box<dyn Future<Output = (UplinkState, watch::Receiver<UplinkState>)> + Send>>;

fn watch_uplink(mut rx: watch::Receiver<UplinkState>) -> UplinkWatch {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            // The sender is gone (shutdown): nothing will change any more.
            std::future::pending::<()>().await;
        }
        let state = *rx.borrow_and_update();
        (state, rx)
    })
}

/// Polls a group of futures only after one of them woke the task (or after
/// [`WakeGate::rearm`], when one was replaced): they get a waker of their own that
/// raises a flag and then wakes the task.
struct WakeGate {
    inner: Arc<GateFlag>,
    waker: Waker,
}

struct GateFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for GateFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl WakeGate {
    fn new() -> Self {
        let inner = Arc::new(GateFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(inner.clone());
        Self { inner, waker }
    }

    /// Makes the next poll poll the group (a future in it was replaced or reset).
    fn rearm(&self) {
        self.inner.woken.store(true, Ordering::Release);
    }

    fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        group: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.inner.task.register(cx.waker());
        if !self.inner.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        group(&mut Context::from_waker(&self.waker))
    }
}

/// Serves one client connection over a message transport: a WebSocket, or the
/// WebRTC data channels (`super::rtc`), which carry the same messages. One object is
/// both the sink and the stream (no lock between a split pair's halves).
pub(crate) async fn serve<T, E>(
    state: Arc<AppState>,
    mut io: T,
    slot: ConnGuard,
    cred: Option<String>,
) where
    T: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin,
    E: ReadError,
{
    let limits = state.cfg.limits.clone();
    let mut conn = Conn {
        state: state.clone(),
        principal: None,
        handle: None,
        queue: None,
        subs: HashSet::new(),
        acks: FuturesOrdered::new(),
        tokens: f64::from(limits.publish_burst),
        refilled: Instant::now(),
        _slot: slot,
    };
    // A token in the URL or header authenticates at once; otherwise the first
    // message must be `connect` (unless anonymous access is on).
    if cred.is_some() || state.cfg.auth.allow_anonymous {
        match state.principal(cred.as_deref()) {
            Ok(p) => {
                let hello = conn.authenticated(p, None);
                if io.send(text(&hello)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = io
                    .send(text(&ServerMsg::error(None, e.code, &e.message)))
                    .await;
                close(&mut io, CloseCode::Unauthorized, &e.message).await;
                return;
            }
        }
    }
    // Shutdown, drain, the fan-out's kill switch, the idle timeout and the token's expiry
    // are pinned here once and polled through a gate: only when one of them has woken
    // the task, not on every wake to write a message (polling them all each time took
    // a fifth of the fan-out's instructions).
    let (shutdown, draining) = (state.shutdown.clone(), state.core.draining.clone());
    let mut stop = std::pin::pin!(async move {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => "server shutting down: reconnect to another endpoint and resume",
            () = draining.cancelled() => "this edge is being drained: reconnect to another endpoint and resume",
        }
    });
    // The hub's kill switch, once `connect` has made this a fan-out connection (until
    // then a switch that never fires).
    let kill_of = |conn: &Conn| {
        conn.handle
            .as_ref()
            .map_or_else(CancellationToken::new, |h| h.kill.clone())
    };
    let mut kill = std::pin::pin!(kill_of(&conn).cancelled_owned());
    let mut kill_armed = conn.handle.is_some();
    // Reading a message just notes the time; the idle timer, when it fires early,
    // moves to the new deadline.
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let mut last_read = tokio::time::Instant::now();
    let mut idle_timer = std::pin::pin!(tokio::time::sleep_until(last_read + idle));
    let mut exp = conn.principal.as_ref().and_then(|p| p.expires_at);
    let mut expiry = std::pin::pin!(sleep_until_expiry(exp));
    // Uplink changes, told to the client once it is connected (the `connected` reply
    // carries the state at that moment).
    let mut uplink = watch_uplink(state.uplink_state.subscribe());
    let gate = WakeGate::new();
    let read_gate = WakeGate::new();
    loop {
        let rare = std::future::poll_fn(|cx| {
            gate.poll(cx, |cx| {
                if let Poll::Ready(reason) = stop.as_mut().poll(cx) {
                    return Poll::Ready(Event::Stop(reason));
                }
                if let Poll::Ready((now, rx)) = uplink.as_mut().poll(cx) {
                    uplink = watch_uplink(rx);
                    return Poll::Ready(Event::Uplink(now));
                }
                if kill.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Kill);
                }
                if idle_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Idle);
                }
                if expiry.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Expired);
                }
                Poll::Pending
            })
        });
        tokio::select! {
            biased;
            ev = rare => match ev {
                Event::Stop(reason) => {
                    close(&mut io, CloseCode::GoingAwayResume, reason).await;
                    break;
                }
                Event::Kill => {
                    let code = conn.handle.as_ref().map(ConnHandle::kill_code).unwrap_or(CloseCode::GoingAwayResume);
                    let reason = match code {
                        CloseCode::SlowConsumerResume => "slow consumer: reconnect and resume with your tokens",
                        _ => "go elsewhere and resume",
                    };
                    close(&mut io, code, reason).await;
                    break;
                }
                Event::Idle => {
                    if last_read + idle > tokio::time::Instant::now() {
                        idle_timer.as_mut().reset(last_read + idle);
                        gate.rearm();
                        continue;
                    }
                    close(&mut io, CloseCode::IdleTimeout, "idle timeout").await;
                    break;
                }
                Event::Expired => {
                    let _ = io.send(text(&ServerMsg::error(None, ErrorCode::TokenExpired, "token expired"))).await;
                    close(&mut io, CloseCode::Unauthorized, "token expired: reconnect with a fresh token").await;
                    break;
                }
                Event::Uplink(now) => {
                    gate.rearm();
                    if conn.handle.is_some() && io.send(text(&ServerMsg::Uplink { state: now })).await.is_err() {
                        break;
                    }
                }
            },
            // Up to fanout::BATCH queued messages go out in one write.
            () = queue_ready(&mut conn.queue) => {
                let mut failed = false;
                while let Some(p) = conn.queue.as_mut().and_then(SendQueueRx::pop) {
                    if io.feed(Message::Text(p.json.clone())).await.is_err() { failed = true; break; }
                }
                if failed || io.flush().await.is_err() { break; }
            }
            // The read side too is polled only when the socket woke it (or right after
            // a message, as more may be buffered). Requests already read are handled
            // before their acks are written, so a burst of publishes is acked in one
            // write; at most MAX_PENDING_ACKS wait, then reading pauses.
            m = std::future::poll_fn(|cx| read_gate.poll(cx, |cx| io.poll_next_unpin(cx))), if conn.acks.len() < MAX_PENDING_ACKS => {
                read_gate.rearm();
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        if let Some((code, reason)) = e.close_frame() {
                            tracing::debug!(code, reason, "closing: the client broke the WebSocket protocol");
                            close_with(&mut io, code, &reason).await;
                        }
                        break;
                    }
                    None => break,
                };
                last_read = tokio::time::Instant::now();
                let replies = match m {
                    Message::Text(t) => conn.on_text(&t),
                    Message::Binary(_) => vec![ServerMsg::error(None, ErrorCode::BadRequest, "binary messages are not part of the protocol; send JSON text")],
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => Vec::new(),
                };
                if !replies.is_empty() {
                    let mut failed = false;
                    for r in &replies {
                        if io.feed(text(r)).await.is_err() { failed = true; break; }
                    }
                    if failed || io.flush().await.is_err() { break; }
                }
                // `connect` may have authenticated (a new kill switch) or renewed the
                // token (a new expiry).
                if !kill_armed && conn.handle.is_some() {
                    kill_armed = true;
                    kill.set(kill_of(&conn).cancelled_owned());
                    gate.rearm();
                }
                let now_exp = conn.principal.as_ref().and_then(|p| p.expires_at);
                if now_exp != exp {
                    exp = now_exp;
                    expiry.set(sleep_until_expiry(exp));
                    gate.rearm();
                }
            }
            // Every ack that is ready goes out in one write.
            ack = next_ack(&mut conn.acks) => {
                if io.feed(text(&ack)).await.is_err() { break; }
                let mut failed = false;
                while let Some(Some(ack)) = conn.acks.next().now_or_never() {
                    if io.feed(text(&ack)).await.is_err() { failed = true; break; }
                }
                if failed || io.flush().await.is_err() { break; }
            }
        }
    }
    conn.cleanup();
}

impl Conn {
    fn authenticated(&mut self, p: Principal, id: Option<u64>) -> ServerMsg {
        if self.handle.is_none() {
            let (handle, queue) = self.state.new_conn(&p.subject);
            self.handle = Some(handle);
            self.queue = Some(queue);
        }
        self.principal = Some(p);
        ServerMsg::Connected {
            id,
            uplink: *self.state.uplink_state.borrow(),
            client: self
                .handle
                .as_ref()
                .map(|h| h.client.to_string())
                .unwrap_or_default(),
            replica: self.state.core.id.to_string(),
        }
    }

    fn cleanup(&mut self) {
        if let Some(h) = &self.handle {
            for ch in self.subs.drain() {
                self.state.core.unsubscribe(&ch, h.id);
            }
        }
    }

    fn on_text(&mut self, t: &str) -> Vec<ServerMsg> {
        let limit = self.state.cfg.limits.max_message_bytes;
        if t.len() > limit {
            return vec![ServerMsg::error(
                request_id(t),
                ErrorCode::MessageTooLarge,
                format!("message of {} bytes exceeds the limit of {limit}", t.len()),
            )];
        }
        let msg: ClientMsg = match serde_json::from_str(t) {
            Ok(m) => m,
            Err(e) => {
                return vec![ServerMsg::error(
                    request_id(t),
                    ErrorCode::BadRequest,
                    format!("not a valid message: {e}"),
                )];
            }
        };
        if let Some(h) = &self.handle {
            self.state.core.fanout.touch(h.id, &self.subs);
        }
        match self.on_msg(msg) {
            Ok(replies) => replies,
            Err((id, e)) => {
                metrics::counter!("outpost_errors_total", "code" => e.code.to_string())
                    .increment(1);
                vec![ServerMsg::error(id, e.code, e.message)]
            }
        }
    }

    fn take_token(&mut self) -> bool {
        let l = &self.state.cfg.limits;
        let now = Instant::now();
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens =
            (self.tokens + dt * f64::from(l.publish_rate_per_sec)).min(f64::from(l.publish_burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Checks the principal's right on a channel; returns the parsed channel.
    fn authorize(&self, name: &str, action: Action) -> Result<(ChannelName, &Principal), ApiError> {
        let p = self.principal.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send {\"type\":\"connect\",\"token\":...} first",
            )
        })?;
        let ch = channel(name)?;
        p.require(&ch, action, now_secs())?;
        Ok((ch, p))
    }

    fn queue_write(
        &mut self,
        id: Option<u64>,
        ch: &ChannelName,
        w: LocalWrite,
    ) -> Result<(), ApiError> {
        if !self.take_token() {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} writes per second on this connection",
                    self.state.cfg.limits.publish_rate_per_sec
                ),
            ));
        }
        let kind = match &w {
            LocalWrite::Event { .. } => "event",
            LocalWrite::Set { .. } => "set",
            LocalWrite::Delete { .. } => "delete",
        };
        metrics::counter!("outpost_ops_in_total", "kind" => kind, "via" => "ws").increment(1);
        let (outcome, gen) = self.state.core.apply(ch, w)?;
        let dot = match outcome {
            LocalOutcome::Applied(a) => a.op.dot,
            LocalOutcome::Duplicate(d) => d,
        };
        let core = self.state.core.clone();
        self.acks.push_back(Box::pin(async move {
            match core.wait_durable(gen).await {
                Ok(()) => ServerMsg::Ack {
                    id,
                    dot: Some(dot_string(dot)),
                },
                Err(e) => ServerMsg::error(id, e.code(), e.to_string()),
            }
        }));
        Ok(())
    }

    fn on_msg(&mut self, msg: ClientMsg) -> Result<Vec<ServerMsg>, (Option<u64>, ApiError)> {
        match msg {
            ClientMsg::Connect { id, token } => {
                let p = self
                    .state
                    .principal(token.as_deref())
                    .map_err(|e| (id, e))?;
                Ok(vec![self.authenticated(p, id)])
            }
            ClientMsg::Ping { id } => Ok(vec![ServerMsg::Pong { id }]),
            ClientMsg::Subscribe {
                id,
                channel,
                since: tok,
            } => self
                .subscribe(&channel, tok.as_deref(), id)
                .map_err(|e| (id, e)),
            ClientMsg::Unsubscribe { id, channel } => {
                let ch = self::channel(&channel).map_err(|e| (id, e))?;
                if self.subs.remove(&ch) {
                    if let Some(h) = &self.handle {
                        self.state.core.unsubscribe(&ch, h.id);
                    }
                }
                Ok(vec![ServerMsg::Unsubscribed { id, channel }])
            }
            ClientMsg::Publish {
                id,
                channel,
                event,
                data,
                ephemeral,
                key,
            } => {
                let (ch, p) = self
                    .authorize(&channel, Action::Publish)
                    .map_err(|e| (id, e))?;
                if ephemeral {
                    let from = self
                        .handle
                        .as_ref()
                        .map(|h| h.client.to_string())
                        .or(Some(p.subject.clone()));
                    if !self.take_token() {
                        return Err((
                            id,
                            ApiError::new(
                                ErrorCode::RateLimited,
                                "too many messages per second on this connection",
                            ),
                        ));
                    }
                    self.state.core.ephemeral(
                        &ch,
                        Ephemeral {
                            kind: event,
                            data,
                            from,
                        },
                    );
                    return Ok(if id.is_some() {
                        vec![ServerMsg::Ack { id, dot: None }]
                    } else {
                        Vec::new()
                    });
                }
                self.queue_write(
                    id,
                    &ch,
                    LocalWrite::Event {
                        kind: event,
                        data,
                        idempotency_key: key,
                    },
                )
                .map_err(|e| (id, e))?;
                Ok(Vec::new())
            }
            ClientMsg::Set {
                id,
                channel,
                key,
                value,
                context,
            } => self.state_write(id, &channel, key, Some(value), context.as_deref()),
            ClientMsg::Delete {
                id,
                channel,
                key,
                context,
            } => self.state_write(id, &channel, key, None, context.as_deref()),
            ClientMsg::Get {
                id,
                channel,
                key,
                siblings,
            } => {
                let (ch, _) = self
                    .authorize(&channel, Action::Subscribe)
                    .map_err(|e| (id, e))?;
                let reg = self.state.core.state_get(&ch, &key);
                Ok(vec![state_view(id, &ch, &key, reg.as_ref(), siblings)])
            }
            ClientMsg::Presence { id, channel, data } => {
                let (ch, _) = self
                    .authorize(&channel, Action::Presence)
                    .map_err(|e| (id, e))?;
                if self
                    .state
                    .cfg
                    .presence
                    .disabled_namespaces
                    .iter()
                    .any(|n| n == ch.namespace())
                {
                    return Err((
                        id,
                        ApiError::new(
                            ErrorCode::Forbidden,
                            format!("presence is off in namespace {:?}", ch.namespace()),
                        ),
                    ));
                }
                if !self.subs.contains(&ch) {
                    return Err((
                        id,
                        ApiError::new(
                            ErrorCode::BadState,
                            "subscribe to the channel before joining its presence",
                        ),
                    ));
                }
                if let Some(h) = &self.handle {
                    self.state.core.fanout.presence(&ch, h, data);
                }
                Ok(if id.is_some() {
                    vec![ServerMsg::Ack { id, dot: None }]
                } else {
                    Vec::new()
                })
            }
            ClientMsg::Members { id, channel } => {
                let (ch, _) = self
                    .authorize(&channel, Action::Subscribe)
                    .map_err(|e| (id, e))?;
                Ok(vec![ServerMsg::Members {
                    id,
                    channel: ch.to_string(),
                    members: members(&self.state, &ch),
                }])
            }
            ClientMsg::Signal {
                id,
                channel,
                to,
                data,
            } => {
                let (ch, _) = self
                    .authorize(&channel, Action::Presence)
                    .map_err(|e| (id, e))?;
                if !self.subs.contains(&ch) {
                    return Err((
                        id,
                        ApiError::new(
                            ErrorCode::BadState,
                            "subscribe to the channel before signalling in it",
                        ),
                    ));
                }
                let from = self
                    .handle
                    .as_ref()
                    .map(|h| h.client.to_string())
                    .unwrap_or_default();
                if !self.state.core.fanout.signal(&ch, &from, &to, &data) {
                    return Err((
                        id,
                        ApiError::new(ErrorCode::NotFound, format!("{to} is not in {ch} here")),
                    ));
                }
                Ok(if id.is_some() {
                    vec![ServerMsg::Ack { id, dot: None }]
                } else {
                    Vec::new()
                })
            }
        }
    }

    /// A state set (`value`) or delete (`None`) with the context the client read.
    fn state_write(
        &mut self,
        id: Option<u64>,
        channel: &str,
        key: String,
        value: Option<shared::Payload>,
        context: Option<&str>,
    ) -> Result<Vec<ServerMsg>, (Option<u64>, ApiError)> {
        let (ch, _) = self
            .authorize(channel, Action::State)
            .map_err(|e| (id, e))?;
        let context = since(context).map_err(|e| (id, e))?;
        let write = match value {
            Some(value) => LocalWrite::Set {
                key,
                value,
                context,
            },
            None => LocalWrite::Delete { key, context },
        };
        self.queue_write(id, &ch, write).map_err(|e| (id, e))?;
        Ok(Vec::new())
    }

    fn subscribe(
        &mut self,
        name: &str,
        tok: Option<&str>,
        id: Option<u64>,
    ) -> Result<Vec<ServerMsg>, ApiError> {
        let (ch, _) = self.authorize(name, Action::Subscribe)?;
        let since = since(tok)?;
        let max = self.state.cfg.limits.max_subscriptions_per_connection;
        if !self.subs.contains(&ch) && self.subs.len() >= max {
            return Err(ApiError::new(
                ErrorCode::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
            ));
        }
        let Some(h) = self.handle.clone() else {
            return Err(ApiError::new(ErrorCode::Unauthorized, "connect first"));
        };
        if self.subs.contains(&ch) {
            self.state.core.unsubscribe(&ch, h.id);
        }
        let replay = self.state.core.subscribe(&ch, &h, &since);
        self.subs.insert(ch.clone());
        let mut out: Vec<ServerMsg> = replay
            .ops
            .iter()
            .map(|(op, t)| client::op_message(ch.as_str(), op, t.clone()))
            .collect();
        out.push(ServerMsg::Subscribed {
            id,
            channel: ch.to_string(),
            token: replay.token,
            replayed: replay.ops.len(),
            truncated: replay.truncated,
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_gate_polls_the_group_only_after_its_own_wake_or_a_rearm() {
        let gate = WakeGate::new();
        let task = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&task);
        let polls = std::cell::Cell::new(0);
        let seen: std::cell::RefCell<Option<Waker>> = std::cell::RefCell::new(None);
        let poll = |cx: &mut Context<'_>| {
            gate.poll(cx, |inner| {
                polls.set(polls.get() + 1);
                *seen.borrow_mut() = Some(inner.waker().clone());
                Poll::<()>::Pending
            })
        };
        // The first poll polls the group; further ones do not until something wakes it.
        assert!(poll(&mut cx).is_pending());
        assert!(poll(&mut cx).is_pending());
        assert!(poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 1);
        let group_waker = seen.borrow().clone().expect("polled once");
        group_waker.wake_by_ref();
        assert!(poll(&mut cx).is_pending());
        assert!(poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 2);
        gate.rearm();
        assert!(poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 3);
    }
}
