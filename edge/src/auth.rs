//! Authentication and rights: JWTs (HS256 and EdDSA) for clients, hashed API keys for
//! backend services, one rights model for both.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::client::ErrorCode;
use shared::pattern::ChannelPattern;
use shared::ChannelName;

use crate::config::AuthConfig;

/// What a principal may do on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Subscribe,
    Publish,
    /// Write state keys (reading state needs `subscribe`).
    State,
    Presence,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::Subscribe,
        Action::Publish,
        Action::State,
        Action::Presence,
    ];
}

/// A grant: the actions allowed on channels matching a pattern.
///
/// Patterns: `*` matches every channel; `project:42` matches exactly; a pattern ending
/// in `*` matches by prefix (`project:42/*`, `project:*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Right {
    pub channels: String,
    pub actions: Vec<Action>,
}

impl Right {
    pub fn matches(&self, channel: &ChannelName) -> bool {
        let c = channel.as_str();
        match self.channels.strip_suffix('*') {
            Some(prefix) => c.starts_with(prefix),
            None => c == self.channels,
        }
    }

    /// Whether every channel `pattern` can match is one this grant matches: the grant
    /// is a prefix (or `*`) that the pattern's literal start begins with.
    pub fn covers_pattern(&self, pattern: &ChannelPattern) -> bool {
        self.channels
            .strip_suffix('*')
            .is_some_and(|prefix| pattern.prefix().starts_with(prefix))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.channels.is_empty() {
            return Err("a right needs a channel pattern".into());
        }
        if self.channels[..self.channels.len() - 1].contains('*') {
            return Err(format!(
                "pattern {:?}: '*' is only allowed at the end",
                self.channels
            ));
        }
        Ok(())
    }
}

/// Who is asking, and what they may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub rights: Vec<Right>,
    /// Unix seconds after which the credential is no longer valid.
    pub expires_at: Option<u64>,
}

impl Principal {
    pub fn allows(&self, channel: &ChannelName, action: Action) -> bool {
        self.rights
            .iter()
            .any(|r| r.actions.contains(&action) && r.matches(channel))
    }

    /// Fails with `TokenExpired` once the credential's expiry has passed.
    pub fn check_fresh(&self, now_secs: u64) -> Result<(), AuthError> {
        match self.expires_at {
            Some(exp) if now_secs > exp => Err(AuthError::new(
                ErrorCode::TokenExpired,
                "token expired; reconnect with a fresh token",
            )),
            _ => Ok(()),
        }
    }

    /// Checks the right and the expiry together.
    /// Fails unless a grant gives `action` on every channel `pattern` can match.
    pub fn require_pattern(
        &self,
        pattern: &ChannelPattern,
        action: Action,
        now_secs: u64,
    ) -> Result<(), AuthError> {
        self.check_fresh(now_secs)?;
        if self
            .rights
            .iter()
            .any(|r| r.actions.contains(&action) && r.covers_pattern(pattern))
        {
            return Ok(());
        }
        Err(AuthError::new(
            ErrorCode::Forbidden,
            format!(
                "{} may not subscribe to pattern {pattern}: no grant covers every channel it matches (a grant such as \"{}*\" does)",
                self.subject,
                pattern.prefix()
            ),
        ))
    }

    pub fn require(
        &self,
        channel: &ChannelName,
        action: Action,
        now_secs: u64,
    ) -> Result<(), AuthError> {
        self.check_fresh(now_secs)?;
        if self.allows(channel, action) {
            Ok(())
        } else {
            Err(AuthError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not {} on {channel}",
                    self.subject,
                    serde_json::to_value(action)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            ))
        }
    }
}

/// A refused credential or action, with its stable code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct AuthError {
    pub code: ErrorCode,
    pub message: String,
}

impl AuthError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The JWT claims Outpost reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default)]
    pub rights: Vec<Right>,
}

/// A key that verifies tokens of one algorithm (`kid`: the key id tokens name).
struct TokenKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// PEM text, or the path of a PEM file.
fn pem_text(v: &str, what: &str) -> Result<String, String> {
    if v.contains("-----BEGIN") {
        Ok(v.to_owned())
    } else {
        std::fs::read_to_string(v).map_err(|e| format!("{what}: cannot read {v}: {e}"))
    }
}

impl TokenKey {
    fn new(cfg: &crate::config::JwtKeyConfig) -> Result<Self, String> {
        use std::str::FromStr;
        let what = format!("auth.jwt_keys ({})", cfg.kid.as_deref().unwrap_or("no kid"));
        let alg = Algorithm::from_str(&cfg.alg)
            .map_err(|_| format!("{what}: unknown alg {:?}", cfg.alg))?;
        let bad = |e: jsonwebtoken::errors::Error| format!("{what}: not a {:?} key: {e}", alg);
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if cfg.key.len() < 32 {
                    return Err(format!("{what}: an HS secret needs at least 32 characters"));
                }
                DecodingKey::from_secret(cfg.key.as_bytes())
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                DecodingKey::from_rsa_pem(pem_text(&cfg.key, &what)?.as_bytes()).map_err(bad)?
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                DecodingKey::from_ec_pem(pem_text(&cfg.key, &what)?.as_bytes()).map_err(bad)?
            }
            Algorithm::EdDSA => {
                DecodingKey::from_ed_pem(pem_text(&cfg.key, &what)?.as_bytes()).map_err(bad)?
            }
        };
        Ok(Self {
            kid: cfg.kid.clone(),
            alg,
            key,
        })
    }
}

impl TokenKey {
    /// A key of a JWKS document; `None` for keys not meant for signatures or whose
    /// algorithm cannot be told or is not supported.
    fn from_jwk(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Self> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, PublicKeyUse};
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return None;
        }
        let alg = match jwk.common.key_algorithm {
            Some(a) => {
                use std::str::FromStr;
                // The JWK `alg` names the same algorithms as a token header's.
                let name = serde_json::to_value(a).ok()?;
                Algorithm::from_str(name.as_str()?).ok()?
            }
            // Providers often leave `alg` out: the key type tells the usual one.
            None => match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return None,
                },
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                AlgorithmParameters::OctetKey(_) => return None,
            },
        };
        Some(Self {
            kid: jwk.common.key_id.clone(),
            alg,
            key: DecodingKey::from_jwk(jwk).ok()?,
        })
    }
}

/// Verifies tokens and API keys.
pub struct Authenticator {
    /// Every token key from config: `hs256_secret`, `ed25519_public_key`, `jwt_keys`.
    keys: Vec<TokenKey>,
    /// The keys of the last JWKS document fetched (`crate::jwks`).
    jwks: std::sync::RwLock<Vec<TokenKey>>,
    /// Set when a JWKS URL is configured: a token with an unknown `kid` asks for a
    /// refresh.
    jwks_configured: bool,
    pub jwks_wanted: tokio::sync::Notify,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
    anonymous: Option<Vec<Right>>,
    /// SHA-256 of the key -> (name, rights, expiry in Unix seconds).
    api_keys: HashMap<[u8; 32], (String, Vec<Right>, Option<u64>)>,
    operator_keys: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("token_keys", &self.keys.len())
            .field("api_keys", &self.api_keys.len())
            .finish()
    }
}

/// Prefix that marks an API key (as opposed to a JWT).
pub const API_KEY_PREFIX: &str = "opk_";

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        let mut keys = Vec::new();
        if let Some(s) = &cfg.hs256_secret {
            keys.push(TokenKey {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(s.as_bytes()),
            });
        }
        if let Some(v) = &cfg.ed25519_public_key {
            let pem = pem_text(v, "auth.ed25519_public_key")?;
            keys.push(TokenKey {
                kid: None,
                alg: Algorithm::EdDSA,
                key: DecodingKey::from_ed_pem(pem.as_bytes())
                    .map_err(|e| format!("auth.ed25519_public_key: {e}"))?,
            });
        }
        for k in &cfg.jwt_keys {
            keys.push(TokenKey::new(k)?);
        }
        let mut api_keys = HashMap::new();
        for k in &cfg.api_keys {
            let bytes = hex::decode(&k.sha256)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("auth.api_keys.{}: sha256 must be 64 hex digits", k.name))?;
            api_keys.insert(bytes, (k.name.clone(), k.rights.clone(), k.expires_at));
        }
        let mut operator_keys = HashMap::new();
        for k in &cfg.operator_keys {
            let bytes = hex::decode(&k.sha256)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    format!(
                        "auth.operator_keys.{}: sha256 must be 64 hex digits",
                        k.name
                    )
                })?;
            operator_keys.insert(bytes, k.name.clone());
        }
        Ok(Self {
            keys,
            jwks: std::sync::RwLock::new(Vec::new()),
            jwks_configured: cfg.jwks_url.is_some(),
            jwks_wanted: tokio::sync::Notify::new(),
            audience: cfg.audience.clone(),
            issuer: cfg.issuer.clone(),
            leeway: cfg.leeway_secs,
            anonymous: cfg.allow_anonymous.then(|| cfg.anonymous_rights.clone()),
            api_keys,
            operator_keys,
        })
    }

    /// Replaces the JWKS keys; returns (keys used, keys skipped).
    pub fn set_jwks(&self, set: &jsonwebtoken::jwk::JwkSet) -> (usize, usize) {
        let keys: Vec<TokenKey> = set.keys.iter().filter_map(TokenKey::from_jwk).collect();
        let n = keys.len();
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = keys;
        (n, set.keys.len() - n)
    }

    /// Verifies a credential: an API key (`opk_...`), a JWT, or none (anonymous, when
    /// allowed).
    pub fn verify(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        match credential.map(str::trim).filter(|c| !c.is_empty()) {
            None => match &self.anonymous {
                Some(rights) => Ok(Principal {
                    subject: "anonymous".into(),
                    rights: rights.clone(),
                    expires_at: None,
                }),
                None => Err(AuthError::new(
                    ErrorCode::Unauthorized,
                    "a token is required (connect with {\"type\":\"connect\",\"token\":...}, ?token= or Authorization: Bearer)",
                )),
            },
            Some(c) if c.starts_with(API_KEY_PREFIX) => self.verify_api_key(c),
            Some(c) => self.verify_jwt(c),
        }
    }

    /// Verifies an operator key; returns the operator's name.
    pub fn verify_operator(&self, credential: Option<&str>) -> Result<String, AuthError> {
        let key = credential
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                AuthError::new(ErrorCode::Unauthorized, "an operator key is required")
            })?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.operator_keys
            .get(&digest)
            .cloned()
            .ok_or_else(|| AuthError::new(ErrorCode::Unauthorized, "unknown operator key"))
    }

    fn verify_api_key(&self, key: &str) -> Result<Principal, AuthError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        match self.api_keys.get(&digest) {
            Some((name, rights, expires_at)) => {
                let p = Principal {
                    subject: format!("apikey:{name}"),
                    rights: rights.clone(),
                    expires_at: *expires_at,
                };
                p.check_fresh(crate::core::now_ms() / 1000)?;
                Ok(p)
            }
            None => Err(AuthError::new(ErrorCode::Unauthorized, "unknown API key")),
        }
    }

    fn verify_jwt(&self, token: &str) -> Result<Principal, AuthError> {
        let unauthorized = |m: String| AuthError::new(ErrorCode::Unauthorized, m);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthorized(format!("malformed token: {e}")))?;
        // A key verifies tokens of its own algorithm only (no HS/RS confusion, no
        // `none`); among those, the token's `kid` picks the key, and a token without a
        // known `kid` is tried against the keys configured without one.
        let jwks = self.jwks.read().unwrap_or_else(|p| p.into_inner());
        if self.jwks_configured {
            if let Some(kid) = &header.kid {
                if !self
                    .keys
                    .iter()
                    .chain(jwks.iter())
                    .any(|k| k.kid.as_deref() == Some(kid))
                {
                    // A provider may have rotated: fetch its keys again soon.
                    self.jwks_wanted.notify_one();
                }
            }
        }
        let same_alg: Vec<&TokenKey> = self
            .keys
            .iter()
            .chain(jwks.iter())
            .filter(|k| k.alg == header.alg)
            .collect();
        if same_alg.is_empty() {
            return Err(unauthorized(format!(
                "token algorithm {:?} is not configured on this server",
                header.alg
            )));
        }
        let named: Vec<&TokenKey> = match &header.kid {
            Some(kid) => same_alg
                .iter()
                .copied()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            None => Vec::new(),
        };
        let candidates: Vec<&TokenKey> = if !named.is_empty() {
            named
        } else if header.kid.is_some() {
            same_alg.into_iter().filter(|k| k.kid.is_none()).collect()
        } else {
            same_alg
        };
        if candidates.is_empty() {
            return Err(unauthorized(format!(
                "token key id {:?} is not configured on this server for {:?}",
                header.kid.unwrap_or_default(),
                header.alg
            )));
        }
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        // A configured audience or issuer must be present, not merely match when
        // present: a token minted for another service without `aud` is refused.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        // Several candidates (keys without a `kid`): the first whose signature
        // verifies decides.
        let mut result = None;
        for k in &candidates {
            let r = jsonwebtoken::decode::<Claims>(token, &k.key, &v);
            let bad_signature = matches!(&r, Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature);
            result = Some(r);
            if !bad_signature {
                break;
            }
        }
        let Some(result) = result else {
            return Err(unauthorized("no key to verify the token".into()));
        };
        let data = result.map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => {
                    AuthError::new(ErrorCode::TokenExpired, "token expired")
                }
                ErrorKind::ImmatureSignature => {
                    AuthError::new(ErrorCode::TokenExpired, "token not valid yet (nbf)")
                }
                ErrorKind::InvalidAudience => unauthorized("token audience is not accepted".into()),
                ErrorKind::InvalidIssuer => unauthorized("token issuer is not accepted".into()),
                ErrorKind::InvalidSignature => {
                    unauthorized("token signature does not verify".into())
                }
                _ => unauthorized(format!("invalid token: {e}")),
            }
        })?;
        for r in &data.claims.rights {
            r.validate()
                .map_err(|e| unauthorized(format!("token rights: {e}")))?;
        }
        Ok(Principal {
            subject: data.claims.sub,
            rights: data.claims.rights,
            expires_at: Some(data.claims.exp),
        })
    }
}

/// Signs an HS256 token (dev tokens, tests, `gentoken`).
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, String> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// The SHA-256 (hex) of an API key, as `auth.api_keys[].sha256` wants it.
pub fn api_key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            hs256_secret: Some(SECRET.into()),
            api_keys: vec![
                crate::config::ApiKeyConfig {
                    name: "ingest".into(),
                    sha256: api_key_hash("opk_test"),
                    rights: vec![Right {
                        channels: "project:1*".into(),
                        actions: vec![Action::Publish],
                    }],
                    expires_at: None,
                },
                crate::config::ApiKeyConfig {
                    name: "old".into(),
                    sha256: api_key_hash("opk_old"),
                    rights: vec![],
                    expires_at: Some(1_000),
                },
                crate::config::ApiKeyConfig {
                    name: "until".into(),
                    sha256: api_key_hash("opk_until"),
                    rights: vec![],
                    expires_at: Some(now() + 3600),
                },
            ],
            ..AuthConfig::default()
        })
        .expect("auth")
    }

    fn claims(exp: u64, rights: Vec<Right>) -> Claims {
        Claims {
            sub: "u1".into(),
            exp,
            nbf: None,
            aud: None,
            iss: None,
            rights,
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[test]
    fn rights_and_codes() {
        let a = auth();
        let ch = |s: &str| ChannelName::new(s).expect("valid");
        let r = vec![Right {
            channels: "project:42*".into(),
            actions: vec![Action::Subscribe],
        }];
        let t = mint_hs256(SECRET, &claims(now() + 60, r)).expect("mint");
        let p = a.verify(Some(&t)).expect("valid");
        assert!(p.allows(&ch("project:42/canvas"), Action::Subscribe));
        assert!(!p.allows(&ch("project:42"), Action::Publish));
        assert!(!p.allows(&ch("project:7"), Action::Subscribe));
        let old = mint_hs256(SECRET, &claims(now() - 3600, vec![])).expect("mint");
        assert_eq!(
            a.verify(Some(&old)).map_err(|e| e.code),
            Err(ErrorCode::TokenExpired)
        );
        let wrong = mint_hs256(
            "another secret of at least 32 chars!!",
            &claims(now() + 60, vec![]),
        )
        .expect("mint");
        assert_eq!(
            a.verify(Some(&wrong)).map_err(|e| e.code),
            Err(ErrorCode::Unauthorized)
        );
        assert_eq!(
            a.verify(None).map_err(|e| e.code),
            Err(ErrorCode::Unauthorized)
        );
        assert_eq!(
            a.verify(Some("opk_nope")).map_err(|e| e.code),
            Err(ErrorCode::Unauthorized)
        );
        let k = a.verify(Some("opk_test")).expect("api key");
        assert!(k.allows(&ch("project:1"), Action::Publish));
        assert!(!k.allows(&ch("project:2"), Action::Publish));
        // alg: none is refused.
        let none = format!(
            "{}.{}.",
            base64url(r#"{"alg":"none","typ":"JWT"}"#),
            base64url(&format!(r#"{{"sub":"x","exp":{}}}"#, now() + 60))
        );
        assert_eq!(
            a.verify(Some(&none)).map_err(|e| e.code),
            Err(ErrorCode::Unauthorized)
        );
    }

    fn base64url(s: &str) -> String {
        use std::fmt::Write;
        // Minimal base64url for the test, without padding.
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, &x| (acc << 8) | x as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                let _ = out.write_char(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn an_api_key_past_its_expiry_is_refused_and_one_before_carries_it() {
        let a = auth();
        let e = a.verify(Some("opk_old")).err().map(|e| e.code);
        assert_eq!(e, Some(ErrorCode::TokenExpired));
        let p = a
            .verify(Some("opk_until"))
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert!(p.expires_at.is_some_and(|t| t > now()));
        let p = a
            .verify(Some("opk_test"))
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(p.expires_at, None);
    }
}
