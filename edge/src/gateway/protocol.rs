//! The client protocol (docs/PROTOCOL.md) for one connection, whatever carries it:
//! `connect`, `subscribe`, `publish`, `set`/`delete`/`get`, `presence`, `members`,
//! `signal`, `ping` — authorization, limits, and the replies. The connection task
//! (`super::conn`) feeds it text and writes what it returns.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::FuturesOrdered;
use serde::Deserialize;
use shared::client::{self, dot_string, ClientMsg, ErrorCode, ServerMsg};
use shared::pattern::ChannelPattern;
use shared::replica::{LocalOutcome, LocalWrite};
use shared::ChannelName;

use super::conn::{Ack, Later};
use super::views::{members, since, state_view};
use super::{channel, now_secs, ApiError, AppState, ConnGuard};
use crate::auth::{Action, Principal};
use crate::fanout::{ConnHandle, SendQueueRx};

/// One connection's protocol state.
pub(super) struct Conn {
    state: Arc<AppState>,
    pub(super) principal: Option<Principal>,
    pub(super) handle: Option<ConnHandle>,
    pub(super) queue: Option<SendQueueRx>,
    subs: HashSet<ChannelName>,
    /// Namespace subscriptions: the channels each subscribed when it started (those it
    /// adopted later the fan-out keeps).
    patterns: HashMap<String, Vec<ChannelName>>,
    /// Subscriptions waiting for the edge to fetch their channel: the attempt number
    /// each waits as (an unsubscribe or a new subscribe meanwhile supersedes it).
    pending_subs: HashMap<ChannelName, u64>,
    attempts: u64,
    pub(super) acks: FuturesOrdered<Ack>,
    tokens: f64,
    refilled: Instant,
    _slot: ConnGuard,
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

impl Conn {
    pub(super) fn new(state: Arc<AppState>, slot: ConnGuard) -> Self {
        let burst = f64::from(state.cfg.limits.publish_burst);
        Self {
            state,
            principal: None,
            handle: None,
            queue: None,
            subs: HashSet::new(),
            patterns: HashMap::new(),
            pending_subs: HashMap::new(),
            attempts: 0,
            acks: FuturesOrdered::new(),
            tokens: burst,
            refilled: Instant::now(),
            _slot: slot,
        }
    }

    pub(super) fn authenticated(&mut self, p: Principal, id: Option<u64>) -> ServerMsg {
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

    pub(super) fn cleanup(&mut self) {
        if let Some(h) = &self.handle {
            self.patterns.clear();
            for ch in self.state.core.fanout.remove_patterns(h.id, None) {
                self.subs.insert(ch);
            }
            for ch in self.subs.drain() {
                self.state.core.unsubscribe(&ch, h.id);
            }
        }
    }

    pub(super) fn on_text(&mut self, t: &str) -> Vec<ServerMsg> {
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

    /// The connection's principal (`unauthorized` before `connect`).
    fn principal(&self) -> Result<&Principal, ApiError> {
        self.principal.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send {\"type\":\"connect\",\"token\":...} first",
            )
        })
    }

    /// Checks the principal's right on a channel; returns the parsed channel.
    fn authorize(&self, name: &str, action: Action) -> Result<(ChannelName, &Principal), ApiError> {
        let p = self.principal()?;
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
        let (outcome, gen) = self.state.take_write(ch, w, "ws")?;
        let dot = match outcome {
            LocalOutcome::Applied(a) => a.op.dot,
            LocalOutcome::Duplicate(d) => d,
        };
        let core = self.state.core.clone();
        self.acks.push_back(Box::pin(async move {
            Later::Reply(match core.wait_durable(gen).await {
                Ok(()) => ServerMsg::Ack {
                    id,
                    dot: Some(dot_string(dot)),
                },
                Err(e) => ServerMsg::error(id, e.code(), e.to_string()),
            })
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
                self.pending_subs.remove(&ch);
                if self.subs.remove(&ch) {
                    if let Some(h) = &self.handle {
                        self.state.core.unsubscribe(&ch, h.id);
                    }
                }
                Ok(vec![ServerMsg::Unsubscribed { id, channel }])
            }
            ClientMsg::SubscribePattern { id, pattern, since } => self
                .subscribe_pattern(&pattern, since.unwrap_or_default(), id)
                .map_err(|e| (id, e)),
            ClientMsg::UnsubscribePattern { id, pattern } => {
                if let Some(h) = self.handle.clone() {
                    let mut gone = self.patterns.remove(&pattern).unwrap_or_default();
                    gone.extend(self.state.core.fanout.remove_patterns(h.id, Some(&pattern)));
                    for ch in gone {
                        self.subs.remove(&ch);
                        self.state.core.unsubscribe(&ch, h.id);
                    }
                }
                Ok(vec![ServerMsg::UnsubscribedPattern { id, pattern }])
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
                    self.state.publish_ephemeral(&ch, event, data, from);
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
                        by: Some(p.subject.clone()),
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
                if self.subs.contains(&ch) {
                    // Synced live through this very subscription: answer now.
                    let reg = self.state.core.state_get(&ch, &key);
                    return Ok(vec![state_view(id, &ch, &key, reg.as_ref(), siblings)]);
                }
                // Not subscribed here: the edge asks its upstream first (in order
                // with this connection's acks; replies are matched by id anyway).
                let core = self.state.core.clone();
                self.acks.push_back(Box::pin(async move {
                    core.fetch(&ch).await;
                    let reg = core.state_get(&ch, &key);
                    Later::Reply(state_view(id, &ch, &key, reg.as_ref(), siblings))
                }));
                Ok(Vec::new())
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
        let (ch, p) = self
            .authorize(channel, Action::State)
            .map_err(|e| (id, e))?;
        let context = since(context).map_err(|e| (id, e))?;
        let by = Some(p.subject.clone());
        let write = match value {
            Some(value) => LocalWrite::Set {
                key,
                value,
                context,
                by,
            },
            None => LocalWrite::Delete { key, context, by },
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
        self.pending_subs.remove(&ch);
        if self.state.core.needs_fetch(&ch) {
            // The edge is not synced with this channel live (nobody here subscribes to
            // it): bring it up to what the cloud holds first, so that what this
            // subscriber missed is replayed before `subscribed`, as documented.
            self.attempts += 1;
            let attempt = self.attempts;
            self.subs.insert(ch.clone());
            self.pending_subs.insert(ch.clone(), attempt);
            let core = self.state.core.clone();
            self.acks.push_back(Box::pin(async move {
                core.fetch(&ch).await;
                Later::Subscribe {
                    id,
                    channel: ch,
                    since,
                    attempt,
                }
            }));
            return Ok(Vec::new());
        }
        Ok(self.register(&ch, &h, &since, id))
    }

    /// A namespace subscription: each matching channel's replay and `subscribed`, then
    /// `subscribed_pattern`.
    fn subscribe_pattern(
        &mut self,
        text: &str,
        since: std::collections::BTreeMap<String, String>,
        id: Option<u64>,
    ) -> Result<Vec<ServerMsg>, ApiError> {
        let p = self.principal()?;
        let pattern = ChannelPattern::new(text)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
        p.require_pattern(&pattern, Action::Subscribe, now_secs())?;
        let mut from = std::collections::BTreeMap::new();
        for (name, tok) in &since {
            let ch = channel(name)?;
            if !pattern.matches(&ch) {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("since names {ch}, which pattern {pattern} does not match"),
                ));
            }
            from.insert(ch, super::views::since(Some(tok))?);
        }
        let Some(h) = self.handle.clone() else {
            return Err(ApiError::new(ErrorCode::Unauthorized, "connect first"));
        };
        if self.patterns.contains_key(text) {
            return Err(ApiError::new(
                ErrorCode::BadState,
                format!("already subscribed to pattern {pattern}: unsubscribe_pattern first"),
            ));
        }
        let max = self.state.cfg.limits.max_channels_per_pattern;
        let replays = self
            .state
            .core
            .subscribe_pattern(&pattern, &h, &from, max)?;
        let mut out = Vec::new();
        let mut names = Vec::with_capacity(replays.len());
        for (ch, replay) in replays {
            out.extend(replayed(&ch, replay, None));
            self.subs.insert(ch.clone());
            names.push(ch);
        }
        out.push(ServerMsg::SubscribedPattern {
            id,
            pattern: pattern.to_string(),
            channels: names.len(),
        });
        self.patterns.insert(text.to_owned(), names);
        Ok(out)
    }

    /// A waiting request's turn: its reply, or a subscription that can register now.
    pub(super) fn finish(&mut self, later: Later) -> Vec<ServerMsg> {
        match later {
            Later::Reply(m) => vec![m],
            Later::Subscribe {
                id,
                channel,
                since,
                attempt,
            } => {
                if self.pending_subs.get(&channel) != Some(&attempt) {
                    // Unsubscribed (or subscribed again) while the channel was fetched.
                    return vec![ServerMsg::error(
                        id,
                        ErrorCode::BadState,
                        "the subscription was replaced before it completed",
                    )];
                }
                self.pending_subs.remove(&channel);
                match self.handle.clone() {
                    Some(h) => self.register(&channel, &h, &since, id),
                    None => Vec::new(),
                }
            }
        }
    }

    /// Registers a subscription: the replayed ops, then `subscribed`.
    fn register(
        &mut self,
        ch: &ChannelName,
        h: &ConnHandle,
        since: &shared::VersionVector,
        id: Option<u64>,
    ) -> Vec<ServerMsg> {
        let replay = self.state.core.subscribe(ch, h, since);
        self.subs.insert(ch.clone());
        replayed(ch, replay, id)
    }
}

/// A subscription's replayed ops, then its `subscribed`.
fn replayed(ch: &ChannelName, replay: crate::fanout::Replay, id: Option<u64>) -> Vec<ServerMsg> {
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
    out
}
