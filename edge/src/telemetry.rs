//! The catalogue of the Prometheus series a node exposes (documented in
//! docs/OPERATIONS.md, "Metrics"). Every series without labels is registered at start
//! (counters and gauges at 0, histograms empty), so that a dashboard or an alert on
//! `outpost_flush_failures_total` sees the series before the first failure instead of
//! "no data". Series with labels appear with their first label value.

use shared::sync::Role;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which nodes expose a series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Every,
    Edge,
    Cloud,
    /// A cloud node with a `[jetstream]` shared log.
    Coordinator,
}

#[derive(Clone, Copy, Debug)]
pub struct Series {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    /// Label names; empty for a single series.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn s(
    name: &'static str,
    kind: Kind,
    scope: Scope,
    labels: &'static [&'static str],
    help: &'static str,
) -> Series {
    Series {
        name,
        kind,
        scope,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};
use Scope::{Cloud, Coordinator, Edge, Every};

pub const SERIES: &[Series] = &[
    s(
        "outpost_connections",
        Gauge,
        Every,
        &[],
        "open client connections (WebSocket and SSE)",
    ),
    s(
        "outpost_subscriptions",
        Gauge,
        Every,
        &[],
        "channel subscriptions",
    ),
    s(
        "outpost_ops_in_total",
        Counter,
        Every,
        &["kind", "via"],
        "client writes accepted",
    ),
    s(
        "outpost_ops_out_total",
        Counter,
        Every,
        &[],
        "op deliveries to subscribers",
    ),
    s(
        "outpost_slow_consumer_closes_total",
        Counter,
        Every,
        &[],
        "connections closed with 4100 (they resume)",
    ),
    s(
        "outpost_errors_total",
        Counter,
        Every,
        &["code"],
        "errors answered, by stable code",
    ),
    s(
        "outpost_auth_failures_total",
        Counter,
        Every,
        &["code"],
        "rejected client credentials",
    ),
    s(
        "outpost_flush_seconds",
        Histogram,
        Every,
        &[],
        "group-commit flush time (what an ack waits for)",
    ),
    s(
        "outpost_flush_failures_total",
        Counter,
        Every,
        &[],
        "failed flushes; writes are refused meanwhile",
    ),
    s(
        "outpost_storage_broken",
        Gauge,
        Every,
        &[],
        "1 while storage is being reopened after a failed write or flush",
    ),
    s(
        "outpost_sockets_refused_total",
        Counter,
        Every,
        &[],
        "sockets closed at once because limits.max_sockets were open",
    ),
    s(
        "outpost_accept_errors_total",
        Counter,
        Every,
        &[],
        "failed accept calls (out of file descriptors)",
    ),
    s(
        "outpost_tls_handshake_failures_total",
        Counter,
        Every,
        &[],
        "TLS handshakes on the client listener that failed or timed out",
    ),
    s(
        "outpost_jwks_refreshes_total",
        Counter,
        Every,
        &["result"],
        "fetches of the JWKS document ([auth] jwks_url), by result",
    ),
    s(
        "outpost_tls_reloads_total",
        Counter,
        Every,
        &["result"],
        "reloads of the client listener's certificate, by result",
    ),
    s(
        "outpost_channels",
        Gauge,
        Every,
        &[],
        "channels resident in memory",
    ),
    s(
        "outpost_resident_bytes",
        Gauge,
        Every,
        &[],
        "approximate bytes of the resident channels",
    ),
    s(
        "outpost_channel_loads_total",
        Counter,
        Every,
        &[],
        "channels loaded from disk when used",
    ),
    s(
        "outpost_channel_unloads_total",
        Counter,
        Every,
        &[],
        "channels unloaded when idle or over budget",
    ),
    s(
        "outpost_channel_load_seconds",
        Histogram,
        Every,
        &[],
        "time to load one channel",
    ),
    s(
        "outpost_outbox_ops",
        Gauge,
        Every,
        &[],
        "local ops not yet acknowledged upstream (0 on the cloud)",
    ),
    s(
        "outpost_storage_bytes",
        Gauge,
        Every,
        &[],
        "the store's size on disk",
    ),
    s(
        "outpost_conflicts_total",
        Counter,
        Every,
        &[],
        "concurrent writes recorded",
    ),
    s(
        "outpost_rtc_peers",
        Gauge,
        Every,
        &[],
        "open WebRTC peer connections",
    ),
    s(
        "outpost_rtc_offers_total",
        Counter,
        Every,
        &["result"],
        "WebRTC offers answered or refused",
    ),
    s(
        "outpost_link_frames_in_total",
        Counter,
        Every,
        &[],
        "QUIC link frames received",
    ),
    s(
        "outpost_link_frames_out_total",
        Counter,
        Every,
        &[],
        "QUIC link frames sent",
    ),
    s(
        "outpost_link_bytes_in_total",
        Counter,
        Every,
        &[],
        "QUIC link bytes received",
    ),
    s(
        "outpost_link_bytes_out_total",
        Counter,
        Every,
        &[],
        "QUIC link bytes sent",
    ),
    s(
        "outpost_link_ops_out_total",
        Counter,
        Every,
        &[],
        "ops sent on links",
    ),
    s(
        "outpost_link_overflows_total",
        Counter,
        Every,
        &[],
        "links dropped because their queue filled",
    ),
    s(
        "outpost_link_frames_unsendable_total",
        Counter,
        Every,
        &[],
        "sync messages too large for a frame even alone",
    ),
    s(
        "outpost_link_rtt_ms",
        Gauge,
        Every,
        &["peer"],
        "heartbeat round-trip time",
    ),
    s(
        "outpost_cache_evictions_total",
        Counter,
        Edge,
        &[],
        "channels evicted from the edge cache",
    ),
    s(
        "outpost_cache_bytes",
        Gauge,
        Edge,
        &[],
        "bytes held by the edge cache",
    ),
    s(
        "outpost_uplink_connected",
        Gauge,
        Edge,
        &[],
        "1 while linked to the cloud",
    ),
    s(
        "outpost_uplink_disconnects_total",
        Counter,
        Edge,
        &[],
        "uplink losses",
    ),
    s(
        "outpost_uplink_refusals_total",
        Counter,
        Edge,
        &[],
        "uplinks refused by the cloud",
    ),
    s(
        "outpost_read_fetches_total",
        Counter,
        Edge,
        &[],
        "reads of channels without subscribers here that asked the upstream first",
    ),
    s(
        "outpost_read_fetch_timeouts_total",
        Counter,
        Edge,
        &[],
        "such reads answered with what the edge holds (upstream away or slow)",
    ),
    s(
        "outpost_edges_connected",
        Gauge,
        Cloud,
        &[],
        "edges linked now",
    ),
    s(
        "outpost_edge_rtt_ms",
        Gauge,
        Cloud,
        &["edge"],
        "per-edge link round-trip time",
    ),
    s(
        "outpost_edge_lag_ops",
        Gauge,
        Cloud,
        &["edge"],
        "per-edge ops the edge has not acknowledged",
    ),
    s(
        "outpost_edge_outbox_ops",
        Gauge,
        Cloud,
        &["edge"],
        "per-edge ops the edge has not had acknowledged",
    ),
    s(
        "outpost_edge_clients",
        Gauge,
        Cloud,
        &["edge"],
        "per-edge client connections",
    ),
    s(
        "outpost_edge_auth_failures_total",
        Counter,
        Cloud,
        &["reason"],
        "refused edge links",
    ),
    s(
        "outpost_shared_log_flush_seconds",
        Histogram,
        Coordinator,
        &[],
        "time to store a batch in the shared log",
    ),
    s(
        "outpost_shared_log_records_total",
        Counter,
        Coordinator,
        &[],
        "records stored in the shared log",
    ),
    s(
        "outpost_shared_log_failures_total",
        Counter,
        Coordinator,
        &[],
        "failed shared-log stores (retried)",
    ),
    s(
        "outpost_shared_log_tail_restarts_total",
        Counter,
        Coordinator,
        &[],
        "restarts of the shared-log tail",
    ),
    s(
        "outpost_shared_log_tail_stalls_total",
        Counter,
        Coordinator,
        &[],
        "tail restarts because it fell behind the stream",
    ),
];

/// The series a node of this role exposes.
pub fn applies(series: &Series, role: Role, coordinator: bool) -> bool {
    match series.scope {
        Every => true,
        Edge => role == Role::Edge,
        Cloud => role == Role::Cloud,
        Coordinator => role == Role::Cloud && coordinator,
    }
}

/// Describes every series and registers the unlabeled ones of this role. Call after
/// the recorder is installed and before anything records.
pub fn register(role: Role, coordinator: bool) {
    for m in SERIES.iter().filter(|m| applies(m, role, coordinator)) {
        match m.kind {
            Counter => {
                metrics::describe_counter!(m.name, m.help);
                if m.labels.is_empty() {
                    metrics::counter!(m.name).increment(0);
                }
            }
            Gauge => {
                metrics::describe_gauge!(m.name, m.help);
                if m.labels.is_empty() {
                    metrics::gauge!(m.name).increment(0.0);
                }
            }
            Histogram => {
                metrics::describe_histogram!(m.name, m.help);
                if m.labels.is_empty() {
                    // Registers the series; an empty histogram renders count 0.
                    let _ = metrics::histogram!(m.name);
                }
            }
        }
    }
}
