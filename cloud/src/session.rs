//! Dashboard sessions: the dashboard trades the operator key for an opaque session id
//! in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` over TLS), so the page keeps no
//! key (not in `localStorage`, where a script could read it) and sends none in URLs
//! (where proxies and histories log them). `SameSite=Strict` keeps other sites from
//! using the cookie for the operator's POSTs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

/// The cookie's name.
pub const COOKIE: &str = "outpost_session";
/// How long a session lasts (then the dashboard asks for the key again).
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; the oldest go first.
const MAX: usize = 1024;

/// Open sessions: id -> (operator name, expiry).
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<String, (String, Instant)>>);

impl Sessions {
    /// Opens a session for `operator`; returns the `Set-Cookie` value.
    pub fn open(&self, operator: &str, secure: bool) -> Option<String> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).ok()?;
        let id = hex::encode(raw);
        let now = Instant::now();
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|_, (_, until)| *until > now);
        if g.len() >= MAX {
            if let Some(oldest) = g
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                g.remove(&oldest);
            }
        }
        g.insert(id.clone(), (operator.to_owned(), now + TTL));
        Some(format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            TTL.as_secs(),
            if secure { "; Secure" } else { "" }
        ))
    }

    /// The operator whose live session the request's cookie names.
    pub fn operator(&self, headers: &HeaderMap) -> Option<String> {
        let id = cookie(headers)?;
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&id)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(who, _)| who.clone())
    }

    /// Ends the request's session; returns the `Set-Cookie` value that clears it.
    pub fn close(&self, headers: &HeaderMap) -> String {
        if let Some(id) = cookie(headers) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, v.parse().unwrap_or_else(|e| panic!("{e}")));
        h
    }

    #[test]
    fn a_session_names_its_operator_until_closed() {
        let s = Sessions::default();
        let set = s.open("ops", true).unwrap_or_else(|| panic!("no session"));
        assert!(
            set.contains("HttpOnly")
                && set.contains("SameSite=Strict")
                && set.ends_with("; Secure")
        );
        let id = set
            .split(';')
            .next()
            .and_then(|kv| kv.split_once('='))
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        assert_eq!(id.len(), 64);
        let h = with_cookie(&format!("other=1; {COOKIE}={id}"));
        assert_eq!(s.operator(&h).as_deref(), Some("ops"));
        assert_eq!(s.operator(&with_cookie(&format!("{COOKIE}=forged"))), None);
        assert_eq!(s.operator(&HeaderMap::new()), None);
        assert!(s.close(&h).contains("Max-Age=0"));
        assert_eq!(s.operator(&h), None);
    }
}
