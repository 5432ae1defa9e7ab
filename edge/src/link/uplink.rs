//! The edge's uplink: dials the cloud endpoints in order, authenticates, and runs the
//! link session; on any failure it backs off (exponential, full jitter) and tries
//! again. While no link is up the edge keeps serving: the core queues local ops in
//! its durable outbox and the next link resyncs by version vector.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shared::client::UplinkState;
use shared::wire::{Frame, PeerRole};
use tokio_util::sync::CancellationToken;

use super::{read_frame, run_session, tls, write_frame, LinkError, Streams};
use crate::config::UplinkConfig;
use crate::core::Core;

/// What the uplink is doing, for `/readyz`-style status and metrics.
#[derive(Debug, Clone, Default)]
pub struct UplinkStatus {
    pub connected_to: Option<SocketAddr>,
    pub cloud: Option<String>,
    pub attempts: u64,
    pub last_error: Option<String>,
}

/// Where the uplink reports how it is doing: the operator's view (`status`) and the
/// clients' (`state`: `connected.uplink` and `uplink` messages).
#[derive(Debug, Clone)]
pub struct Reporting {
    pub status: Arc<std::sync::Mutex<UplinkStatus>>,
    pub state: Arc<tokio::sync::watch::Sender<UplinkState>>,
}

/// The first address of `ep` (`host:port`) of the socket's family.
async fn resolve(ep: &str, v6: bool) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(ep)
        .await?
        .find(|a| a.is_ipv6() == v6)
        .ok_or_else(|| {
            std::io::Error::other(format!("no {} address", if v6 { "IPv6" } else { "IPv4" }))
        })
}

/// Runs the uplink until `shutdown`.
pub async fn run(
    core: Arc<Core>,
    data_dir: std::path::PathBuf,
    cfg: UplinkConfig,
    region: String,
    reporting: Reporting,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let Reporting { status, state } = reporting;
    let client = tls::client_config(&cfg).map_err(|e| LinkError::Setup(e.to_string()))?;
    // An IPv6 literal first: an IPv6 socket; otherwise IPv4 (host names must resolve
    // to IPv4 addresses then).
    let bind: SocketAddr = match cfg.endpoints.first() {
        Some(ep) if ep.starts_with('[') => "[::]:0".parse(),
        _ => "0.0.0.0:0".parse(),
    }
    .map_err(|e| LinkError::Setup(format!("{e}")))?;
    let socket = tls::udp_socket(bind).map_err(|e| LinkError::Setup(format!("udp socket: {e}")))?;
    let mut endpoint = quinn::Endpoint::new(
        tls::endpoint_config(&data_dir).map_err(|e| LinkError::Setup(e.to_string()))?,
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| LinkError::Setup(format!("quinn endpoint: {e}")))?;
    endpoint.set_default_client_config(client);
    let mut failures: u32 = 0;
    loop {
        for ep in &cfg.endpoints {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if let Ok(mut s) = status.lock() {
                s.attempts += 1;
            }
            // Resolved at each dial: a coordinator that moved is found again.
            let addr = match resolve(ep, bind.is_ipv6()).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(endpoint = %ep, error = %e, "uplink endpoint does not resolve");
                    if let Ok(mut s) = status.lock() {
                        s.last_error = Some(format!("{ep}: {e}"));
                    }
                    continue;
                }
            };
            match connect(&endpoint, addr, &cfg, &core, &region).await {
                Ok((conn, streams, cloud)) => {
                    failures = 0;
                    tracing::info!(%addr, %cloud, "uplink connected");
                    metrics::gauge!("outpost_uplink_connected").set(1.0);
                    state.send_replace(UplinkState::Connected);
                    if let Ok(mut s) = status.lock() {
                        s.connected_to = Some(addr);
                        s.cloud = Some(cloud.to_string());
                        s.last_error = None;
                    }
                    let why = run_session(
                        core.clone(),
                        cloud,
                        conn,
                        streams,
                        cfg.max_frame_bytes,
                        shutdown.clone(),
                    )
                    .await;
                    metrics::gauge!("outpost_uplink_connected").set(0.0);
                    state.send_replace(UplinkState::Disconnected);
                    metrics::counter!("outpost_uplink_disconnects_total").increment(1);
                    tracing::warn!(%addr, reason = %why, "uplink lost");
                    if let Ok(mut s) = status.lock() {
                        s.connected_to = None;
                        s.last_error = Some(why.to_string());
                    }
                    // Reconnect at once to the preferred endpoint after a working link.
                    break;
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "uplink connect failed");
                    if let Ok(mut s) = status.lock() {
                        s.last_error = Some(e.to_string());
                    }
                    if matches!(e, LinkError::Refused { .. }) {
                        metrics::counter!("outpost_uplink_refusals_total").increment(1);
                    }
                }
            }
        }
        failures = failures.saturating_add(1);
        let cap = cfg
            .backoff_min_ms
            .saturating_mul(1u64 << failures.min(16))
            .min(cfg.backoff_max_ms);
        let wait = jitter(cap.max(cfg.backoff_min_ms));
        tokio::select! {
            _ = shutdown.cancelled() => {
                endpoint.close(0u32.into(), b"shutting down");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

/// Full jitter: uniform in [cap/2, cap].
fn jitter(cap: u64) -> u64 {
    let r = getrandom::u64().unwrap_or(cap);
    cap / 2 + r % (cap / 2 + 1)
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    cfg: &UplinkConfig,
    core: &Core,
    region: &str,
) -> Result<(quinn::Connection, Streams, shared::ReplicaId), LinkError> {
    let connecting = endpoint.connect(addr, &cfg.server_name)?;
    let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| LinkError::Timeout("QUIC handshake"))??;
    let max = cfg.max_frame_bytes;
    let mut buf = Vec::new();
    let (mut csend, mut crecv) = conn.open_bi().await?;
    let hello = Frame::Hello {
        replica: core.id,
        role: PeerRole::Edge,
        region: region.to_owned(),
        software: format!("outpost-edge {}", env!("CARGO_PKG_VERSION")),
        credential: cfg.token.clone(),
    };
    write_frame(&mut csend, &hello, max, &mut buf).await?;
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut crecv, max, &mut buf),
    )
    .await
    .map_err(|_| LinkError::Timeout("welcome"))??;
    let cloud = match answer {
        Some(Frame::Welcome { replica }) => replica,
        Some(Frame::Close { code, reason }) => return Err(LinkError::Refused { code, reason }),
        Some(other) => {
            return Err(LinkError::Protocol(format!(
                "expected welcome, got {}",
                super::frame_name(&other)
            )))
        }
        None => {
            return Err(LinkError::Protocol(
                "cloud closed the control stream".into(),
            ))
        }
    };
    let (mut dsend, drecv) = conn.open_bi().await?;
    write_frame(
        &mut dsend,
        &Frame::DataStream { replica: core.id },
        max,
        &mut buf,
    )
    .await?;
    Ok((
        conn,
        Streams {
            control: (csend, crecv),
            data: (dsend, drecv),
        },
        cloud,
    ))
}
