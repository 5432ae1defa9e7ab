//! The edge <-> cloud frame decoder: any bytes must decode or fail, never panic, and a
//! decoded frame must re-encode to a frame that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::wire::{self, Versioned};

fuzz_target!(|data: &[u8]| {
    if let Ok((Versioned::V1(frame), used)) = wire::decode(data, wire::DEFAULT_MAX_FRAME) {
        assert!(used <= data.len());
        if let Ok(again) = wire::encode_to_vec(&frame, wire::DEFAULT_MAX_FRAME) {
            let (Versioned::V1(back), _) =
                wire::decode(&again, wire::DEFAULT_MAX_FRAME).expect("re-encoded frame decodes");
            assert_eq!(back, frame);
        }
    }
});
