//! TLS on the client listener (`[tls]`): HTTPS and WSS for browsers and services,
//! HTTP/2 by ALPN (SSE streams of one page share a connection instead of HTTP/1.1's
//! six per origin), and certificates renewed without a restart — on SIGHUP, and when
//! the files change (checked every `reload_secs`). A reload that fails keeps the
//! certificate in use and says why; open connections keep theirs.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::link::tls::{provider, Identity, TlsError};

/// The certificate new handshakes get; swapped whole on a reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The listener's TLS: the acceptor the accept loop wraps sockets in.
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    cfg: TlsConfig,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("cfg", &self.cfg).finish()
    }
}

fn certified(cfg: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let id = Identity::load(&cfg.cert, &cfg.key)?;
    let key = provider()
        .key_provider
        .load_private_key(id.key)
        .map_err(|e| TlsError::Config(format!("{}: {e}", cfg.key.display())))?;
    let ck = CertifiedKey::new(id.chain, key);
    ck.keys_match().map_err(|e| {
        TlsError::Config(format!(
            "{} and {} do not belong together: {e}",
            cfg.cert.display(),
            cfg.key.display()
        ))
    })?;
    Ok(ck)
}

impl ClientTls {
    /// Loads the certificate and key (a clear error if either is unusable).
    pub fn new(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let current = Arc::new(Current(RwLock::new(Arc::new(certified(cfg)?))));
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            current,
            cfg: cfg.clone(),
        })
    }

    /// Loads the files again; on success new handshakes get the new certificate.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = certified(&self.cfg)?;
        *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        Ok(())
    }

    fn stamp(&self) -> Vec<Option<SystemTime>> {
        [&self.cfg.cert, &self.cfg.key]
            .iter()
            .map(|p: &&PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Reloads on SIGHUP and when the files' modification times change, until
    /// `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: certificates reload on file changes only");
                None
            }
        };
        let every = Duration::from_secs(self.cfg.reload_secs.max(1));
        let mut seen = self.stamp();
        loop {
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                _ = tokio::time::sleep(every), if self.cfg.reload_secs > 0 => {
                    let now = self.stamp();
                    if now == seen {
                        continue;
                    }
                    "the files changed"
                }
            };
            seen = self.stamp();
            match self.reload() {
                Ok(()) => {
                    metrics::counter!("outpost_tls_reloads_total", "result" => "ok").increment(1);
                    tracing::info!(cert = %self.cfg.cert.display(), why, "TLS certificate reloaded");
                }
                Err(e) => {
                    metrics::counter!("outpost_tls_reloads_total", "result" => "failed")
                        .increment(1);
                    tracing::error!(error = %e, why, "TLS certificate not reloaded; keeping the one in use");
                }
            }
        }
    }
}
