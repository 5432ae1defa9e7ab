//! Ops, the unit of replication, and their JSON payloads.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hlc::Hlc;
use crate::ids::Dot;
use crate::vv::VersionVector;

/// Longest event type, state key or idempotency key, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// A JSON value kept as its validated text, so it is parsed once at the edge of the
/// system and copied as bytes everywhere else.
///
/// Human-readable formats (JSON) see it as the raw JSON value; binary formats (bincode)
/// see it as a string that is validated again when decoded.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payload(Box<str>);

/// Text that is not a JSON value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload is not valid JSON: {0}")]
pub struct PayloadError(pub String);

impl Payload {
    /// Validates `text` as one JSON value.
    pub fn from_json(text: impl Into<String>) -> Result<Self, PayloadError> {
        let text = text.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| PayloadError(e.to_string()))?;
        Ok(Self(text.into_boxed_str()))
    }

    /// Serializes a value into a payload.
    pub fn from_value<T: Serialize>(v: &T) -> Self {
        // Serializing a `Serialize` value into JSON text cannot produce invalid JSON.
        let text = serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned());
        Self(text.into_boxed_str())
    }

    pub fn null() -> Self {
        Self("null".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            let raw: &serde_json::value::RawValue = serde_json::from_str(&self.0)
                .map_err(|e| serde::ser::Error::custom(e.to_string()))?;
            raw.serialize(s)
        } else {
            s.serialize_str(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            // Through `Value`, not `RawValue`: payloads sit inside internally tagged
            // enums, which serde buffers in a way `RawValue` cannot read from.
            let v = serde_json::Value::deserialize(d)?;
            Ok(Self::from_value(&v))
        } else {
            let text = String::deserialize(d)?;
            Payload::from_json(text).map_err(D::Error::custom)
        }
    }
}

/// What an op does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "OpBodyWire", into = "OpBodyWire")]
pub enum OpBody {
    /// An event appended to the channel's history (`ingest.job.updated`, ...).
    Event {
        kind: String,
        data: Payload,
        /// A client-chosen key; a second publish with the same key returns the first dot.
        idempotency_key: Option<String>,
        /// Who published it: the subject of the credential the endpoint that took the
        /// write authenticated (a JWT's `sub`, an API key's name). Set by the server,
        /// never by the client, so a service can trust who sent a command.
        by: Option<String>,
    },
    /// Writes `value` to a state key, superseding the siblings covered by `context`.
    Set {
        key: String,
        value: Payload,
        context: VersionVector,
        /// Who wrote it (as for [`OpBody::Event`]).
        by: Option<String>,
    },
    /// Deletes a state key (a tombstone), superseding the siblings covered by `context`.
    Delete {
        key: String,
        context: VersionVector,
        /// Who deleted it (as for [`OpBody::Event`]).
        by: Option<String>,
    },
}

impl Op {
    /// An upper bound, roughly, of this op's encoded size on the wire and in memory
    /// (what byte-bounded batches and residency budgets count).
    pub fn approx_bytes(&self) -> usize {
        64 + 16 * self.deps.len() + self.body.approx_bytes()
    }
}

/// How an [`OpBody`] is encoded (storage, links, the shared log). Ops from before
/// events carried their publisher keep decoding as `Event`; an event with a publisher
/// is the fourth variant, so that the encoding of every older op is unchanged (peers
/// older than it cannot read such ops: upgrade coordinators before edges).
#[derive(Clone, Serialize, Deserialize)]
enum OpBodyWire {
    Event {
        kind: String,
        data: Payload,
        idempotency_key: Option<String>,
    },
    Set {
        key: String,
        value: Payload,
        context: VersionVector,
    },
    Delete {
        key: String,
        context: VersionVector,
    },
    EventBy {
        kind: String,
        data: Payload,
        idempotency_key: Option<String>,
        by: String,
    },
    SetBy {
        key: String,
        value: Payload,
        context: VersionVector,
        by: String,
    },
    DeleteBy {
        key: String,
        context: VersionVector,
        by: String,
    },
}

impl From<OpBodyWire> for OpBody {
    fn from(w: OpBodyWire) -> Self {
        match w {
            OpBodyWire::Event {
                kind,
                data,
                idempotency_key,
            } => OpBody::Event {
                kind,
                data,
                idempotency_key,
                by: None,
            },
            OpBodyWire::EventBy {
                kind,
                data,
                idempotency_key,
                by,
            } => OpBody::Event {
                kind,
                data,
                idempotency_key,
                by: Some(by),
            },
            OpBodyWire::Set {
                key,
                value,
                context,
            } => OpBody::Set {
                key,
                value,
                context,
                by: None,
            },
            OpBodyWire::SetBy {
                key,
                value,
                context,
                by,
            } => OpBody::Set {
                key,
                value,
                context,
                by: Some(by),
            },
            OpBodyWire::Delete { key, context } => OpBody::Delete {
                key,
                context,
                by: None,
            },
            OpBodyWire::DeleteBy { key, context, by } => OpBody::Delete {
                key,
                context,
                by: Some(by),
            },
        }
    }
}

impl From<OpBody> for OpBodyWire {
    fn from(b: OpBody) -> Self {
        match b {
            OpBody::Event {
                kind,
                data,
                idempotency_key,
                by: None,
            } => OpBodyWire::Event {
                kind,
                data,
                idempotency_key,
            },
            OpBody::Event {
                kind,
                data,
                idempotency_key,
                by: Some(by),
            } => OpBodyWire::EventBy {
                kind,
                data,
                idempotency_key,
                by,
            },
            OpBody::Set {
                key,
                value,
                context,
                by: None,
            } => OpBodyWire::Set {
                key,
                value,
                context,
            },
            OpBody::Set {
                key,
                value,
                context,
                by: Some(by),
            } => OpBodyWire::SetBy {
                key,
                value,
                context,
                by,
            },
            OpBody::Delete {
                key,
                context,
                by: None,
            } => OpBodyWire::Delete { key, context },
            OpBody::Delete {
                key,
                context,
                by: Some(by),
            } => OpBodyWire::DeleteBy { key, context, by },
        }
    }
}

impl OpBody {
    /// Bytes of the body's variable parts (names, payloads, contexts).
    pub fn approx_bytes(&self) -> usize {
        match self {
            OpBody::Event {
                kind,
                data,
                idempotency_key,
                by,
            } => {
                kind.len()
                    + data.len()
                    + idempotency_key.as_ref().map_or(0, String::len)
                    + by.as_ref().map_or(0, String::len)
            }
            OpBody::Set {
                key,
                value,
                context,
                by,
            } => key.len() + value.len() + 16 * context.len() + by.as_ref().map_or(0, String::len),
            OpBody::Delete { key, context, by } => {
                key.len() + 16 * context.len() + by.as_ref().map_or(0, String::len)
            }
        }
    }

    /// The state key this op writes, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            OpBody::Event { .. } => None,
            OpBody::Set { key, .. } | OpBody::Delete { key, .. } => Some(key),
        }
    }

    /// Checks lengths of the client-chosen names.
    pub fn validate(&self) -> Result<(), OpError> {
        let check = |what: &'static str, s: &str| {
            if s.is_empty() || s.len() > MAX_NAME_LEN {
                Err(OpError::BadName(what, s.len()))
            } else {
                Ok(())
            }
        };
        match self {
            OpBody::Event {
                kind,
                idempotency_key,
                ..
            } => {
                check("event type", kind)?;
                if let Some(k) = idempotency_key {
                    check("idempotency key", k)?;
                }
                Ok(())
            }
            OpBody::Set { key, .. } | OpBody::Delete { key, .. } => check("state key", key),
        }
    }
}

/// An op invalid before it is even applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{0} must be 1 to {MAX_NAME_LEN} bytes, got {1}")]
    BadName(&'static str, usize),
}

/// One replicated op: a dot, a timestamp, its causal dependencies and a body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub dot: Dot,
    pub hlc: Hlc,
    /// What the origin had applied from *other* origins when it made this op (its own
    /// earlier ops are implied by `dot.seq - 1`). Receivers buffer the op until they
    /// have applied all of it, which gives causal delivery.
    pub deps: VersionVector,
    pub body: OpBody,
}

/// A message that is fanned out to current subscribers and never stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ephemeral {
    pub kind: String,
    pub data: Payload,
    /// Who sent it (a connection or user id), as the gateway wants it shown.
    pub from: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_json_and_binary() {
        let p = Payload::from_json(r#"{"a": [1, 2]}"#).expect("json");
        assert_eq!(serde_json::to_string(&p).expect("ser"), r#"{"a": [1, 2]}"#);
        let back: Payload = serde_json::from_str(r#"{"a": [1, 2]}"#).expect("de");
        assert_eq!(back.as_str(), r#"{"a":[1,2]}"#);
        assert!(Payload::from_json("{nope").is_err());
        let bytes = crate::codec::to_bytes(&p).expect("enc");
        let dec: Payload = crate::codec::from_bytes(&bytes).expect("dec");
        assert_eq!(dec, p);
        let bad = crate::codec::to_bytes("{nope").expect("enc");
        assert!(crate::codec::from_bytes::<Payload>(&bad).is_err());
    }

    /// The op body as it was encoded before events carried their publisher.
    #[derive(Serialize)]
    enum LegacyBody {
        Event {
            kind: String,
            data: Payload,
            idempotency_key: Option<String>,
        },
        #[allow(dead_code)]
        Set {
            key: String,
            value: Payload,
            context: VersionVector,
        },
        Delete {
            key: String,
            context: VersionVector,
        },
    }

    #[derive(Serialize)]
    struct LegacyOp {
        dot: Dot,
        hlc: Hlc,
        deps: VersionVector,
        body: LegacyBody,
    }

    fn op(body: OpBody) -> Op {
        let origin = crate::ReplicaId::new(7).expect("id");
        Op {
            dot: Dot::new(origin, 3),
            hlc: Hlc::new(1_000, 2),
            deps: VersionVector::new(),
            body,
        }
    }

    #[test]
    fn ops_stored_before_publishers_were_recorded_still_decode_the_same() {
        let legacy = LegacyOp {
            dot: Dot::new(crate::ReplicaId::new(7).expect("id"), 3),
            hlc: Hlc::new(1_000, 2),
            deps: VersionVector::new(),
            body: LegacyBody::Event {
                kind: "pause".into(),
                data: Payload::from_value(&1),
                idempotency_key: Some("k".into()),
            },
        };
        let old_bytes = crate::codec::to_bytes(&legacy).expect("enc");
        let decoded: Op = crate::codec::from_bytes(&old_bytes).expect("dec");
        let unstamped = op(OpBody::Event {
            kind: "pause".into(),
            data: Payload::from_value(&1),
            idempotency_key: Some("k".into()),
            by: None,
        });
        assert_eq!(decoded, unstamped);
        // And an op without a publisher encodes exactly as before (older peers read it).
        assert_eq!(crate::codec::to_bytes(&unstamped).expect("enc"), old_bytes);
        let legacy_delete = LegacyOp {
            body: LegacyBody::Delete {
                key: "k".into(),
                context: VersionVector::new(),
            },
            ..legacy
        };
        let delete = op(OpBody::Delete {
            key: "k".into(),
            context: VersionVector::new(),
            by: None,
        });
        assert_eq!(
            crate::codec::to_bytes(&delete).expect("enc"),
            crate::codec::to_bytes(&legacy_delete).expect("enc")
        );
    }

    #[test]
    fn an_events_publisher_round_trips() {
        let stamped = op(OpBody::Event {
            kind: "pause".into(),
            data: Payload::from_value(&"now"),
            idempotency_key: None,
            by: Some("user-7".into()),
        });
        let bytes = crate::codec::to_bytes(&stamped).expect("enc");
        assert_eq!(
            crate::codec::from_bytes::<Op>(&bytes).expect("dec"),
            stamped
        );
        for body in [
            OpBody::Set {
                key: "k".into(),
                value: Payload::from_value(&1),
                context: VersionVector::new(),
                by: Some("apikey:svc".into()),
            },
            OpBody::Delete {
                key: "k".into(),
                context: VersionVector::new(),
                by: Some("user-7".into()),
            },
        ] {
            let o = op(body);
            let bytes = crate::codec::to_bytes(&o).expect("enc");
            assert_eq!(crate::codec::from_bytes::<Op>(&bytes).expect("dec"), o);
        }
        let view = crate::client::OpView::from(&stamped.body);
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["by"], "user-7");
        let unstamped = crate::client::OpView::from(
            &op(OpBody::Event {
                kind: "e".into(),
                data: Payload::from_value(&1),
                idempotency_key: None,
                by: None,
            })
            .body,
        );
        assert!(serde_json::to_value(&unstamped)
            .expect("json")
            .get("by")
            .is_none());
    }
}
