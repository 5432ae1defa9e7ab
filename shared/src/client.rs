//! The client protocol: JSON messages shared by WebSocket, SSE, REST and WebRTC data
//! channels, and the stable error and close codes.
//!
//! Replica ids and dots travel as strings (`"00000000000000a1:17"`), never as JSON
//! numbers, because browsers cannot hold 64-bit integers exactly. Version vectors travel
//! as resume tokens (see [`crate::token`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::Dot;
use crate::op::{Op, OpBody, Payload};

/// Stable error codes. The string form is what clients match on; the number is for
/// logs and metrics. Codes are never reused for another meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, or not a known message shape.
    BadRequest,
    /// No token, or a token that does not verify.
    Unauthorized,
    /// The token's `exp` has passed or its `nbf` has not come.
    TokenExpired,
    /// The token is valid but grants no right for this channel and action.
    Forbidden,
    /// The channel name is invalid.
    BadChannel,
    /// The resume token does not decode.
    BadResumeToken,
    /// The message exceeds the size limit.
    MessageTooLarge,
    TooManySubscriptions,
    TooManyConnections,
    RateLimited,
    NotFound,
    /// The request is not valid in the connection's current state (e.g. before connect).
    BadState,
    /// Storage refused the write (e.g. disk full); nothing was acknowledged.
    StorageUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn number(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 4000,
            ErrorCode::Unauthorized => 4001,
            ErrorCode::TokenExpired => 4002,
            ErrorCode::Forbidden => 4003,
            ErrorCode::BadChannel => 4004,
            ErrorCode::BadResumeToken => 4005,
            ErrorCode::MessageTooLarge => 4006,
            ErrorCode::TooManySubscriptions => 4007,
            ErrorCode::TooManyConnections => 4008,
            ErrorCode::RateLimited => 4009,
            ErrorCode::NotFound => 4010,
            ErrorCode::BadState => 4011,
            ErrorCode::StorageUnavailable => 5001,
            ErrorCode::Internal => 5000,
        }
    }

    /// The HTTP status a REST endpoint answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::BadChannel
            | ErrorCode::BadResumeToken
            | ErrorCode::BadState => 400,
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MessageTooLarge => 413,
            ErrorCode::TooManySubscriptions
            | ErrorCode::TooManyConnections
            | ErrorCode::RateLimited => 429,
            ErrorCode::StorageUnavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// WebSocket close codes the server uses (application range 4000-4999).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// Too slow: the send queue overflowed. Reconnect (anywhere) and resume with your
    /// tokens; nothing is lost.
    SlowConsumerResume = 4100,
    /// This server is shutting down or draining: go to another endpoint and resume.
    GoingAwayResume = 4101,
    /// Authentication failed or expired; reconnecting with the same token will fail.
    Unauthorized = 4001,
    /// Protocol violation (e.g. too many malformed messages).
    ProtocolError = 4000,
    /// No traffic within the idle timeout.
    IdleTimeout = 4102,
}

/// RFC 6455 §5.5: a control frame carries at most 125 bytes, 2 of them the close code.
pub const MAX_CLOSE_REASON: usize = 123;

/// `reason` cut to what a close frame may carry, at a character boundary: a longer
/// reason makes conforming clients fail the connection (1002) and never see the code.
pub fn close_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Messages from a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    Connect {
        #[serde(default)]
        id: Option<u64>,
        token: Option<String>,
    },
    Subscribe {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        /// Resume token: replay what is missing since it, then go live.
        #[serde(default)]
        since: Option<String>,
    },
    Unsubscribe {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
    },
    /// A namespace subscription: every channel the pattern matches, those created
    /// later included (served by the cloud and coordinators, which hold every channel).
    SubscribePattern {
        #[serde(default)]
        id: Option<u64>,
        pattern: String,
        /// Resume tokens per channel; a matching channel without one replays from the
        /// start of its retained history.
        #[serde(default)]
        since: Option<BTreeMap<String, String>>,
    },
    UnsubscribePattern {
        #[serde(default)]
        id: Option<u64>,
        pattern: String,
    },
    Publish {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        event: String,
        #[serde(default = "null_payload")]
        data: Payload,
        /// Fan out to current subscribers only; never stored, no dot.
        #[serde(default)]
        ephemeral: bool,
        /// Idempotency key: publishing twice with it yields one event.
        #[serde(default)]
        key: Option<String>,
    },
    Set {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        key: String,
        value: Payload,
        /// The `context` from the last read of this key; absent means a blind write
        /// that stays concurrent with every existing value.
        #[serde(default)]
        context: Option<String>,
    },
    Delete {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        key: String,
        #[serde(default)]
        context: Option<String>,
    },
    Get {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        key: String,
        #[serde(default)]
        siblings: bool,
    },
    Presence {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        #[serde(default)]
        data: Option<Payload>,
    },
    /// Lists the channel's current members.
    Members {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
    },
    Ping {
        #[serde(default)]
        id: Option<u64>,
    },
    Signal {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        to: String,
        data: Payload,
    },
}

fn null_payload() -> Payload {
    Payload::null()
}

/// What an op did, as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpView {
    Event {
        event: String,
        data: Payload,
        /// Who published it (the authenticated subject), when the endpoint recorded it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    Set {
        key: String,
        value: Payload,
        /// Who wrote it (the authenticated subject), when the endpoint recorded it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    Delete {
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
}

impl From<&OpBody> for OpView {
    fn from(b: &OpBody) -> Self {
        match b {
            OpBody::Event { kind, data, by, .. } => OpView::Event {
                event: kind.clone(),
                data: data.clone(),
                by: by.clone(),
            },
            OpBody::Set { key, value, by, .. } => OpView::Set {
                key: key.clone(),
                value: value.clone(),
                by: by.clone(),
            },
            OpBody::Delete { key, by, .. } => OpView::Delete {
                key: key.clone(),
                by: by.clone(),
            },
        }
    }
}

/// One sibling of a state key, as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiblingView {
    pub dot: String,
    /// Hybrid timestamp rendered as `wall_ms.logical`.
    pub hlc: String,
    pub value: Option<Payload>,
}

/// Whether the endpoint a client talks to is syncing with the rest of the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkState {
    /// This endpoint is the cloud (or a coordinator): there is nothing upstream.
    #[default]
    #[serde(rename = "none")]
    NoUplink,
    /// An edge linked to the cloud: writes here reach other regions.
    Connected,
    /// An edge without its cloud link: writes are accepted and acknowledged here and
    /// cross to other regions when the link returns ("local only").
    Disconnected,
}

/// Messages from the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Connected {
        /// The `id` of the `connect` request this answers; absent when the token came
        /// with the upgrade request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        client: String,
        replica: String,
        /// Whether this endpoint syncs with the fleet now; changes arrive as `uplink`.
        #[serde(default)]
        uplink: UplinkState,
    },
    /// The endpoint's link to the cloud came up or went down.
    Uplink {
        state: UplinkState,
    },
    Subscribed {
        id: Option<u64>,
        channel: String,
        /// Where the replay ended; live ops follow.
        token: String,
        /// How many ops the replay before this message carried.
        replayed: usize,
        /// History older than the replay was compacted: re-read state with `get`.
        truncated: bool,
    },
    Unsubscribed {
        id: Option<u64>,
        channel: String,
    },
    /// A namespace subscription is live: each matching channel's replay and
    /// `subscribed` came before this; channels created later start with a `subscribed`.
    SubscribedPattern {
        id: Option<u64>,
        pattern: String,
        /// How many channels matched when it started.
        channels: usize,
    },
    UnsubscribedPattern {
        id: Option<u64>,
        pattern: String,
    },
    /// A durable op, carrying its dot and the subscriber's new resume token.
    Op {
        channel: String,
        dot: String,
        hlc: String,
        token: String,
        #[serde(flatten)]
        view: OpView,
    },
    /// A write was accepted and is durable here; `dot` identifies it everywhere.
    Ack {
        id: Option<u64>,
        dot: Option<String>,
    },
    State {
        id: Option<u64>,
        channel: String,
        key: String,
        value: Option<Payload>,
        deleted: bool,
        /// More than one concurrent value exists; `value` is the last-writer-wins winner.
        conflict: bool,
        /// Send back with the next write to this key.
        context: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        siblings: Option<Vec<SiblingView>>,
    },
    Ephemeral {
        channel: String,
        event: String,
        data: Payload,
        from: Option<String>,
    },
    Presence {
        channel: String,
        action: PresenceAction,
        /// The connection's client id (what `signal.to` addresses).
        client: String,
        /// The authenticated subject (`sub` of the token).
        subject: String,
        data: Option<Payload>,
    },
    /// The current members of a channel, answering a presence request.
    Members {
        id: Option<u64>,
        channel: String,
        members: Vec<Member>,
    },
    Signal {
        channel: String,
        from: String,
        data: Payload,
    },
    Pong {
        id: Option<u64>,
    },
    /// WebRTC data channels only (they have no close frame): the server is about to
    /// close the connection; `code` is a WebSocket close code (4100 slow consumer,
    /// 4101 going away, 4102 idle, 4001 unauthorized) and means the same.
    Close {
        code: u16,
        reason: String,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
}

/// One present client of a channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub client: String,
    pub subject: String,
    pub data: Option<Payload>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceAction {
    Join,
    Update,
    Leave,
}

/// A dot as clients see it.
pub fn dot_string(d: Dot) -> String {
    d.to_string()
}

/// Renders an applied op for a subscriber whose token is now `token`.
pub fn op_message(channel: &str, op: &Op, token: String) -> ServerMsg {
    ServerMsg::Op {
        channel: channel.to_owned(),
        dot: dot_string(op.dot),
        hlc: format!("{:?}", op.hlc),
        token,
        view: OpView::from(&op.body),
    }
}

impl ServerMsg {
    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMsg::Error {
            id,
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_control_frame_at_a_char_boundary() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100); // 200 bytes, 2 per char
        let cut = close_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON && cut.len() >= MAX_CLOSE_REASON - 1);
        assert!(long.starts_with(cut));
        let exact = "x".repeat(MAX_CLOSE_REASON);
        assert_eq!(close_reason(&exact), exact);
    }

    #[test]
    fn json_shapes() {
        let m: ClientMsg = serde_json::from_str(
            r#"{"type":"publish","channel":"project:1","event":"ingest.job.updated","data":{"id":7}}"#,
        )
        .expect("parse");
        match m {
            ClientMsg::Publish {
                event,
                data,
                ephemeral,
                ..
            } => {
                assert_eq!(event, "ingest.job.updated");
                assert_eq!(data.as_str(), r#"{"id":7}"#);
                assert!(!ephemeral);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"ping","extra":1}"#).is_err());
        let e = ServerMsg::error(Some(3), ErrorCode::Forbidden, "no publish right");
        let s = serde_json::to_string(&e).expect("ser");
        assert_eq!(
            s,
            r#"{"type":"error","id":3,"code":"forbidden","message":"no publish right"}"#
        );
        assert_eq!(ErrorCode::RateLimited.to_string(), "rate_limited");
        let op = ServerMsg::Op {
            channel: "c".into(),
            dot: "00000000000000a1:3".into(),
            hlc: "5.0".into(),
            token: "AQA".into(),
            view: OpView::Set {
                key: "k".into(),
                value: Payload::from_json("1").expect("json"),
                by: Some("user-7".into()),
            },
        };
        let s = serde_json::to_string(&op).expect("ser");
        assert!(s.contains(r#""op":"set""#), "{s}");
        let back: ServerMsg = serde_json::from_str(&s).expect("de");
        assert_eq!(back, op);
    }
}
