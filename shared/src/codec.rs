//! The one place that knows Outpost's binary encoding: bincode 2 (standard config,
//! varint integers) through serde, with a hard size limit on decoding. Storage and the
//! wire both go through here.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Nothing decoded may claim more than this many bytes.
pub const DECODE_LIMIT: usize = 64 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Bytes that are not a valid encoding of the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(String),
    #[error("decode: {0}")]
    Decode(String),
    #[error("decode: {0} trailing bytes")]
    Trailing(usize),
}

pub fn to_bytes<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(v, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Appends the encoding of `v` to `out`.
pub fn write_into<T: Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(v, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes exactly one value from all of `bytes`.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (v, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(v)
}
