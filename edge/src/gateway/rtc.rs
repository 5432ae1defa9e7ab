//! WebRTC data channels to this server: `POST /v1/rtc/offer` takes a browser's SDP
//! offer and answers it (non-trickle: the answer carries this server's candidates;
//! the browser is learnt as peer-reflexive). The browser opens two data channels:
//!
//! - `outpost` — reliable and ordered; carries exactly the WebSocket protocol (the
//!   same connection task, `ws::serve`, with the same limits and acks);
//! - `outpost-ephemeral` — unordered, no retransmits; ephemeral publishes (cursors)
//!   may go either way on it, everything else stays on `outpost`.
//!
//! Data channels have no close frame, so the server sends `{"type":"close",...}`
//! with a WebSocket close code before it closes. Each peer connection holds a
//! connection slot and one of `webrtc.max_peers` permits, and is torn down when its
//! connection fails or closes, when `outpost` closes, or when no channel opened
//! within `webrtc.connect_timeout_secs`.
//!
//! Batching: messages written together travel as one data-channel message, joined
//! by `\n` (see [`RtcIo`]); the SDK splits them.
//!
//! Pacing: every data channel has a send-buffer limit (`webrtc.send_buffer_bytes`,
//! bytes handed to SCTP and not yet acknowledged); past it, the connection's queue
//! backs up and a slow consumer is closed with 4100 as on WebSocket. For its first
//! seconds a channel keeps at most `FIRST_FLIGHT_WINDOW` in flight: a fresh
//! association has no RTT estimate, so a burst that loses a packet (a subscription's
//! replay overflowing the browser's UDP receive buffer) waits a full 1 s retransmit
//! timeout. The browser test `webrtc_first_flight` measures it.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

use axum::extract::rejection::StringRejection;
use axum::extract::ws::Message;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Sink, Stream};
use rtc::ice::mdns::MulticastDnsMode;
use shared::client::{ErrorCode, ServerMsg};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tracing::Instrument;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateType, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState, RTCSdpType,
    RTCSessionDescription, SettingEngineBuilder,
};

use super::conn::serve;
use super::ws::WsQuery;
use super::{credential, ApiError, AppState, ConnGuard};

/// The reliable, ordered channel that speaks the client protocol.
pub const RELIABLE: &str = "outpost";
/// The unordered, unreliable channel for ephemeral messages.
pub const EPHEMERAL: &str = "outpost-ephemeral";

/// Messages read from the data channels and not yet handled by the connection task.
const INBOUND_QUEUE: usize = 256;

/// Offers larger than this are refused before parsing.
const MAX_OFFER_BYTES: usize = 64 * 1024;

/// What the peer connection reports to its session task.
enum Event {
    Channel(Arc<dyn DataChannel>),
    Ended(RTCPeerConnectionState),
}

struct Handler {
    gathered: Arc<Notify>,
    events: mpsc::UnboundedSender<Event>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(%state, "peer connection state");
        if matches!(
            state,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
        ) {
            let _ = self.events.send(Event::Ended(state));
        }
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.events.send(Event::Channel(dc));
    }
}

/// `POST /v1/rtc/offer` (body: `{"type":"offer","sdp":"..."}`) → the answer.
pub async fn offer(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    body: Result<String, StringRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError::new(
                ErrorCode::MessageTooLarge,
                format!("an offer is at most {MAX_OFFER_BYTES} bytes"),
            )
            .into_response()
        }
        Err(e) => return ApiError::new(ErrorCode::BadRequest, e.body_text()).into_response(),
    };
    match answer(state, addr, q, headers, body).await {
        Ok(a) => {
            metrics::counter!("outpost_rtc_offers_total", "result" => "answered").increment(1);
            Json(a).into_response()
        }
        Err(e) => {
            metrics::counter!("outpost_rtc_offers_total", "result" => "refused").increment(1);
            e.into_response()
        }
    }
}

async fn answer(
    state: Arc<AppState>,
    addr: SocketAddr,
    q: WsQuery,
    headers: HeaderMap,
    body: String,
) -> Result<RTCSessionDescription, ApiError> {
    let w = &state.cfg.webrtc;
    if !w.enabled {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "WebRTC is off on this server (webrtc.enabled = false)",
        ));
    }
    if state.shutdown.is_cancelled() || state.core.draining.is_cancelled() {
        return Err(ApiError::new(
            ErrorCode::BadState,
            "shutting down: use another endpoint",
        ));
    }
    let cred = credential(&headers, q.token.as_deref());
    state.principal(cred.as_deref())?;
    if body.len() > MAX_OFFER_BYTES {
        return Err(ApiError::new(
            ErrorCode::MessageTooLarge,
            format!("an offer is at most {MAX_OFFER_BYTES} bytes"),
        ));
    }
    let offer: RTCSessionDescription = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("expected {{\"type\":\"offer\",\"sdp\":\"...\"}}: {e}"),
        )
    })?;
    if offer.sdp_type != RTCSdpType::Offer {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("expected an offer, got {}", offer.sdp_type),
        ));
    }
    let slot = state.conns.try_acquire(addr.ip())?;
    let permit = state.rtc_peers.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            ErrorCode::TooManyConnections,
            format!(
                "this server is at its limit of {} WebRTC peers (webrtc.max_peers)",
                w.max_peers
            ),
        )
    })?;
    let gathered = Arc::new(Notify::new());
    let (events_tx, events) = mpsc::unbounded_channel();
    let handler = Arc::new(Handler {
        gathered: gathered.clone(),
        events: events_tx,
    });
    let pc = build(&state, handler).await?;
    let bad = |e: webrtc::error::Error| ApiError::new(ErrorCode::BadRequest, format!("offer: {e}"));
    let negotiated = async {
        pc.set_remote_description(offer).await.map_err(bad)?;
        let answer = pc.create_answer(None).await.map_err(bad)?;
        pc.set_local_description(answer).await.map_err(bad)?;
        // Non-trickle: wait until the candidates are in the answer.
        let _ = tokio::time::timeout(Duration::from_secs(5), gathered.notified()).await;
        pc.local_description()
            .await
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "no local description"))
    }
    .await;
    let answer = match negotiated {
        Ok(a) => a,
        Err(e) => {
            let _ = pc.close().await;
            return Err(e);
        }
    };
    let span = tracing::info_span!("rtc", peer = %addr);
    tokio::spawn(session(state, pc, events, slot, permit, cred).instrument(span));
    Ok(answer)
}

/// A peer connection bound to one UDP port of the configured range (or any port).
async fn build(
    state: &AppState,
    handler: Arc<Handler>,
) -> Result<Box<dyn PeerConnection>, ApiError> {
    let w = &state.cfg.webrtc;
    let ip: IpAddr = w.bind_ip.unwrap_or_else(|| {
        let ip = state.cfg.listen.ip();
        if ip.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            ip
        }
    });
    let ports: Vec<u16> = if w.udp_port_max == 0 {
        vec![0]
    } else {
        // Start at a random port of the range so concurrent offers do not collide.
        let n = u32::from(w.udp_port_max - w.udp_port_min) + 1;
        let start = (getrandom::u64().unwrap_or(0) % u64::from(n)) as u16;
        (0..n.min(64) as u16)
            .map(|i| w.udp_port_min + ((start + i) % n as u16))
            .collect()
    };
    let ice_servers: Vec<RTCIceServer> = w
        .ice_servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone(),
            credential: s.credential.clone(),
        })
        .collect();
    let mut last = String::new();
    // The builders are consumed by each attempt, so they are made per port.
    for port in ports {
        let mut settings = SettingEngineBuilder::new()
            // mDNS needs a multicast interface ("No such device" without one) and
            // browsers resolve our IP candidates anyway.
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_include_loopback_candidate(ip.is_loopback());
        if !w.public_ips.is_empty() {
            settings = settings.with_nat_1to1_ips(w.public_ips.clone(), RTCIceCandidateType::Host);
        }
        let config = RTCConfigurationBuilder::new()
            .with_ice_servers(ice_servers.clone())
            .build();
        match PeerConnectionBuilder::new()
            .with_configuration(config)
            .with_setting_engine(settings.build())
            .with_handler(handler.clone())
            .with_udp_addrs(vec![SocketAddr::new(ip, port)])
            .with_data_channel_send_buffer_limit(w.send_buffer_bytes)
            .build()
            .await
        {
            Ok(pc) => return Ok(Box::new(pc)),
            Err(e) => last = format!("{ip}:{port}: {e}"),
        }
    }
    Err(ApiError::new(
        ErrorCode::Internal,
        format!("could not open a WebRTC peer connection ({last})"),
    ))
}

/// A data-channel send in progress.
type Sending = Pin<Box<dyn Future<Output = Result<(), Gone>> + Send>>;
/// The unreliable channel, once it is open.
type EphemeralSlot = Arc<Mutex<Option<Arc<dyn DataChannel>>>>;

/// Why the connection's message stream ended.
#[derive(Debug)]
pub(crate) struct Gone;

/// Data channels have no close frame: a closed channel owes the client nothing.
impl super::conn::ReadError for Gone {
    fn close_frame(self) -> Option<(u16, String)> {
        None
    }
}

/// Sends the connection task's messages on the data channels. Messages fed between
/// two flushes travel together: one data-channel message carries several protocol
/// messages separated by `\n` (JSON text never contains a raw newline), up to
/// [`BATCH_BYTES`]. Fewer, fuller SCTP packets: a burst of small messages as one
/// packet each overflows the browser's UDP receive buffer long before the bytes do.
/// Also the stream of messages the pumps read from both channels.
struct RtcIo {
    inbound: mpsc::Receiver<Result<Message, Gone>>,
    reliable: Arc<dyn DataChannel>,
    ephemeral: EphemeralSlot,
    rel: String,
    eph: String,
    sending: Option<Sending>,
    /// Until then the channel sends with [`FIRST_FLIGHT_WINDOW`].
    first_flight_until: Instant,
}

/// In flight at most while a channel is young (see [`FIRST_FLIGHT`]). Measured on
/// loopback with Chromium 156: replaying 3,000 ops (1.4 MB) to a fresh channel stalled
/// ~1 s in 3 of 12 runs with 64 KiB in flight, in none of 24 with 16 or 32 KiB.
const FIRST_FLIGHT_WINDOW: usize = 32 * 1024;
/// How long a channel counts as young.
const FIRST_FLIGHT: Duration = Duration::from_secs(3);

/// A data-channel message is flushed once it holds this much.
const BATCH_BYTES: usize = 16 * 1024;

impl RtcIo {
    fn push(buf: &mut String, text: &str) {
        if !buf.is_empty() {
            buf.push('\n');
        }
        buf.push_str(text);
    }

    /// Starts sending what is buffered (if nothing is being sent).
    fn start(&mut self) {
        if self.sending.is_some() || (self.rel.is_empty() && self.eph.is_empty()) {
            return;
        }
        let rel = std::mem::take(&mut self.rel);
        let eph = std::mem::take(&mut self.eph);
        let reliable = self.reliable.clone();
        let eph_dc = self.ephemeral.lock().map(|g| g.clone()).ok().flatten();
        let first_flight_until = self.first_flight_until;
        self.sending = Some(Box::pin(async move {
            if !eph.is_empty() {
                // Unreliable: a lost cursor is better than one that waits for a
                // retransmit; a full buffer drops it too.
                if let Some(dc) = eph_dc {
                    let _ = dc.try_send_text(&eph).await;
                }
            }
            if !rel.is_empty() {
                if Instant::now() < first_flight_until {
                    // Slow start: no more than FIRST_FLIGHT_WINDOW in flight while the
                    // association has no RTT estimate yet (its retransmit timer is
                    // then 1 s, so one lost packet would stall the channel that long).
                    loop {
                        let out = reliable.outstanding_bytes().await.unwrap_or(0);
                        if out == 0 || out + rel.len() <= FIRST_FLIGHT_WINDOW {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                reliable.send_text(&rel).await.map_err(|_| Gone)?;
            }
            Ok(())
        }));
    }

    fn poll_sending(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        if let Some(f) = self.sending.as_mut() {
            let r = ready!(f.as_mut().poll(cx));
            self.sending = None;
            r?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Sink<Message> for RtcIo {
    type Error = Gone;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        let this = self.get_mut();
        ready!(this.poll_sending(cx))?;
        if this.rel.len() >= BATCH_BYTES || this.eph.len() >= BATCH_BYTES {
            this.start();
            ready!(this.poll_sending(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), Gone> {
        let this = self.get_mut();
        match m {
            Message::Text(t) => {
                let eph_open = this.ephemeral.lock().map(|g| g.is_some()).unwrap_or(false);
                if eph_open && t.as_str().starts_with(r#"{"type":"ephemeral""#) {
                    Self::push(&mut this.eph, t.as_str());
                } else {
                    Self::push(&mut this.rel, t.as_str());
                }
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (f.code, f.reason.to_string()))
                    .unwrap_or((1000, String::new()));
                let msg =
                    serde_json::to_string(&ServerMsg::Close { code, reason }).unwrap_or_default();
                Self::push(&mut this.rel, &msg);
            }
            Message::Binary(_) | Message::Ping(_) | Message::Pong(_) => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        let this = self.get_mut();
        ready!(this.poll_sending(cx))?;
        this.start();
        this.poll_sending(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        self.poll_flush(cx)
    }
}

/// Reads one data channel's events into the connection's inbound stream.
async fn pump(
    dc: Arc<dyn DataChannel>,
    inbound: mpsc::Sender<Result<Message, Gone>>,
    opened: Option<EphemeralSlot>,
    reliable: bool,
) {
    while let Some(ev) = dc.poll().await {
        match ev {
            DataChannelEvent::OnOpen => {
                if let Some(slot) = &opened {
                    if let Ok(mut g) = slot.lock() {
                        *g = Some(dc.clone());
                    }
                }
            }
            DataChannelEvent::OnMessage(msg) => {
                let m = match String::from_utf8(msg.data.to_vec()) {
                    Ok(t) if msg.is_string => Message::Text(t.into()),
                    _ => Message::Binary(msg.data.freeze()),
                };
                if inbound.send(Ok(m)).await.is_err() {
                    break;
                }
            }
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
    if let Some(slot) = &opened {
        if let Ok(mut g) = slot.lock() {
            *g = None;
        }
    }
    if reliable {
        let _ = inbound.send(Err(Gone)).await;
    }
}

/// Starts reading an ephemeral channel, closes unknown ones, and hands back the
/// reliable one.
async fn route(
    dc: Arc<dyn DataChannel>,
    inbound: &mpsc::Sender<Result<Message, Gone>>,
    ephemeral: &EphemeralSlot,
) -> Option<Arc<dyn DataChannel>> {
    match dc.label().await.unwrap_or_default().as_str() {
        RELIABLE => Some(dc),
        EPHEMERAL => {
            tokio::spawn(pump(dc, inbound.clone(), Some(ephemeral.clone()), false));
            None
        }
        other => {
            tracing::debug!(label = other, "closing an unknown data channel");
            let _ = dc.close().await;
            None
        }
    }
}

async fn session(
    state: Arc<AppState>,
    pc: Box<dyn PeerConnection>,
    mut events: mpsc::UnboundedReceiver<Event>,
    slot: ConnGuard,
    _permit: OwnedSemaphorePermit,
    cred: Option<String>,
) {
    metrics::gauge!("outpost_rtc_peers").increment(1.0);
    let timeout = Duration::from_secs(state.cfg.webrtc.connect_timeout_secs);
    // Bounded: a peer that sends faster than its connection task reads is slowed
    // down by SCTP flow control instead of filling memory.
    let (in_tx, in_rx) = mpsc::channel::<Result<Message, Gone>>(INBOUND_QUEUE);
    let ephemeral: EphemeralSlot = Arc::default();
    let deadline = tokio::time::Instant::now() + timeout;
    // Wait for the reliable channel; route any channel that arrives meanwhile.
    let reliable = loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!("no data channel within {timeout:?}: dropping the peer");
                None
            }
        };
        match ev {
            Some(Event::Channel(dc)) => {
                if let Some(dc) = route(dc, &in_tx, &ephemeral).await {
                    break Some(dc);
                }
            }
            Some(Event::Ended(s)) => {
                tracing::info!(%s, "peer connection ended before its data channel");
                break None;
            }
            None => break None,
        }
    };
    if let Some(reliable) = reliable {
        tokio::spawn(pump(reliable.clone(), in_tx.clone(), None, true));
        // Later channels (the ephemeral one) and the connection's end.
        let ev_tx = in_tx.clone();
        let eph = ephemeral.clone();
        let watcher = tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Channel(dc) => {
                        // A second reliable channel has no connection task to feed.
                        if let Some(dc) = route(dc, &ev_tx, &eph).await {
                            let _ = dc.close().await;
                        }
                    }
                    Event::Ended(s) => {
                        tracing::info!(%s, "peer connection ended");
                        let _ = ev_tx.send(Err(Gone)).await;
                        break;
                    }
                }
            }
        });
        drop(in_tx);
        let io = RtcIo {
            inbound: in_rx,
            reliable,
            ephemeral,
            rel: String::new(),
            eph: String::new(),
            sending: None,
            first_flight_until: Instant::now() + FIRST_FLIGHT,
        };
        serve(state, io, slot, cred).await;
        watcher.abort();
    }
    let _ = pc.close().await;
    metrics::gauge!("outpost_rtc_peers").decrement(1.0);
}

impl Stream for RtcIo {
    type Item = Result<Message, Gone>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().inbound.poll_recv(cx)
    }
}
