//! What several transports answer alike: resume tokens read from a request, a state
//! register rendered for a client, a channel's members, a write's ack, and the query
//! of history and event-stream reads. REST, SSE and the protocol handler use these;
//! none of them imports another.

use serde::Deserialize;
use shared::client::{dot_string, ErrorCode, Member, ServerMsg, SiblingView};
use shared::replica::LocalOutcome;
use shared::{token, ChannelName, Register, VersionVector};

use super::{ApiError, AppState};

#[derive(Debug, Default, Deserialize)]
pub struct HistoryQuery {
    pub token: Option<String>,
    pub since: Option<String>,
    pub limit: Option<usize>,
}

/// Decodes an optional resume token or context.
pub fn since(token: Option<&str>) -> Result<VersionVector, ApiError> {
    match token.filter(|t| !t.is_empty()) {
        None => Ok(VersionVector::new()),
        Some(t) => token::decode(t)
            .map_err(|e| ApiError::new(ErrorCode::BadResumeToken, format!("resume token: {e}"))),
    }
}

pub fn ack_json(out: &LocalOutcome) -> serde_json::Value {
    match out {
        LocalOutcome::Applied(a) => {
            serde_json::json!({"type": "ack", "dot": dot_string(a.op.dot), "duplicate": false})
        }
        LocalOutcome::Duplicate(d) => {
            serde_json::json!({"type": "ack", "dot": dot_string(*d), "duplicate": true})
        }
    }
}

/// Renders a register for a client.
pub fn state_view(
    id: Option<u64>,
    ch: &ChannelName,
    key: &str,
    reg: Option<&Register>,
    siblings: bool,
) -> ServerMsg {
    let winner = reg.and_then(Register::winner);
    ServerMsg::State {
        id,
        channel: ch.to_string(),
        key: key.to_owned(),
        value: winner.and_then(|w| w.value.clone()),
        deleted: winner.is_none_or(|w| w.value.is_none()),
        conflict: reg.is_some_and(|r| r.siblings().len() > 1),
        context: token::encode(&reg.map(|r| r.context().clone()).unwrap_or_default()),
        siblings: siblings.then(|| {
            reg.map(|r| {
                r.siblings()
                    .iter()
                    .map(|s| SiblingView {
                        dot: dot_string(s.dot),
                        hlc: format!("{:?}", s.hlc),
                        value: s.value.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
        }),
    }
}

pub fn members(state: &AppState, ch: &ChannelName) -> Vec<Member> {
    state
        .core
        .fanout
        .members(ch)
        .into_iter()
        .map(|(client, subject, data)| Member {
            client,
            subject,
            data,
        })
        .collect()
}
