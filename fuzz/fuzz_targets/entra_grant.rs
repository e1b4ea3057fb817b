//! The Entra ID token endpoint's answers (Azure OpenAI's credentials): a granted token is always
//! one that can be sent in a header, with a lifetime within a day; anything else is a classified
//! failure, never a panic, and a refusal never asks for a retry while the endpoint is well.
#![no_main]

use imagegen_core::entra::read_grant;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let status = if first < 128 { 200 } else { 400 + u16::from(first) % 200 };
    match read_grant(status, rest) {
        Ok(grant) => {
            assert_eq!(status, 200);
            assert!(!grant.access_token.is_empty());
            assert!(grant.access_token.bytes().all(|b| b.is_ascii_graphic()));
            assert!(grant.lifetime.as_secs() >= 1 && grant.lifetime.as_secs() <= 86_400);
        }
        Err(failure) => {
            assert!(!failure.message().is_empty());
            assert!(!failure.possibly_billed(), "a token costs nothing");
        }
    }
});
