//! Resume-token decoding: anything decodes or fails cleanly; what decodes re-encodes
//! to the same token.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::token;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(vv) = token::decode(text) {
            assert_eq!(token::decode(&token::encode(&vv)), Ok(vv));
        }
    }
});
