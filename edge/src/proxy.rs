//! The client's address behind reverse proxies (`limits.trusted_proxies`). A request
//! from a trusted proxy names its client in `X-Forwarded-For` (or RFC 7239
//! `Forwarded: for=`); the address used for per-IP limits and logs is the nearest one
//! in that chain that is not itself a trusted proxy. From anyone else the headers are
//! ignored: a client cannot choose the address it is limited by.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

/// A network: `10.0.0.0/8`, `2001:db8::/32`, or one address (`127.0.0.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (e.g. 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for Network {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        n.to_string()
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The addresses a request's proxy headers list, nearest client first (`X-Forwarded-For`
/// entries, or else `Forwarded: for=`), in the order they were added.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| parse_host(s.trim()))
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|elem| {
            elem.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                k.eq_ignore_ascii_case("for")
                    .then(|| parse_host(v.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:80`, `2001:db8::1`.
fn parse_host(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

/// The client's address: `peer` unless it is a trusted proxy, else the nearest address
/// in its forwarding chain that is not a trusted proxy (an entry that does not parse
/// ends the walk at the hop that added it).
pub fn client_addr(peer: SocketAddr, headers: &HeaderMap, trusted: &[Network]) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(peer.ip()) {
        return peer;
    }
    let mut client = peer.ip();
    for hop in forwarded_chain(headers).into_iter().rev() {
        let Some(ip) = hop else { break };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    SocketAddr::new(client, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<Network> {
        s.iter()
            .map(|n| n.parse().unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
                v.parse().unwrap_or_else(|e| panic!("{e}")),
            );
        }
        h
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap_or_else(|e| panic!("{e}")), 4000)
    }

    #[test]
    fn networks_parse_and_match() {
        let n: Network = "10.0.0.0/8".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(n.contains("10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(!n.contains("11.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))));
        let one: Network = "127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.to_string(), "127.0.0.1/32");
        let v6: Network = "2001:db8::/32".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(v6.contains("2001:db8:1::5".parse().unwrap_or_else(|e| panic!("{e}"))));
        let all: Network = "0.0.0.0/0".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(all.contains("8.8.8.8".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("proxy".parse::<Network>().is_err());
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let trusted = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7, 10.0.0.2")]);
        // From a trusted proxy: walk back past trusted hops to the first other one.
        assert_eq!(
            client_addr(peer("127.0.0.1"), &xff, &trusted)
                .ip()
                .to_string(),
            "198.51.100.7"
        );
        // From anyone else: the header is ignored.
        assert_eq!(
            client_addr(peer("192.0.2.1"), &xff, &trusted),
            peer("192.0.2.1")
        );
        // Nothing trusted: ignored.
        assert_eq!(client_addr(peer("127.0.0.1"), &xff, &[]), peer("127.0.0.1"));
        // Several headers are one list; RFC 7239 when there is no X-Forwarded-For.
        let two = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.0.0.3"),
        ]);
        assert_eq!(
            client_addr(peer("127.0.0.1"), &two, &trusted)
                .ip()
                .to_string(),
            "203.0.113.9"
        );
        let fwd = headers(&[(
            "forwarded",
            "for=\"[2001:db8::7]:4711\";proto=https, for=10.0.0.4",
        )]);
        assert_eq!(
            client_addr(peer("127.0.0.1"), &fwd, &trusted)
                .ip()
                .to_string(),
            "2001:db8::7"
        );
        // A garbled entry ends the walk at the proxy that added it.
        let bad = headers(&[("x-forwarded-for", "203.0.113.9, junk, 10.0.0.5")]);
        assert_eq!(
            client_addr(peer("127.0.0.1"), &bad, &trusted)
                .ip()
                .to_string(),
            "10.0.0.5"
        );
        // Only trusted hops: the farthest one.
        let inner = headers(&[("x-forwarded-for", "10.0.0.6")]);
        assert_eq!(
            client_addr(peer("127.0.0.1"), &inner, &trusted)
                .ip()
                .to_string(),
            "10.0.0.6"
        );
    }
}
