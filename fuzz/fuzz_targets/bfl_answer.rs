//! Black Forest Labs' answers: a submit's answer gives exactly the id and polling URL a plain
//! JSON parser finds (or a billed failure), a poll's answer a documented status (a Ready task
//! always with its sample), an error body a classified failure. Never a panic.
#![no_main]

use imagegen_core::bfl::{Polled, classify, error_detail, read_poll, read_submit};
use imagegen_core::domain::error::{Failure, StopReason};
use imagegen_core::domain::json::parse_unique;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    match first % 3 {
        0 => {
            let got = read_submit(rest);
            let oracle = std::str::from_utf8(rest)
                .ok()
                .and_then(|t| parse_unique(t).ok());
            match got {
                Ok(s) => {
                    assert!(!s.id.is_empty() && !s.polling_url.is_empty());
                    if let Some(v) = oracle {
                        assert_eq!(v.get("id").and_then(Value::as_str), Some(s.id.as_str()));
                        assert_eq!(
                            v.get("polling_url").and_then(Value::as_str),
                            Some(s.polling_url.as_str())
                        );
                    }
                    assert!(s.cost.is_none_or(|c| c.is_finite() && c >= 0.0));
                }
                Err(f) => assert!(f.possibly_billed(), "an accepted submit is billed: {f}"),
            }
        }
        1 => {
            if let Ok(Polled::Ready { sample, .. }) = read_poll(rest) {
                assert!(!sample.is_empty());
            }
        }
        _ => {
            let status = 400 + u16::from(first / 3) % 200;
            let failure = classify(status, rest, None);
            assert!(!failure.message().is_empty());
            if status == 402 {
                assert!(matches!(
                    failure,
                    Failure::Stop {
                        reason: StopReason::QuotaExhausted,
                        ..
                    }
                ));
            }
            if let Some(text) = error_detail(rest) {
                assert!(text.chars().count() <= 1000);
            }
        }
    }
});
