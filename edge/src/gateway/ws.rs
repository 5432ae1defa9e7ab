//! The WebSocket endpoint `/v1/ws`: the upgrade (limits, buffer sizes), then the
//! connection task of `super::conn` (JSON messages, see docs/PROTOCOL.md); and the
//! test-only echo endpoint the Autobahn cases run against.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use shared::client::ErrorCode;
use tracing::Instrument;

use super::conn::serve;
use super::{credential, ApiError, AppState};

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
