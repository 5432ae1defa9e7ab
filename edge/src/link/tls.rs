//! TLS for the edge <-> cloud link: always on. Dev mode makes a self-signed certificate
//! (kept in the cloud's data dir) that edges pin by SHA-256; production loads a
//! certificate and key, and edges verify it against a CA bundle.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{HubConfig, UplinkConfig};

/// Files in a data dir that the link keeps: the dev certificate and key (edges pin
/// the certificate) and the stateless-reset key. A backup carries them.
pub const DEV_CERT_FILE: &str = "hub-cert.pem";
pub const DEV_KEY_FILE: &str = "hub-key.pem";
pub const RESET_KEY_FILE: &str = "quic-reset-key";

/// ALPN protocol id of the link.
pub const ALPN: &[u8] = b"outpost/1";

/// A TLS setup problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{0}")]
    Config(String),
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 (hex) of a certificate, as edges pin it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn fingerprint(&self) -> String {
        self.chain.first().map(fingerprint).unwrap_or_default()
    }

    /// Loads PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(TlsError::Config(format!(
                "{}: no certificate",
                cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))?;
        Ok(Self { chain, key })
    }

    /// The dev certificate in `dir` (`hub-cert.pem`, `hub-key.pem`), made on first use.
    pub fn dev(dir: &Path, names: &[String]) -> Result<Self, TlsError> {
        let (cert, key) = (dir.join(DEV_CERT_FILE), dir.join(DEV_KEY_FILE));
        if cert.exists() && key.exists() {
            return Self::load(&cert, &key);
        }
        let ck = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| TlsError::Config(format!("generating the dev certificate: {e}")))?;
        std::fs::create_dir_all(dir).map_err(|err| TlsError::Io {
            what: dir.display().to_string(),
            err,
        })?;
        std::fs::write(&cert, ck.cert.pem()).map_err(|err| TlsError::Io {
            what: cert.display().to_string(),
            err,
        })?;
        std::fs::write(&key, ck.signing_key.serialize_pem()).map_err(|err| TlsError::Io {
            what: key.display().to_string(),
            err,
        })?;
        Self::load(&cert, &key)
    }
}

fn transport(keepalive_ms: u64, idle_ms: u64) -> Result<Arc<quinn::TransportConfig>, TlsError> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(keepalive_ms)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(idle_ms))
            .map_err(|e| TlsError::Config(format!("idle timeout: {e}")))?,
    ));
    // Two streams per link (control, data), opened by the edge.
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    Ok(Arc::new(t))
}

/// The cloud's QUIC server configuration.
pub fn server_config(id: Identity, cfg: &HubConfig) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.chain, id.key)
        .map_err(|e| TlsError::Config(format!("hub certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(transport(cfg.keepalive_ms, cfg.idle_timeout_ms)?);
    Ok(sc)
}

/// The edge's QUIC client configuration: pinned fingerprint or CA bundle.
pub fn client_config(cfg: &UplinkConfig) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = match (&cfg.pin_sha256, &cfg.ca) {
        (Some(pin), _) => {
            let pin = hex::decode(pin)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| TlsError::Config("uplink.pin_sha256: 64 hex digits".into()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin,
                    provider: provider(),
                }))
                .with_no_client_auth()
        }
        (None, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?
            {
                let cert = cert.map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => {
            return Err(TlsError::Config(
                "uplink needs ca or pin_sha256 to verify the cloud".into(),
            ))
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(transport(cfg.keepalive_ms, cfg.idle_timeout_ms)?);
    Ok(cc)
}

/// Accepts exactly the certificate whose SHA-256 is pinned (and checks the handshake
/// signatures with it).
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the cloud's certificate {} does not match the pinned fingerprint",
                hex::encode(got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Endpoint settings with a stateless-reset key kept in `data_dir`, so that after a
/// restart this node answers packets of its old connections with a valid reset and the
/// peer notices at its next packet (at most one keep-alive interval) instead of
/// waiting for its idle timeout.
pub fn endpoint_config(data_dir: &Path) -> Result<quinn::EndpointConfig, TlsError> {
    let path = data_dir.join(RESET_KEY_FILE);
    let key = match std::fs::read(&path) {
        Ok(k) if k.len() == 32 => k,
        _ => {
            let mut k = vec![0u8; 32];
            for chunk in k.chunks_mut(8) {
                let r = getrandom::u64().map_err(|e| TlsError::Config(e.to_string()))?;
                chunk.copy_from_slice(&r.to_le_bytes());
            }
            std::fs::create_dir_all(data_dir).map_err(|err| TlsError::Io {
                what: data_dir.display().to_string(),
                err,
            })?;
            std::fs::write(&path, &k).map_err(|err| TlsError::Io {
                what: path.display().to_string(),
                err,
            })?;
            k
        }
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    // Connection ids are checked against a key before a reset is sent: quinn's
    // default draws that key at random per process, so a restarted node dropped the
    // old connection's packets as "invalid CID" and the peer waited for its idle
    // timeout. Derive it from the kept key instead.
    let tag = ring::hmac::sign(&reset, b"outpost connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(reset));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(cfg)
}

/// A UDP socket with large buffers, for a quinn endpoint.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}
