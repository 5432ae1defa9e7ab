//! Edge configuration: a TOML file, overridden by `OUTPOST_*` environment variables
//! (nested keys joined with `__`, e.g. `OUTPOST_LIMITS__MAX_CONNECTIONS=5000`), then by
//! command-line flags; validated with messages that name the key and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::auth::{Action, Right};

/// How an acknowledgement relates to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge after a group-committed flush to disk (sled flush = fsync).
    Fsync,
    /// Acknowledge once the OS has the write; a machine crash may lose the last writes.
    Os,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub durability: Durability,
    /// How long the group committer waits to gather more writes into one flush.
    pub commit_window_ms: u64,
    /// sled's page cache, in MiB.
    pub cache_mb: u64,
    /// Memory budget for resident channels (logs and state held in memory), in bytes.
    /// Past it, the least recently used channels that may go are unloaded; their data
    /// stays on disk and is loaded again when something needs it.
    pub resident_bytes: u64,
    /// Channels unused for this long are unloaded even under the budget.
    pub resident_idle_secs: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            commit_window_ms: 1,
            cache_mb: 64,
            resident_bytes: 64 << 20,
            resident_idle_secs: 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// Hex SHA-256 of the key; the key itself is never stored.
    pub sha256: String,
    pub rights: Vec<Right>,
    /// When the key stops working (Unix seconds): refused from then on, and open
    /// connections made with it close then (WebSocket 4001, SSE `token_expired`).
    #[serde(default)]
    pub expires_at: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// Ed25519 public key (PEM text, or a path to a PEM file) for EdDSA tokens.
    pub ed25519_public_key: Option<String>,
    /// More token keys, chosen by the token's `kid` (several at once: rotation), for
    /// HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 and EdDSA.
    pub jwt_keys: Vec<JwtKeyConfig>,
    /// An identity provider's JWKS document (http or https): its keys verify tokens
    /// too, refreshed every `jwks_refresh_secs` and soon after an unknown `kid`.
    pub jwks_url: Option<String>,
    pub jwks_refresh_secs: u64,
    /// Required `aud` claim, if set.
    pub audience: Option<String>,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    pub leeway_secs: u64,
    /// Let clients in without a token, with `anonymous_rights`. Dev only.
    pub allow_anonymous: bool,
    pub anonymous_rights: Vec<Right>,
    pub api_keys: Vec<ApiKeyConfig>,
    /// Operator keys (the cloud's `/v1/admin` API and the `outpost` CLI).
    pub operator_keys: Vec<OperatorKey>,
}

/// A key that verifies client tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// The `kid` tokens signed with it carry (identity providers set one; optional).
    #[serde(default)]
    pub kid: Option<String>,
    /// `HS256`, `RS256`, `PS256`, `ES256`, `EdDSA`, … (the key is used for this one only).
    pub alg: String,
    /// The public key (PEM text, or a path to a PEM file); for HS* the shared secret.
    pub key: String,
}

/// A key for the operator API; only its SHA-256 is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorKey {
    pub name: String,
    pub sha256: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            ed25519_public_key: None,
            jwt_keys: Vec::new(),
            jwks_url: None,
            jwks_refresh_secs: 300,
            audience: None,
            issuer: None,
            leeway_secs: 5,
            allow_anonymous: false,
            anonymous_rights: vec![Right {
                channels: "*".into(),
                actions: Action::ALL.to_vec(),
            }],
            api_keys: Vec::new(),
            operator_keys: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest client message (WebSocket message or REST body), in bytes.
    pub max_message_bytes: usize,
    pub max_subscriptions_per_connection: usize,
    /// Channels one namespace subscription may hold (those matching when it starts,
    /// and again those created after).
    pub max_channels_per_pattern: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Sustained publishes (events, state writes) per second per connection.
    pub publish_rate_per_sec: u32,
    /// Burst allowance above the rate.
    pub publish_burst: u32,
    /// Messages queued for one connection before it is closed as a slow consumer.
    pub send_queue: usize,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout_secs: u64,
    /// Open HTTP sockets (before any WebSocket upgrade); more are accepted and closed
    /// at once, so a flood cannot take the descriptors the edge needs.
    pub max_sockets: usize,
    /// A connection must send a request's headers within this time (slowloris).
    pub header_timeout_secs: u64,
    /// Reverse proxies (addresses or networks) whose `X-Forwarded-For` / `Forwarded`
    /// headers name the client for per-IP limits and logs; from anyone else those
    /// headers are ignored. Empty: the socket's peer is the client.
    pub trusted_proxies: Vec<crate::proxy::Network>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_subscriptions_per_connection: 256,
            max_channels_per_pattern: 10_000,
            max_connections: 18_000,
            max_connections_per_ip: 16_000,
            publish_rate_per_sec: 200,
            publish_burst: 400,
            send_queue: 1024,
            idle_timeout_secs: 90,
            max_sockets: 19_000,
            header_timeout_secs: 10,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Keep at most this many ops per channel (unacked local ops are always kept).
    pub max_ops: Option<usize>,
    /// Drop ops older than this.
    pub max_age_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    pub default: Retention,
    /// Per-namespace overrides, keyed by the part of the channel name before `:`.
    pub namespaces: BTreeMap<String, Retention>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            default: Retention {
                max_ops: Some(10_000),
                max_age_secs: None,
            },
            namespaces: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// A member that sends nothing for this long is dropped (a `leave` is sent).
    pub ttl_secs: u64,
    /// Namespaces where presence is off.
    pub disabled_namespaces: Vec<String>,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 30,
            disabled_namespaces: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info,edge=debug`. `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// How an edge reaches the cloud (`[uplink]`). Without it the edge runs on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Cloud endpoints (`host:port`, `ip:port` or `[ipv6]:port`), tried in order; host
    /// names are resolved at each dial, so a moved coordinator is found again.
    pub endpoints: Vec<String>,
    /// The name the cloud's certificate is issued for (TLS server name).
    pub server_name: String,
    /// This edge's credential (the cloud keeps its SHA-256 in `[[hub.edges]]`).
    pub token: String,
    /// Production: a CA bundle (PEM) that the cloud's certificate chains to.
    pub ca: Option<PathBuf>,
    /// Development: the SHA-256 (hex) of the cloud's self-signed certificate to pin.
    pub pin_sha256: Option<String>,
    /// Reconnect backoff bounds, in milliseconds (exponential with full jitter).
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// QUIC keep-alive and idle timeout, in milliseconds. A restarted cloud answers
    /// the next packet of the old connection with a stateless reset, so the keep-alive
    /// bounds how long an edge takes to notice it; the idle timeout bounds how long a
    /// silent (dead or cut off) cloud goes unnoticed.
    pub keepalive_ms: u64,
    pub idle_timeout_ms: u64,
    /// Largest frame accepted or sent on the link, in bytes.
    pub max_frame_bytes: usize,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            server_name: "outpost-cloud".into(),
            token: String::new(),
            ca: None,
            pin_sha256: None,
            backoff_min_ms: 100,
            backoff_max_ms: 5_000,
            keepalive_ms: 500,
            idle_timeout_ms: 10_000,
            max_frame_bytes: shared::wire::DEFAULT_MAX_FRAME,
        }
    }
}

/// An edge the cloud accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeCredential {
    pub name: String,
    /// Hex SHA-256 of the edge's `uplink.token`.
    pub token_sha256: String,
    /// A revoked edge is refused (and disconnected if connected).
    #[serde(default)]
    pub revoked: bool,
}

/// The cloud's QUIC side (`[hub]`), used by the cloud binary only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// UDP address edges connect to.
    pub listen: SocketAddr,
    /// Certificate chain and key (PEM). Without them, dev mode makes a self-signed
    /// certificate in the data dir and prints its SHA-256 for edges to pin.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Names the dev certificate is issued for.
    pub dev_cert_names: Vec<String>,
    pub edges: Vec<EdgeCredential>,
    pub keepalive_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_frame_bytes: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7800)),
            cert: None,
            key: None,
            dev_cert_names: vec!["outpost-cloud".into(), "localhost".into()],
            edges: Vec::new(),
            keepalive_ms: 500,
            idle_timeout_ms: 10_000,
            max_frame_bytes: shared::wire::DEFAULT_MAX_FRAME,
        }
    }
}

/// The clustered cloud tier (`[jetstream]`, cloud only): this coordinator is one of
/// several sharing one op log in a NATS JetStream stream. Without the section the cloud
/// is a single process on its own sled store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// NATS server URLs (`nats://host:4222`); host names are resolved at each connect.
    pub servers: Vec<String>,
    /// The stream holding every channel's ops (subjects `<subject_prefix>.<channel>`).
    pub stream: String,
    pub subject_prefix: String,
    /// Replicas of the stream when this coordinator creates it (3 in production: an
    /// ack then means a majority of the servers stored the op).
    pub replicas: usize,
    /// NATS credentials: user and password, or a token.
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// How long a publish waits for the stream's ack before it is sent again.
    pub ack_timeout_ms: u64,
    /// The fleet's operator state, shared by every coordinator: a KV bucket with the
    /// edge registry and revocations, a stream with the timeline, and core NATS
    /// subjects `<fleet_prefix>.…` for commands (drain, evict) and the timeline.
    pub fleet_bucket: String,
    pub timeline_stream: String,
    pub fleet_prefix: String,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            stream: "OUTPOST_OPS".into(),
            subject_prefix: "outpost.ops".into(),
            replicas: 3,
            user: None,
            password: None,
            token: None,
            ack_timeout_ms: 5_000,
            fleet_bucket: "OUTPOST_FLEET".into(),
            timeline_stream: "OUTPOST_TIMELINE".into(),
            fleet_prefix: "outpost.fleet".into(),
        }
    }
}

/// The edge's channel cache (`[cache]`): channels without local subscribers and
/// with nothing left to send are dropped from memory and disk (the cloud has them)
/// after `ttl_secs`, or sooner, least recently used first, to stay under `max_bytes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub ttl_secs: u64,
    pub max_bytes: u64,
    /// How often eviction runs.
    pub sweep_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 600,
            max_bytes: 256 << 20,
            sweep_secs: 10,
        }
    }
}

/// WebRTC data channels to this server (`[webrtc]`, `POST /v1/rtc/offer`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebRtcConfig {
    pub enabled: bool,
    /// Local address the ICE UDP sockets bind to. A concrete address: a wildcard
    /// skips loopback. Defaults to the gateway's listen address's IP.
    pub bind_ip: Option<std::net::IpAddr>,
    /// UDP ports for ICE, inclusive; `[0, 0]` lets the OS pick.
    pub udp_port_min: u16,
    pub udp_port_max: u16,
    /// The public IPs of an edge behind 1:1 NAT, advertised as host candidates.
    pub public_ips: Vec<String>,
    /// STUN/TURN servers (`stun:host:port`, `turn:host:port`) for this server's ICE
    /// agent; browsers get their own list from the SDK.
    pub ice_servers: Vec<IceServer>,
    /// At most this many peer connections at once (each also counts as a connection).
    pub max_peers: usize,
    /// A peer whose data channel is not open this long after the answer is dropped.
    pub connect_timeout_secs: u64,
    /// Per data channel: bytes handed to SCTP but not yet acknowledged. Past it the
    /// connection's queue backs up and a slow consumer is closed (4100), as on
    /// WebSocket. (A fresh channel's first flight is paced tighter, see
    /// `gateway::rtc`.)
    pub send_buffer_bytes: usize,
}

/// One ICE server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind_ip: None,
            udp_port_min: 0,
            udp_port_max: 0,
            public_ips: Vec::new(),
            ice_servers: Vec::new(),
            max_peers: 1_000,
            connect_timeout_secs: 15,
            send_buffer_bytes: 256 * 1024,
        }
    }
}

/// Test-only endpoints (`[testing]`), off by default and never for production.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Serve `GET /v1/test/echo`: a WebSocket that echoes every message, on the same
    /// WebSocket stack as `/v1/ws` (the Autobahn conformance run drives it).
    pub websocket_echo: bool,
}

/// The operations listener: `/metrics` (and on the cloud the operator API and the
/// dashboard) on their own address, off the client listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Serve them here instead of on `listen` (e.g. an address only the monitoring
    /// network reaches). Unset: on `listen`.
    pub listen: Option<SocketAddr>,
    /// SHA-256 (hex) of a bearer token `/metrics` requires (`Authorization: Bearer`).
    /// Unset: `/metrics` is open to whoever reaches it.
    pub metrics_token_sha256: Option<String>,
}

/// TLS on the client listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM): the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often to look for renewed files, in seconds (0: only on SIGHUP).
    #[serde(default = "default_tls_reload_secs")]
    pub reload_secs: u64,
}

fn default_tls_reload_secs() -> u64 {
    30
}

/// The whole edge configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Address of the client gateway (HTTP, WebSocket, SSE).
    pub listen: SocketAddr,
    /// sled database and replica id live here.
    pub data_dir: PathBuf,
    pub region: String,
    /// Development conveniences: prints a ready token at start. Never in production.
    pub dev: bool,
    /// Seconds between SSE heartbeat comments.
    pub sse_heartbeat_secs: u64,
    /// After SIGTERM, how long the listener keeps accepting (answering `/readyz` with
    /// 503 and refusing new WebSockets) before it closes, so that a load balancer sees
    /// the node draining before connections are refused. Milliseconds.
    pub shutdown_drain_ms: u64,
    /// How long shutdown waits for clients to be told to move, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// HTTPS and WSS on `listen` (with HTTP/2 by ALPN); without it, plain HTTP (for
    /// loopback development, or behind a TLS-terminating proxy).
    pub tls: Option<TlsConfig>,
    pub ops: OpsConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub history: HistoryConfig,
    pub presence: PresenceConfig,
    pub log: LogConfig,
    /// Edge with an uplink only: which channels stay cached.
    pub cache: CacheConfig,
    /// Edge only: the link to the cloud.
    pub uplink: Option<UplinkConfig>,
    /// Cloud only: the QUIC endpoint edges connect to.
    pub hub: Option<HubConfig>,
    /// Cloud only: run as one of several coordinators on a JetStream stream.
    pub jetstream: Option<JetStreamConfig>,
    pub webrtc: WebRtcConfig,
    pub testing: TestingConfig,
}

/// The link's frame limit must hold this many of the largest client message: sync
/// batches are an eighth of a frame (see [`EdgeConfig::link_batch_bytes`]) and every
/// op must fit in one batch with room for its dot, clock and dependencies.
pub const MIN_FRAME_FOR_MESSAGE: usize = 16;

/// `host:port`, `ip:port` or `[ipv6]:port`.
fn valid_endpoint(ep: &str) -> bool {
    if ep.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = ep.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok_and(|p| p > 0)
        && !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// The cloud reads the same configuration, with `[hub]` instead of `[uplink]`.
pub type CloudConfig = EdgeConfig;

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: PathBuf::from("data/edge"),
            region: "local".into(),
            dev: false,
            sse_heartbeat_secs: 15,
            shutdown_drain_ms: 1_000,
            shutdown_grace_ms: 2_000,
            tls: None,
            ops: OpsConfig::default(),
            storage: StorageConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            history: HistoryConfig::default(),
            presence: PresenceConfig::default(),
            log: LogConfig::default(),
            cache: CacheConfig::default(),
            uplink: None,
            hub: None,
            jetstream: None,
            webrtc: WebRtcConfig::default(),
            testing: TestingConfig::default(),
        }
    }
}

/// Top-level configuration keys that `OUTPOST_*` variables may set.
const ENV_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "region",
    "dev",
    "sse_heartbeat_secs",
    "shutdown_drain_ms",
    "shutdown_grace_ms",
    "tls",
    "ops",
    "storage",
    "auth",
    "limits",
    "history",
    "presence",
    "log",
    "cache",
    "uplink",
    "hub",
    "jetstream",
    "webrtc",
];

/// Variables the `outpost` CLI reads; servers ignore them silently.
const CLI_ENV: &[&str] = &["url", "token", "operator_key", "cloud"];

fn top_key(k: &str) -> String {
    k.split("__").next().unwrap_or("").to_ascii_lowercase()
}

/// `OUTPOST_*` variables, nested with `__`, limited to configuration keys (unknown keys
/// inside a section are still errors).
fn env() -> Env {
    Env::prefixed("OUTPOST_")
        .filter(|k| ENV_KEYS.contains(&top_key(k.as_str()).as_str()))
        .split("__")
}

/// `OUTPOST_*` variables that are not configuration (to warn about at start).
pub fn ignored_env() -> Vec<String> {
    std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("OUTPOST_").map(str::to_owned))
        .filter(|k| {
            let top = top_key(k);
            !ENV_KEYS.contains(&top.as_str()) && !CLI_ENV.contains(&top.as_str())
        })
        .map(|k| format!("OUTPOST_{k}"))
        .collect()
}

/// Figment's errors as a reader wants them: the key, what is wrong with it (the bad
/// value, or "did you mean" for an unknown key), and where it came from (the file, or
/// the `OUTPOST_*` variable).
fn describe(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let whence = match &e.metadata {
                Some(m) => match &m.source {
                    Some(figment::Source::File(path)) => format!(" (in {})", path.display()),
                    // The variable as the operator set it: OUTPOST_ + the key path
                    // joined with "__" (see `env`).
                    _ if m.name.contains("environment") => {
                        format!(" (from OUTPOST_{})", e.path.join("__").to_uppercase())
                    }
                    _ => String::new(),
                },
                None => String::new(),
            };
            let what = match &e.kind {
                figment::error::Kind::UnknownField(found, expected) => {
                    let near = expected
                        .iter()
                        .map(|k| (strsim::jaro_winkler(found, k), *k))
                        .filter(|(score, _)| *score > 0.8)
                        .max_by(|a, b| a.0.total_cmp(&b.0));
                    match near {
                        Some((_, k)) => format!("unknown key `{found}`: did you mean `{k}`?"),
                        None => format!(
                            "unknown key `{found}` (known here: {})",
                            expected.join(", ")
                        ),
                    }
                }
                k => k.to_string(),
            };
            let key = match &e.kind {
                // The path already ends with the unknown key itself.
                figment::error::Kind::UnknownField(..) => {
                    e.path[..e.path.len().saturating_sub(1)].join(".")
                }
                _ => key,
            };
            if key.is_empty() {
                format!("{what}{whence}")
            } else {
                format!("{key}: {what}{whence}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

impl EdgeConfig {
    /// Loads defaults, then the file (if any), then `OUTPOST_*` variables, then
    /// `overrides` (flags), and validates the result.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Self, ConfigError> {
        let cfg = Self::load_unvalidated(file, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Like [`EdgeConfig::load`] without the validation (the caller adds to it first).
    pub fn load_unvalidated(file: Option<&Path>, overrides: Figment) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(EdgeConfig::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist (write one with `outpost-edge genconfig > {}`)",
                    path.display(),
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(env()).merge(overrides);
        let cfg: EdgeConfig = fig.extract().map_err(|e| ConfigError::Load(describe(e)))?;
        Ok(cfg)
    }

    /// Parses TOML text alone (for `checkconfig` and tests).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: EdgeConfig = Figment::from(Serialized::defaults(EdgeConfig::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Load(describe(e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let mut bad = |key: &str, problem: &str| {
            p.push(Problem {
                key: key.into(),
                problem: problem.into(),
            })
        };
        if let Some(js) = &self.jetstream {
            if js.servers.is_empty() {
                bad("jetstream.servers", "needs at least one NATS URL");
            }
            if js.replicas == 0 || js.replicas > 5 {
                bad("jetstream.replicas", "must be between 1 and 5");
            }
            let token_ok = |t: &str| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            };
            if !token_ok(&js.stream) {
                bad("jetstream.stream", "letters, digits, '_' and '-' only");
            }
            if !js.subject_prefix.split('.').all(token_ok) {
                bad(
                    "jetstream.subject_prefix",
                    "dot-separated tokens of letters, digits, '_' and '-'",
                );
            }
            if js.ack_timeout_ms == 0 {
                bad("jetstream.ack_timeout_ms", "must be positive");
            }
            for (key, name) in [
                ("jetstream.fleet_bucket", &js.fleet_bucket),
                ("jetstream.timeline_stream", &js.timeline_stream),
            ] {
                if !token_ok(name) {
                    bad(key, "letters, digits, '_' and '-' only");
                }
            }
            if !js.fleet_prefix.split('.').all(token_ok) {
                bad(
                    "jetstream.fleet_prefix",
                    "dot-separated tokens of letters, digits, '_' and '-'",
                );
            }
            let nested = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}."));
            if nested(&js.fleet_prefix, &js.subject_prefix)
                || nested(&js.subject_prefix, &js.fleet_prefix)
            {
                bad(
                    "jetstream.fleet_prefix",
                    "must not overlap subject_prefix (the op stream would capture it)",
                );
            }
            if js.timeline_stream == js.stream {
                bad("jetstream.timeline_stream", "must differ from stream");
            }
        }
        if self.region.is_empty() || self.region.len() > 64 {
            bad("region", "must be 1 to 64 characters");
        }
        let l = &self.limits;
        if l.max_message_bytes < 256 || l.max_message_bytes > 16 << 20 {
            bad(
                "limits.max_message_bytes",
                "must be between 256 and 16777216",
            );
        }
        if l.max_subscriptions_per_connection == 0 {
            bad(
                "limits.max_subscriptions_per_connection",
                "must be at least 1",
            );
        }
        if let Some(h) = &self.ops.metrics_token_sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                bad(
                    "ops.metrics_token_sha256",
                    "must be 64 hex digits (outpost-edge hash-key <token> prints them)",
                );
            }
        }
        if self.ops.listen.is_some_and(|a| a == self.listen) {
            bad(
                "ops.listen",
                "must differ from listen (leave it unset to serve on listen)",
            );
        }
        if l.max_channels_per_pattern == 0 {
            bad("limits.max_channels_per_pattern", "must be at least 1");
        }
        if l.max_sockets == 0 {
            bad("limits.max_sockets", "must be at least 1");
        }
        if l.header_timeout_secs == 0 {
            bad("limits.header_timeout_secs", "must be at least 1");
        }
        if l.max_connections == 0 {
            bad("limits.max_connections", "must be at least 1");
        }
        if l.max_connections_per_ip == 0 {
            bad("limits.max_connections_per_ip", "must be at least 1");
        }
        if l.publish_rate_per_sec == 0 {
            bad("limits.publish_rate_per_sec", "must be at least 1");
        }
        if l.publish_burst < l.publish_rate_per_sec.min(1) {
            bad("limits.publish_burst", "must be at least 1");
        }
        if l.send_queue < 16 {
            bad("limits.send_queue", "must be at least 16");
        }
        if l.idle_timeout_secs == 0 {
            bad("limits.idle_timeout_secs", "must be at least 1");
        }
        if self.storage.commit_window_ms > 100 {
            bad(
                "storage.commit_window_ms",
                "must be at most 100 (it delays every ack)",
            );
        }
        let w = &self.webrtc;
        if w.udp_port_min > w.udp_port_max {
            bad(
                "webrtc.udp_port_min",
                "must not be above webrtc.udp_port_max",
            );
        }
        if w.max_peers == 0 {
            bad("webrtc.max_peers", "must be at least 1");
        }
        if w.connect_timeout_secs == 0 {
            bad("webrtc.connect_timeout_secs", "must be at least 1");
        }
        if w.send_buffer_bytes < 16 * 1024 {
            bad("webrtc.send_buffer_bytes", "must be at least 16384");
        }
        if w.bind_ip.is_some_and(|ip| ip.is_unspecified()) {
            bad(
                "webrtc.bind_ip",
                "must be a concrete address (a wildcard bind skips loopback)",
            );
        }
        if self.sse_heartbeat_secs == 0 {
            bad("sse_heartbeat_secs", "must be at least 1");
        }
        if self.cache.sweep_secs == 0 {
            bad("cache.sweep_secs", "must be at least 1");
        }
        if self.presence.ttl_secs == 0 {
            bad("presence.ttl_secs", "must be at least 1");
        }
        let a = &self.auth;
        if a.hs256_secret.is_none()
            && a.ed25519_public_key.is_none()
            && a.jwt_keys.is_empty()
            && a.jwks_url.is_none()
            && a.api_keys.is_empty()
            && !a.allow_anonymous
        {
            bad(
                "auth",
                "no way to authenticate: set auth.hs256_secret, auth.ed25519_public_key, auth.jwt_keys, auth.jwks_url or auth.api_keys (or auth.allow_anonymous for development)",
            );
        }
        if let Some(s) = &a.hs256_secret {
            if s.len() < 32 {
                bad("auth.hs256_secret", "must be at least 32 characters");
            }
        }
        for (i, k) in a.api_keys.iter().enumerate() {
            if k.sha256.len() != 64 || hex::decode(&k.sha256).is_err() {
                bad(
                    &format!("auth.api_keys[{i}].sha256"),
                    "must be 64 hex digits (the SHA-256 of the key)",
                );
            }
        }
        for (i, k) in a.operator_keys.iter().enumerate() {
            if k.sha256.len() != 64 || hex::decode(&k.sha256).is_err() {
                bad(
                    &format!("auth.operator_keys[{i}].sha256"),
                    "must be 64 hex digits (the SHA-256 of the key)",
                );
            }
        }
        let rights = a
            .api_keys
            .iter()
            .enumerate()
            .flat_map(|(i, k)| {
                k.rights
                    .iter()
                    .map(move |r| (format!("auth.api_keys[{i}].rights"), r))
            })
            .chain(
                a.anonymous_rights
                    .iter()
                    .map(|r| ("auth.anonymous_rights".to_string(), r)),
            );
        for (key, r) in rights {
            if let Err(e) = r.validate() {
                bad(&key, &e);
            }
        }
        for (ns, r) in std::iter::once(("default", &self.history.default))
            .chain(self.history.namespaces.iter().map(|(k, v)| (k.as_str(), v)))
        {
            if r.max_ops == Some(0) {
                bad(&format!("history.{ns}.max_ops"), "must be at least 1");
            }
        }
        if let Some(u) = &self.uplink {
            for ep in &u.endpoints {
                if !valid_endpoint(ep) {
                    bad("uplink.endpoints", &format!("{ep:?} is not host:port"));
                }
            }
            if u.endpoints.is_empty() {
                bad(
                    "uplink.endpoints",
                    "list at least one cloud address (host:port)",
                );
            }
            if u.token.len() < 16 {
                bad("uplink.token", "must be at least 16 characters");
            }
            if u.ca.is_none() && u.pin_sha256.is_none() {
                bad(
                    "uplink",
                    "set uplink.ca (production) or uplink.pin_sha256 (development) so the cloud's certificate can be verified",
                );
            }
            if let Some(pin) = &u.pin_sha256 {
                if pin.len() != 64 || hex::decode(pin).is_err() {
                    bad("uplink.pin_sha256", "must be 64 hex digits");
                }
            }
            if u.backoff_min_ms == 0 || u.backoff_max_ms < u.backoff_min_ms {
                bad(
                    "uplink.backoff_max_ms",
                    "backoff_min_ms must be at least 1 and backoff_max_ms at least backoff_min_ms",
                );
            }
            if u.idle_timeout_ms <= u.keepalive_ms {
                bad(
                    "uplink.idle_timeout_ms",
                    "must be longer than uplink.keepalive_ms",
                );
            }
        }
        if let Some(h) = &self.hub {
            if h.cert.is_some() != h.key.is_some() {
                bad("hub.cert", "hub.cert and hub.key go together");
            }
            if h.cert.is_none() && !self.dev {
                bad(
                    "hub.cert",
                    "production needs hub.cert and hub.key (or run with --dev for a self-signed certificate)",
                );
            }
            for (i, e) in h.edges.iter().enumerate() {
                if e.token_sha256.len() != 64 || hex::decode(&e.token_sha256).is_err() {
                    bad(
                        &format!("hub.edges[{i}].token_sha256"),
                        "must be 64 hex digits",
                    );
                }
            }
            if h.idle_timeout_ms <= h.keepalive_ms {
                bad(
                    "hub.idle_timeout_ms",
                    "must be longer than hub.keepalive_ms",
                );
            }
        }
        // Every op must fit in one sync batch on each link this node has.
        let frames = [
            (
                "uplink.max_frame_bytes",
                self.uplink.as_ref().map(|u| u.max_frame_bytes),
            ),
            (
                "hub.max_frame_bytes",
                self.hub.as_ref().map(|h| h.max_frame_bytes),
            ),
        ];
        for (key, frame) in frames {
            if frame.is_some_and(|f| {
                f < MIN_FRAME_FOR_MESSAGE * l.max_message_bytes
                    || f > shared::wire::ABSOLUTE_MAX_FRAME
            }) {
                bad(
                    key,
                    &format!("must be at least {MIN_FRAME_FOR_MESSAGE} x limits.max_message_bytes (an op must fit in a sync batch) and at most {}", shared::wire::ABSOLUTE_MAX_FRAME),
                );
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    /// Bytes per sync batch on the link (ops or snapshot parts in one frame): an
    /// eighth of the smaller frame limit of this node's link sections.
    pub fn link_batch_bytes(&self) -> usize {
        let frame = [
            self.uplink.as_ref().map(|u| u.max_frame_bytes),
            self.hub.as_ref().map(|h| h.max_frame_bytes),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(shared::wire::DEFAULT_MAX_FRAME);
        shared::sync::batch_bytes_for(frame)
    }

    /// The retention that applies to a channel's namespace.
    pub fn retention(&self, namespace: &str) -> &Retention {
        self.history
            .namespaces
            .get(namespace)
            .unwrap_or(&self.history.default)
    }
}

/// What `genconfig` prints: [`DEFAULT_TOML`] with a freshly generated
/// `auth.hs256_secret`, so that the file passes `checkconfig` and runs as written (a
/// server needs some way to authenticate clients).
pub fn generated_toml() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(DEFAULT_TOML.replacen(
        "# hs256_secret = \"at least 32 characters of secret\"",
        &format!(
            "# Generated by genconfig: clients' HS256 tokens are signed with it; keep it secret.\nhs256_secret = \"{secret}\""
        ),
        1,
    ))
}

/// The commented default configuration (what `genconfig` prints, with a secret).
pub const DEFAULT_TOML: &str = r#"# Outpost edge configuration. Every key is optional; shown are the defaults.
# Environment variables override the file: OUTPOST_<KEY>, nested keys joined by "__",
# e.g. OUTPOST_LISTEN=0.0.0.0:7700 or OUTPOST_LIMITS__MAX_CONNECTIONS=5000.

# Client gateway: HTTP, WebSocket (/v1/ws), SSE, REST, /metrics.
listen = "127.0.0.1:7700"
# The sled database and the replica id live here.
data_dir = "data/edge"
region = "local"
# Development conveniences (prints a ready token at start). Never in production.
dev = false
sse_heartbeat_secs = 15
# After SIGTERM: /readyz answers 503 and new WebSockets are refused for this long
# while the listener still accepts (a load balancer sees the node draining), then the
# listener closes and open requests get shutdown_grace_ms to finish.
shutdown_drain_ms = 1000
shutdown_grace_ms = 2000

# HTTPS and WSS on `listen`, HTTP/2 by ALPN. Renewed files are picked up without a
# restart (on SIGHUP, and when they change). Without [tls]: plain HTTP.
# [tls]
# cert = "/etc/outpost/tls/fullchain.pem"
# key = "/etc/outpost/tls/privkey.pem"
# reload_secs = 30

# /metrics (and on the cloud the operator API and dashboard) on their own address, and
# a bearer token for /metrics. Unset: /metrics is on `listen`, open.
# [ops]
# listen = "10.0.0.5:9100"
# metrics_token_sha256 = "<outpost-edge hash-key <token>>"

[storage]
# "fsync": ack after a group-committed flush. "os": ack once the OS has the write.
durability = "fsync"
commit_window_ms = 1
cache_mb = 64
# Channels live on disk and are loaded into memory when used: at most this many bytes
# of them stay loaded (least recently used go first), none unused for longer than
# resident_idle_secs. Channels with subscribers or unsent writes always stay.
resident_bytes = 67108864
resident_idle_secs = 60

[auth]
# hs256_secret = "at least 32 characters of secret"
# ed25519_public_key = "/etc/outpost/jwt-ed25519.pub.pem"
# audience = "outpost"
# issuer = "https://auth.example.com"
leeway_secs = 5
# Clients without a token get anonymous_rights. Development only.
allow_anonymous = false
anonymous_rights = [{ channels = "*", actions = ["subscribe", "publish", "state", "presence"] }]
# Backend services: the SHA-256 (hex) of each key, and its rights.
# [[auth.api_keys]]
# name = "ingest"
# sha256 = "<64 hex digits>"
# rights = [{ channels = "project:*", actions = ["publish", "state"] }]
# expires_at = 1798761600        # optional: Unix seconds; open connections close then

# An identity provider's keys (JWKS), refreshed; tokens name them by `kid`:
# jwks_url = "https://auth.example.com/.well-known/jwks.json"
# jwks_refresh_secs = 300
# Token keys chosen by the token's `kid` (several at once while rotating):
# [[auth.jwt_keys]]
# kid = "2026-12"
# alg = "ES256"                  # RS256/384/512, PS256/384/512, ES256/384, EdDSA, HS256/384/512
# key = "/etc/outpost/jwt/2026-12.pub.pem"

[limits]
max_message_bytes = 65536
max_subscriptions_per_connection = 256
max_channels_per_pattern = 10000    # namespace subscriptions (cloud, coordinators)
max_connections = 18000
max_connections_per_ip = 16000
publish_rate_per_sec = 200
publish_burst = 400
send_queue = 1024
idle_timeout_secs = 90
max_sockets = 19000            # open HTTP sockets (REST, SSE, before upgrade); extra ones are closed
header_timeout_secs = 10       # request headers must arrive within this (slowloris)
# Behind nginx / an ingress: the proxies whose X-Forwarded-For (or Forwarded) names the
# client for per-IP limits and logs. Headers from anyone else are ignored.
# trusted_proxies = ["127.0.0.1", "10.0.0.0/8"]

[history.default]
max_ops = 10000
# max_age_secs = 86400

# [history.namespaces.cursor]
# max_ops = 100

[presence]
ttl_secs = 30
disabled_namespaces = []

[log]
# "text" or "json"
format = "text"
filter = "info"

# With an uplink: channels without local subscribers and with everything acked are
# dropped after ttl_secs (or least recently used first above max_bytes); the cloud
# has them, and the next subscriber fetches them again.
[cache]
ttl_secs = 600
max_bytes = 268435456
sweep_secs = 10

# WebRTC data channels to this server (POST /v1/rtc/offer).
[webrtc]
enabled = true
# ICE UDP sockets bind here; a concrete address (a wildcard skips loopback).
# Default: the IP of `listen`.
# bind_ip = "10.0.0.5"
# UDP port range for ICE (inclusive); 0-0 lets the OS pick. Open it in firewalls.
udp_port_min = 0
udp_port_max = 0
# The public IPs of an edge behind 1:1 NAT, advertised as host candidates.
public_ips = []
# STUN/TURN servers for this server's ICE agent, e.g.
# ice_servers = [{ urls = ["stun:stun.example.org:3478"] }]
ice_servers = []
# Peer connections at once (each also counts as a connection).
max_peers = 1000
# A peer whose data channel has not opened this long after the answer is dropped.
connect_timeout_secs = 15
# Per data channel: bytes handed to SCTP and not yet acknowledged. Past it the
# connection's queue backs up and a slow consumer is closed (4100).
send_buffer_bytes = 262144

# The link to the cloud. Without this section the edge runs on its own.
# [uplink]
# endpoints = ["127.0.0.1:7800"]        # cloud QUIC endpoints (host:port), tried in order
# server_name = "outpost-cloud"          # the name on the cloud's certificate
# token = "<this edge's secret>"         # the cloud lists its SHA-256 in [[hub.edges]]
# ca = "/etc/outpost/ca.pem"             # production: verify the cloud against this CA
# pin_sha256 = "<64 hex digits>"         # development: pin the cloud's self-signed cert
# backoff_min_ms = 100
# backoff_max_ms = 5000
# keepalive_ms = 500                    # also how soon a restarted cloud is noticed
# idle_timeout_ms = 10000                # how soon a silent (dead) cloud is noticed
# max_frame_bytes = 8388608              # at least 16 x limits.max_message_bytes

# Cloud only: one of several coordinators sharing a NATS JetStream stream (run the NATS
# servers with `sync_interval: always`). Without this section the cloud is one process.
# [jetstream]
# servers = ["nats://127.0.0.1:4222"]    # host names are resolved at each connect
# stream = "OUTPOST_OPS"
# subject_prefix = "outpost.ops"
# replicas = 3                           # an ack means a majority of them stored the op
# ack_timeout_ms = 5000
# user = "..."; password = "..." or token = "..."
# fleet_bucket = "OUTPOST_FLEET"         # KV: the edge registry and revocations, fleet-wide
# timeline_stream = "OUTPOST_TIMELINE"   # the fleet timeline (last 10,000 events)
# fleet_prefix = "outpost.fleet"         # subjects for the timeline and operator commands
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_toml_passes_validation_with_its_own_secret() {
        let (a, b) = (
            generated_toml().expect("random"),
            generated_toml().expect("random"),
        );
        assert_ne!(a, b);
        let cfg = EdgeConfig::from_toml(&a).expect("genconfig's output is valid");
        assert_eq!(cfg.auth.hs256_secret.map(|s| s.len()), Some(48));
        assert!(
            EdgeConfig::from_toml(DEFAULT_TOML).is_err(),
            "no way to authenticate"
        );
    }

    #[test]
    fn unknown_keys_get_a_suggestion_and_bad_values_are_shown() {
        let e = EdgeConfig::from_toml("[limits]\nmax_conections = 3\n")
            .expect_err("unknown key")
            .to_string();
        assert!(
            e.contains("limits: unknown key `max_conections`: did you mean `max_connections`?"),
            "{e}"
        );
        let e = EdgeConfig::from_toml("[limits]\nsend_queue = \"abc\"\n")
            .expect_err("bad type")
            .to_string();
        assert!(
            e.contains("limits.send_queue") && e.contains("\"abc\""),
            "{e}"
        );
    }

    #[test]
    fn default_toml_is_the_default() {
        let parsed: EdgeConfig = Figment::from(Serialized::defaults(EdgeConfig::default()))
            .merge(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("default toml parses");
        assert_eq!(parsed, EdgeConfig::default());
        // The default has no auth method configured: validation says so, by key.
        let err = EdgeConfig::default().validate().expect_err("no auth");
        assert!(err.to_string().contains("auth:"), "{err}");
    }

    #[test]
    fn uplink_endpoints_take_host_names() {
        for ok in [
            "127.0.0.1:7800",
            "[::1]:7800",
            "coordinator-0.outpost.svc:7800",
            "localhost:1",
        ] {
            assert!(valid_endpoint(ok), "{ok}");
        }
        for bad in [
            "",
            "host",
            "host:",
            "host:0",
            "host:99999",
            ":7800",
            "a b:1",
            "http://x:1",
        ] {
            assert!(!valid_endpoint(bad), "{bad}");
        }
    }

    #[test]
    fn jetstream_section_is_checked_by_key() {
        let ok = EdgeConfig::from_toml(
            "[auth]\nallow_anonymous = true\n[jetstream]\nservers = [\"nats://n1:4222\", \"nats://n2:4222\"]\n",
        )
        .expect("valid");
        let js = ok.jetstream.expect("section");
        assert_eq!((js.replicas, js.stream.as_str()), (3, "OUTPOST_OPS"));
        let err = EdgeConfig::from_toml(
            "[auth]\nallow_anonymous = true\n[jetstream]\nservers = []\nreplicas = 0\nstream = \"a.b\"\nsubject_prefix = \"x.>\"\n",
        )
        .expect_err("invalid");
        let s = err.to_string();
        for key in [
            "jetstream.servers",
            "jetstream.replicas",
            "jetstream.stream",
            "jetstream.subject_prefix",
        ] {
            assert!(s.contains(key), "{key} missing in {s}");
        }
    }

    #[test]
    fn problems_name_the_key() {
        let err = EdgeConfig::from_toml(
            "[auth]\nallow_anonymous = true\n[limits]\nsend_queue = 1\nmax_message_bytes = 1\n",
        )
        .expect_err("invalid");
        let s = err.to_string();
        assert!(s.contains("limits.send_queue: must be at least 16"), "{s}");
        assert!(s.contains("limits.max_message_bytes"), "{s}");
        let err = EdgeConfig::from_toml("[limits]\nsend_queu = 100\n").expect_err("unknown key");
        assert!(err.to_string().contains("send_queu"), "{err}");
        let err = EdgeConfig::from_toml("listen = \"nope\"\n").expect_err("bad addr");
        assert!(err.to_string().contains("listen"), "{err}");
    }
}
