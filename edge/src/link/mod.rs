//! The edge <-> cloud link over QUIC: frame I/O on quinn streams, and the session that
//! connects a link to the replication core. The edge dials ([`uplink`]); the cloud
//! accepts (in the `cloud` crate); both run [`run_session`] once the handshake is done.
//!
//! A link has two bidirectional streams, both opened by the edge: **control** (hello,
//! sync vectors, acks, heartbeats) and **data** (ops, snapshots, ephemeral messages),
//! so control traffic never waits behind bulk data.

pub mod router;
pub mod tls;
pub mod uplink;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shared::sync::Input;
use shared::wire::{self, DecodeError, EncodeError, Frame, SyncMsg, Versioned};
use shared::ReplicaId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use router::PeerLink;

/// QUIC application close codes of the link.
pub mod close {
    pub const NORMAL: u32 = 0;
    pub const MALFORMED_FRAME: u32 = 4400;
    pub const UNKNOWN_EDGE: u32 = 4401;
    pub const PROTOCOL: u32 = 4402;
    pub const REVOKED: u32 = 4403;
    pub const OVERFLOW: u32 = 4404;
    pub const REPLACED: u32 = 4405;
    pub const SHUTDOWN: u32 = 4406;
    pub const FRAME_TOO_LARGE: u32 = 4413;
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("bad frame: {0}")]
    Frame(#[from] DecodeError),
    #[error("cannot send: {0}")]
    Encode(#[from] EncodeError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("refused by the cloud ({code}): {reason}")]
    Refused { code: u16, reason: String },
    #[error("peer closed the link ({code}): {reason}")]
    Closed { code: u16, reason: String },
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Setup(String),
}

impl LinkError {
    /// The close code to send for this error.
    pub fn close_code(&self) -> u32 {
        match self {
            LinkError::Frame(DecodeError::TooLarge { .. }) => close::FRAME_TOO_LARGE,
            LinkError::Frame(_) => close::MALFORMED_FRAME,
            LinkError::Protocol(_) => close::PROTOCOL,
            _ => close::NORMAL,
        }
    }
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<Frame>, LinkError> {
    let mut head = [0u8; 4];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let total = wire::frame_len(&head, max)?;
    buf.clear();
    buf.extend_from_slice(&head);
    buf.resize(total, 0);
    recv.read_exact(&mut buf[4..]).await?;
    let (Versioned::V1(frame), _) = wire::decode(buf, max)?;
    metrics::counter!("outpost_link_frames_in_total").increment(1);
    metrics::counter!("outpost_link_bytes_in_total").increment(total as u64);
    Ok(Some(frame))
}

/// Writes one frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &Frame,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<(), LinkError> {
    buf.clear();
    wire::encode(frame, max, buf)?;
    send.write_all(buf).await?;
    metrics::counter!("outpost_link_frames_out_total").increment(1);
    metrics::counter!("outpost_link_bytes_out_total").increment(buf.len() as u64);
    Ok(())
}

/// Queue length per stream of a link before it is dropped as too slow.
pub const LINK_QUEUE: usize = 65_536;

static EPOCH: AtomicU64 = AtomicU64::new(1);

/// Both streams of an established link.
#[derive(Debug)]
pub struct Streams {
    pub control: (quinn::SendStream, quinn::RecvStream),
    pub data: (quinn::SendStream, quinn::RecvStream),
}

async fn writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<SyncMsg>,
    max: usize,
) -> Result<(), LinkError> {
    let mut buf = Vec::new();
    while let Some(msg) = rx.recv().await {
        write_msg(&mut send, msg, max, &mut buf).await?;
    }
    Ok(())
}

/// Writes one message. The core sizes batches to fit a frame; one that still does
/// not fit is split (an `Ops` batch) or else dropped with an error and a metric —
/// never a reason to drop the link, which would only resend the same frame after
/// reconnecting. A dropped message is repaired like a lost one: by resends and
/// anti-entropy (a snapshot transfer missing a part is refused whole).
async fn write_msg(
    send: &mut quinn::SendStream,
    msg: SyncMsg,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<(), LinkError> {
    let mut todo = vec![msg];
    while let Some(msg) = todo.pop() {
        let frame = Frame::Sync(msg);
        match write_frame(send, &frame, max, buf).await {
            Ok(()) => {}
            Err(LinkError::Encode(e)) => {
                let Frame::Sync(msg) = frame else {
                    unreachable!("built as a sync frame above")
                };
                match msg {
                    SyncMsg::Ops { channel, mut ops } if ops.len() > 1 => {
                        let back = ops.split_off(ops.len() / 2);
                        todo.push(SyncMsg::Ops {
                            channel: channel.clone(),
                            ops: back,
                        });
                        todo.push(SyncMsg::Ops { channel, ops });
                    }
                    other => {
                        metrics::counter!("outpost_link_frames_unsendable_total").increment(1);
                        tracing::error!(error = %e, message = msg_name(&other), "a sync message does not fit in a frame; dropped (raise max_frame_bytes on both sides)");
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn msg_name(m: &SyncMsg) -> &'static str {
    match m {
        SyncMsg::Sync { .. } => "sync",
        SyncMsg::Ops { .. } => "ops",
        SyncMsg::Ack { .. } => "ack",
        SyncMsg::Snapshot { .. } => "snapshot",
        SyncMsg::Rebase { .. } => "rebase",
        SyncMsg::Unsubscribe { .. } => "unsubscribe",
        SyncMsg::Ephemeral { .. } => "ephemeral",
        SyncMsg::Heartbeat { .. } => "heartbeat",
        SyncMsg::HeartbeatAck { .. } => "heartbeat-ack",
        SyncMsg::Command(_) => "command",
        SyncMsg::SnapshotPart { .. } => "snapshot-part",
        SyncMsg::SnapshotEnd { .. } => "snapshot-end",
        SyncMsg::Fetch { .. } => "fetch",
        SyncMsg::FetchReply { .. } => "fetch-reply",
    }
}

async fn reader(
    core: Arc<Core>,
    peer: ReplicaId,
    mut recv: quinn::RecvStream,
    max: usize,
    control: bool,
) -> Result<(), LinkError> {
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut recv, max, &mut buf).await? {
            None => return Err(LinkError::Protocol("stream ended".into())),
            Some(Frame::Sync(msg)) => {
                if msg.is_control() != control {
                    return Err(LinkError::Protocol(format!(
                        "{} message on the {} stream",
                        if msg.is_control() { "control" } else { "data" },
                        if control { "control" } else { "data" }
                    )));
                }
                // Read a cold channel from disk without holding the node meanwhile.
                if let Some(channel) = msg.stored_channel() {
                    core.preload(channel).await;
                }
                core.handle(Input::Msg(peer, msg));
            }
            Some(Frame::Close { code, reason }) => return Err(LinkError::Closed { code, reason }),
            Some(other) => {
                return Err(LinkError::Protocol(format!(
                    "unexpected frame after the handshake: {}",
                    frame_name(&other)
                )))
            }
        }
    }
}

pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Welcome { .. } => "welcome",
        Frame::DataStream { .. } => "data-stream",
        Frame::Close { .. } => "close",
        Frame::Sync(_) => "sync",
    }
}

/// Connects an established link to the core until it ends; returns why it ended.
/// The core sees `LinkUp` at the start and `LinkDown` at the end (unless a newer link
/// of the same peer replaced this one).
pub async fn run_session(
    core: Arc<Core>,
    peer: ReplicaId,
    conn: quinn::Connection,
    streams: Streams,
    max_frame: usize,
    shutdown: CancellationToken,
) -> LinkError {
    let epoch = EPOCH.fetch_add(1, Ordering::Relaxed);
    let kill = CancellationToken::new();
    let (ctx, crx) = mpsc::channel(LINK_QUEUE);
    let (dtx, drx) = mpsc::channel(LINK_QUEUE);
    core.router.insert(
        peer,
        PeerLink {
            control: ctx,
            data: dtx,
            kill: kill.clone(),
            epoch,
        },
    );
    core.handle(Input::LinkUp(peer));
    let Streams {
        control: (csend, crecv),
        data: (dsend, drecv),
    } = streams;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(writer(csend, crx, max_frame));
    tasks.spawn(writer(dsend, drx, max_frame));
    tasks.spawn(reader(core.clone(), peer, crecv, max_frame, true));
    tasks.spawn(reader(core.clone(), peer, drecv, max_frame, false));
    let end = tokio::select! {
        _ = shutdown.cancelled() => {
            conn.close(close::SHUTDOWN.into(), b"shutting down");
            LinkError::Closed { code: close::SHUTDOWN as u16, reason: "shutting down".into() }
        }
        _ = kill.cancelled() => {
            conn.close(close::OVERFLOW.into(), b"link dropped (queue overflow, replaced or revoked)");
            LinkError::Closed { code: close::OVERFLOW as u16, reason: "dropped locally".into() }
        }
        e = conn.closed() => LinkError::Connection(e),
        r = tasks.join_next() => {
            let e = match r {
                Some(Ok(Err(e))) => e,
                Some(Ok(Ok(()))) => LinkError::Protocol("link writer stopped".into()),
                Some(Err(e)) => LinkError::Protocol(format!("link task: {e}")),
                None => LinkError::Protocol("no link tasks".into()),
            };
            let code = e.close_code();
            if code != close::NORMAL {
                conn.close(code.into(), e.to_string().as_bytes());
            }
            e
        }
    };
    tasks.abort_all();
    if core.router.remove(peer, epoch) {
        core.handle(Input::LinkDown(peer));
    }
    end
}
