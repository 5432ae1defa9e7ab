//! The client protocol parser (WebSocket / WebRTC messages).
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::client::ClientMsg;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(msg) = serde_json::from_str::<ClientMsg>(text) {
            let again = serde_json::to_string(&msg).expect("serializes");
            let _: ClientMsg = serde_json::from_str(&again).expect("round trip");
        }
    }
});
