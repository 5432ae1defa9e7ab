//! Resume tokens: a compact, URL-safe, versioned encoding of a version vector.
//!
//! Layout (before base64url without padding): a version byte (`1`), then a LEB128
//! count of entries, then per entry the LEB128 replica id and LEB128 seq, replica ids
//! strictly increasing and seqs non-zero. The same token is valid on every edge and on
//! the cloud, because it names positions in per-origin logs, not positions in one
//! server's log.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::ids::ReplicaId;
use crate::vv::VersionVector;

/// Version byte of the current token layout.
pub const TOKEN_VERSION: u8 = 1;
/// Longest token accepted, in characters.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Most entries a token may carry.
pub const MAX_TOKEN_ENTRIES: usize = 256;

/// Why a string is not a valid resume token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("resume token is empty")]
    Empty,
    #[error("resume token is {0} characters long; the limit is {MAX_TOKEN_LEN}")]
    TooLong(usize),
    #[error("resume token is not base64url")]
    NotBase64,
    #[error("resume token version {0} is not supported (this server speaks {TOKEN_VERSION})")]
    UnsupportedVersion(u8),
    #[error("resume token is truncated")]
    Truncated,
    #[error("resume token has {0} entries; the limit is {MAX_TOKEN_ENTRIES}")]
    TooManyEntries(u64),
    #[error("resume token has a varint that overflows 64 bits")]
    Overflow,
    #[error("resume token entries are not in strictly increasing replica order")]
    Unordered,
    #[error("resume token has a zero replica id or a zero seq")]
    Zero,
    #[error("resume token has {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes a version vector as a resume token.
pub fn encode(vv: &VersionVector) -> String {
    let mut buf = Vec::with_capacity(2 + vv.len() * 12);
    buf.push(TOKEN_VERSION);
    put_varint(&mut buf, vv.len() as u64);
    for (r, s) in vv.iter() {
        put_varint(&mut buf, r.get());
        put_varint(&mut buf, s);
    }
    URL_SAFE_NO_PAD.encode(buf)
}

/// Decodes a resume token, rejecting anything not produced by [`encode`].
pub fn decode(token: &str) -> Result<VersionVector, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong(token.len()));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| TokenError::NotBase64)?;
    let (&version, mut rest) = bytes.split_first().ok_or(TokenError::Truncated)?;
    if version != TOKEN_VERSION {
        return Err(TokenError::UnsupportedVersion(version));
    }
    let count = take_varint(&mut rest)?;
    if count > MAX_TOKEN_ENTRIES as u64 {
        return Err(TokenError::TooManyEntries(count));
    }
    let mut vv = VersionVector::new();
    let mut last = 0u64;
    for _ in 0..count {
        let raw = take_varint(&mut rest)?;
        let seq = take_varint(&mut rest)?;
        if raw <= last && last != 0 {
            return Err(TokenError::Unordered);
        }
        let r = ReplicaId::new(raw).ok_or(TokenError::Zero)?;
        if seq == 0 {
            return Err(TokenError::Zero);
        }
        vv.set(r, seq);
        last = raw;
    }
    if !rest.is_empty() {
        return Err(TokenError::Trailing(rest.len()));
    }
    Ok(vv)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, TokenError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first().ok_or(TokenError::Truncated)?;
        *input = rest;
        let bits = u64::from(b & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(TokenError::Overflow);
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(TokenError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: u64) -> ReplicaId {
        ReplicaId::new(n).expect("non-zero")
    }

    #[test]
    fn round_trip_and_errors() {
        let vv: VersionVector = [(r(1), 5), (r(u64::MAX), u64::MAX)].into_iter().collect();
        let t = encode(&vv);
        assert!(t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(decode(&t), Ok(vv));
        assert_eq!(
            decode(&encode(&VersionVector::new())),
            Ok(VersionVector::new())
        );
        assert_eq!(decode(""), Err(TokenError::Empty));
        assert_eq!(decode("!!"), Err(TokenError::NotBase64));
        assert_eq!(decode("Ag"), Err(TokenError::UnsupportedVersion(2)));
        assert_eq!(decode("AQ"), Err(TokenError::Truncated));
        // version 1, count 2, (2,1), (1,1): unordered
        let bad = URL_SAFE_NO_PAD.encode([1u8, 2, 2, 1, 1, 1]);
        assert_eq!(decode(&bad), Err(TokenError::Unordered));
        let zero = URL_SAFE_NO_PAD.encode([1u8, 1, 0, 1]);
        assert_eq!(decode(&zero), Err(TokenError::Zero));
        let trailing = URL_SAFE_NO_PAD.encode([1u8, 0, 9]);
        assert_eq!(decode(&trailing), Err(TokenError::Trailing(1)));
        let overflow = URL_SAFE_NO_PAD.encode([
            1u8, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 1,
        ]);
        assert_eq!(decode(&overflow), Err(TokenError::Overflow));
        assert_eq!(decode(&"A".repeat(5000)), Err(TokenError::TooLong(5000)));
    }
}
