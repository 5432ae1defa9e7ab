//! The connection task every message transport runs: a WebSocket (`super::ws`) or
//! the WebRTC data channels (`super::rtc`), which carry the same JSON messages. It
//! reads requests and hands them to the protocol handler (`super::protocol`), writes
//! replies, acks in request order while writes are pipelined, and queued pushes; and
//! it closes the connection on shutdown, drain, the fan-out's kill switch, idle
//! timeout, token expiry or a broken frame, with the close code that says why.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::stream::FuturesOrdered;
use futures_util::task::AtomicWaker;
use futures_util::{Future, FutureExt, Sink, SinkExt, Stream, StreamExt};
use shared::client::{self, CloseCode, ErrorCode, ServerMsg, UplinkState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::protocol::Conn;
use super::{now_secs, AppState, ConnGuard};
use crate::fanout::{ConnHandle, SendQueueRx};

/// Requests whose acks wait (for durability, or for their turn) before the connection
/// stops reading more.
const MAX_PENDING_ACKS: usize = 256;

/// A request's reply that waits (for durability, or for the acks before it).
pub(super) type Ack = Pin<Box<dyn Future<Output = Later> + Send>>;

/// What a waiting request comes to.
pub(super) enum Later {
    /// A reply to write.
    Reply(ServerMsg),
    /// A subscription whose channel the edge first brought up to date with the cloud
    /// (`Conn::finish` registers it now, replay first, as for any other).
    Subscribe {
        id: Option<u64>,
        channel: shared::ChannelName,
        since: shared::VersionVector,
        attempt: u64,
    },
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

pub(super) fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

/// Waits until queued messages are ready to pop (none before `connect`).
fn queue_ready(q: &mut Option<SendQueueRx>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match q {
        Some(q) => q.poll_ready(cx),
        None => Poll::Pending,
    })
}

async fn next_ack(acks: &mut FuturesOrdered<Ack>) -> Later {
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
    let mut conn = Conn::new(state.clone(), slot);
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
                let mut failed = false;
                let mut ack = Some(ack);
                while let Some(later) = ack.take().or_else(|| conn.acks.next().now_or_never().flatten()) {
                    for r in conn.finish(later) {
                        if io.feed(text(&r)).await.is_err() { failed = true; break; }
                    }
                    if failed { break; }
                }
                if failed || io.flush().await.is_err() { break; }
            }
        }
    }
    conn.cleanup();
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
