//! The cloud's QUIC side: accepts edges, checks their credentials, and runs a link
//! session per edge. An unknown or revoked edge, a wrong first frame, a malformed or
//! oversized frame: the connection is closed with a code and a logged reason, and every
//! other edge keeps being served.

use std::sync::Arc;
use std::time::Duration;

use edge::config::HubConfig;
use edge::core::Core;
use edge::link::{close, frame_name, read_frame, run_session, write_frame, LinkError, Streams};
use sha2::{Digest, Sha256};
use shared::wire::{Frame, PeerRole};
use tokio_util::sync::CancellationToken;

use crate::admin::Revocations;
use crate::fleet::Fleet;

pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    core: Arc<Core>,
    fleet: Arc<Fleet>,
    revoked: Arc<Revocations>,
    cfg: HubConfig,
    shutdown: CancellationToken,
) {
    let cfg = Arc::new(cfg);
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let (core, fleet, cfg, stop) = (core.clone(), fleet.clone(), cfg.clone(), shutdown.clone());
        let revoked = revoked.clone();
        let tasks = core.tasks.clone();
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            match handle(incoming, core, fleet, revoked, cfg, stop).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(%remote, error = %e, "edge link ended"),
            }
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"cloud shutting down");
    endpoint.wait_idle().await;
}

async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: u32,
    reason: &str,
    max: usize,
) -> LinkError {
    let mut buf = Vec::new();
    let _ = write_frame(
        send,
        &Frame::Close {
            code: code as u16,
            reason: reason.into(),
        },
        max,
        &mut buf,
    )
    .await;
    let _ = send.finish();
    // Let the close frame reach the edge before the connection goes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.close(code.into(), reason.as_bytes());
    LinkError::Refused {
        code: code as u16,
        reason: reason.into(),
    }
}

async fn handle(
    incoming: quinn::Incoming,
    core: Arc<Core>,
    fleet: Arc<Fleet>,
    revoked: Arc<Revocations>,
    cfg: Arc<HubConfig>,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let remote = incoming.remote_address();
    let conn = tokio::time::timeout(Duration::from_secs(5), incoming)
        .await
        .map_err(|_| LinkError::Timeout("QUIC handshake"))??;
    let max = cfg.max_frame_bytes;
    let mut buf = Vec::new();
    let (mut csend, mut crecv) = tokio::time::timeout(Duration::from_secs(5), conn.accept_bi())
        .await
        .map_err(|_| LinkError::Timeout("control stream"))??;
    let first = match tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut crecv, max, &mut buf),
    )
    .await
    {
        Err(_) => return Err(LinkError::Timeout("hello")),
        Ok(Err(e)) => {
            let code = e.close_code();
            conn.close(code.into(), e.to_string().as_bytes());
            return Err(e);
        }
        Ok(Ok(f)) => f,
    };
    let Some(Frame::Hello {
        replica,
        role,
        region,
        software,
        credential,
    }) = first
    else {
        let what = first.as_ref().map_or("nothing", frame_name);
        return Err(refuse(
            &conn,
            &mut csend,
            close::PROTOCOL,
            &format!("expected hello, got {what}"),
            max,
        )
        .await);
    };
    if role != PeerRole::Edge {
        return Err(refuse(
            &conn,
            &mut csend,
            close::PROTOCOL,
            "only edges connect to the hub",
            max,
        )
        .await);
    }
    let digest = hex::encode(Sha256::digest(credential.as_bytes()));
    let Some(cred) = cfg
        .edges
        .iter()
        .find(|e| e.token_sha256.eq_ignore_ascii_case(&digest))
    else {
        metrics::counter!("outpost_edge_auth_failures_total", "reason" => "unknown").increment(1);
        tracing::warn!(%remote, edge = %replica, "refused an unknown edge");
        fleet.event(
            &replica.to_string(),
            "refused",
            &format!("unknown credential from {remote}"),
        );
        return Err(refuse(
            &conn,
            &mut csend,
            close::UNKNOWN_EDGE,
            "unknown edge credential",
            max,
        )
        .await);
    };
    if cred.revoked || revoked.contains(&cred.name) {
        fleet.event(
            &cred.name,
            "refused",
            &format!("revoked credential from {remote}"),
        );
        metrics::counter!("outpost_edge_auth_failures_total", "reason" => "revoked").increment(1);
        tracing::warn!(%remote, edge = %replica, name = %cred.name, "refused a revoked edge");
        return Err(refuse(
            &conn,
            &mut csend,
            close::REVOKED,
            "edge credential revoked",
            max,
        )
        .await);
    }
    write_frame(
        &mut csend,
        &Frame::Welcome { replica: core.id },
        max,
        &mut buf,
    )
    .await?;
    let (dsend, mut drecv) = tokio::time::timeout(Duration::from_secs(5), conn.accept_bi())
        .await
        .map_err(|_| LinkError::Timeout("data stream"))??;
    match read_frame(&mut drecv, max, &mut buf).await? {
        Some(Frame::DataStream { replica: r }) if r == replica => {}
        other => {
            let what = other.as_ref().map_or("nothing", frame_name);
            return Err(refuse(
                &conn,
                &mut csend,
                close::PROTOCOL,
                &format!("expected data-stream, got {what}"),
                max,
            )
            .await);
        }
    }
    tracing::info!(%remote, edge = %replica, name = %cred.name, %region, %software, "edge connected");
    let link = fleet.connected(replica, &cred.name, &region, &software, remote);
    let (rtt_conn, rtt_fleet, rtt_core) = (conn.clone(), fleet.clone(), core.clone());
    let rtt_stop = CancellationToken::new();
    let rtt_guard = rtt_stop.clone();
    let (in0, out0) = (core.received_ops(replica), core.router.sent_ops(replica));
    let name = cred.name.clone();
    core.tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut seconds = 0u32;
        loop {
            tokio::select! {
                _ = rtt_stop.cancelled() => return,
                _ = tick.tick() => {
                    seconds += 1;
                    if seconds == 5 {
                        let got = rtt_core.received_ops(replica) - in0;
                        let sent = rtt_core.router.sent_ops(replica) - out0;
                        rtt_fleet.event(&name, "healed", &format!("first 5 s of the link: {got} ops received, {sent} ops sent"));
                    }
                    let (lag, outbox, clients) = rtt_core.with_node(|n| {
                        let p = n.peers().get(&replica);
                        (n.peer_lag(replica), p.map_or(0, |p| p.outbox), p.map_or(0, |p| p.clients))
                    });
                    rtt_fleet.seen(replica, rtt_conn.rtt().as_millis() as u64, lag, outbox, clients);
                }
            }
        }
    });
    let why = run_session(
        core,
        replica,
        conn,
        Streams {
            control: (csend, crecv),
            data: (dsend, drecv),
        },
        max,
        shutdown,
    )
    .await;
    rtt_guard.cancel();
    fleet.disconnected(replica, link, &why.to_string());
    tracing::info!(%remote, edge = %replica, reason = %why, "edge disconnected");
    Ok(())
}
