//! Outpost cloud coordinator: a full replica (the same core and storage as an edge, in
//! the `Cloud` role) that accepts edges over QUIC, persists and acks their ops, and
//! forwards each op to every other edge subscribed to its channel. It serves the same
//! client API as the edges (the edge crate's gateway, not a copy), so clients whose
//! edge died can fall back to it.

pub mod accept;
pub mod admin;
pub mod fleet;
pub mod jetstream;
pub mod session;
pub mod shared_fleet;

use std::net::SocketAddr;
use std::sync::Arc;

use edge::config::CloudConfig;
use edge::link::tls::{self, Identity};
use shared::sync::Role;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the cloud could not start.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("the cloud needs a [hub] section (QUIC listen address, certificate, edges)")]
    NoHub,
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("QUIC endpoint on {addr}: {err}")]
    Quic {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error(transparent)]
    Node(#[from] edge::RunError),
    #[error("NATS (jetstream.servers): {0}")]
    Nats(#[from] async_nats::ConnectError),
}

/// A started cloud: addresses known, not yet serving HTTP.
#[derive(Debug)]
pub struct Started {
    pub quic_addr: SocketAddr,
    /// SHA-256 of the certificate edges see (what they pin in dev mode).
    pub fingerprint: String,
    pub fleet: Arc<fleet::Fleet>,
    running: edge::Running,
    http: TcpListener,
    admin: admin::Admin,
}

/// Opens storage, the QUIC endpoint and the gateway state.
pub async fn start(
    cfg: CloudConfig,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<Started, CloudError> {
    let hub_cfg = cfg.hub.clone().ok_or(CloudError::NoHub)?;
    let identity = match (&hub_cfg.cert, &hub_cfg.key) {
        (Some(c), Some(k)) => Identity::load(c, k)?,
        _ => Identity::dev(&cfg.data_dir, &hub_cfg.dev_cert_names)?,
    };
    let fingerprint = identity.fingerprint();
    let server = tls::server_config(identity, &hub_cfg)?;
    let socket = tls::udp_socket(hub_cfg.listen).map_err(|err| CloudError::Quic {
        addr: hub_cfg.listen,
        err,
    })?;
    let endpoint = quinn::Endpoint::new(
        tls::endpoint_config(&cfg.data_dir)?,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|err| CloudError::Quic {
        addr: hub_cfg.listen,
        err,
    })?;
    let quic_addr = endpoint.local_addr().map_err(|err| CloudError::Quic {
        addr: hub_cfg.listen,
        err,
    })?;
    // Clustered: ops are durable once the shared JetStream log has them.
    let log = match &cfg.jetstream {
        Some(js) => Some(jetstream::JetStreamLog::connect(js).await?),
        None => None,
    };
    let shared_log = log.clone().map(|l| l as Arc<dyn edge::core::SharedLog>);
    let js_cfg = cfg.jetstream.clone();
    let running = edge::build_with_log(cfg, Role::Cloud, shared_log, shutdown.clone())?;
    let fleet = Arc::new(fleet::Fleet::new(running.core.id.to_string()));
    let revoked = Arc::new(admin::Revocations::load(&running.core));
    let mut shared_fleet = None;
    if let (Some(log), Some(js_cfg)) = (log, js_cfg) {
        let sf = shared_fleet::SharedFleet::new(log.context(), js_cfg);
        sf.spawn(
            fleet.clone(),
            revoked.clone(),
            running.core.clone(),
            shutdown.clone(),
        );
        shared_fleet = Some(sf);
        running
            .core
            .tasks
            .spawn(jetstream::tail(log, running.core.clone(), shutdown.clone()));
    } else {
        // One process: the timeline is kept in its own storage, so that it (and the
        // outage it recorded) outlives a restart.
        running.core.tasks.spawn(fleet::keep_timeline(
            fleet.clone(),
            running.core.clone(),
            shutdown.clone(),
        ));
    }
    running.core.tasks.spawn(accept::accept_loop(
        endpoint,
        running.core.clone(),
        fleet.clone(),
        revoked.clone(),
        hub_cfg,
        shutdown,
    ));
    let admin = admin::Admin {
        state: running.state.clone(),
        fleet: fleet.clone(),
        revoked,
        shared: shared_fleet,
        sessions: Arc::default(),
    };
    Ok(Started {
        quic_addr,
        fingerprint,
        fleet,
        running,
        http,
        admin,
    })
}

impl Started {
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// `https` with `[tls]`, else `http`.
    pub fn scheme(&self) -> &'static str {
        self.running.scheme()
    }

    /// Serves the client API until shutdown.
    pub async fn serve(self) -> Result<(), CloudError> {
        edge::serve_with(&self.running, self.http, admin::router(self.admin)).await?;
        Ok(())
    }
}
