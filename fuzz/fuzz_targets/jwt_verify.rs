//! Credential verification (JWTs and API keys) on arbitrary input: never panics and
//! never accepts a token not signed with the configured secret.
#![no_main]
use edge::auth::Authenticator;
use edge::config::AuthConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static AUTH: Authenticator = Authenticator::new(&AuthConfig {
            hs256_secret: Some("fuzz-secret-0123456789abcdef-0123".into()),
            ..AuthConfig::default()
        })
        .expect("auth config");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        AUTH.with(|a| {
            assert!(
                a.verify(Some(text)).is_err(),
                "accepted a forged credential: {text}"
            );
        });
    }
});
