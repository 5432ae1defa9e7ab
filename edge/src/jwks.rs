//! Token keys from an identity provider's JWKS document (`[auth] jwks_url`): fetched at
//! start and every `jwks_refresh_secs`, and soon after a token names a `kid` nobody
//! knows (a provider rotated). A fetch that fails keeps the keys of the last one that
//! worked, and says why (log, `outpost_jwks_refreshes_total{result}`); tokens signed
//! with keys from config (`[[auth.jwt_keys]]`) never depend on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::JwkSet;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;

/// A JWKS document larger than this is refused.
const MAX_BYTES: usize = 1 << 20;
/// One fetch (connect, TLS, request, body) must finish within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Fetches asked by unknown `kid`s are at least this far apart.
const MIN_GAP: Duration = Duration::from_secs(5);

/// `GET url` (http or https, system roots), the body if the answer is 200.
async fn get(url: &str) -> Result<Bytes, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url}: only http and https URLs")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, &host)
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "outpost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let res = if https {
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| format!("{url}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(client_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        send(hyper_util::rt::TokioIo::new(tls), req).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await
    }
    .map_err(|e| format!("{url}: {e}"))?;
    if res.status() != hyper::StatusCode::OK {
        return Err(format!("{url}: HTTP {}", res.status()));
    }
    let body = Limited::new(res.into_body(), MAX_BYTES)
        .collect()
        .await
        .map_err(|e| format!("{url}: body: {e}"))?;
    Ok(body.to_bytes())
}

/// The TLS client setup with the system's roots, read once per process (not at every
/// refresh).
fn client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let cfg = rustls::ClientConfig::builder_with_provider(crate::link::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(cfg))
        })
        .clone()
}

async fn send<I>(
    io: I,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// Fetches and parses the JWKS document.
pub async fn fetch(url: &str) -> Result<JwkSet, String> {
    let body = tokio::time::timeout(FETCH_TIMEOUT, get(url))
        .await
        .map_err(|_| format!("{url}: no answer within {FETCH_TIMEOUT:?}"))??;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not a JWKS document: {e}"))
}

/// Keeps `auth`'s JWKS keys fresh until `shutdown`.
pub async fn refresh(
    auth: Arc<Authenticator>,
    url: String,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut last: Option<Instant> = None;
    loop {
        if let Some(t) = last {
            let gap = MIN_GAP.saturating_sub(t.elapsed());
            if !gap.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(gap) => {}
                }
            }
        }
        last = Some(Instant::now());
        match fetch(&url).await {
            Ok(set) => {
                let (n, skipped) = auth.set_jwks(&set);
                metrics::counter!("outpost_jwks_refreshes_total", "result" => "ok").increment(1);
                tracing::info!(%url, keys = n, skipped, "JWKS keys loaded");
            }
            Err(e) => {
                metrics::counter!("outpost_jwks_refreshes_total", "result" => "failed")
                    .increment(1);
                tracing::warn!(error = %e, "JWKS not refreshed; the keys of the last good fetch stay in use");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = auth.jwks_wanted.notified() => {}
        }
    }
}
