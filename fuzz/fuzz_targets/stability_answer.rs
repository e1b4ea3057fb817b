//! Stability AI's answers: a JSON answer gives the image its base64 decodes to (or a billed
//! failure), a finish reason other than SUCCESS is never a success, and an error body is a
//! classified failure (a 402 always pauses the provider, a moderation refusal is never retried).
//! Never a panic.
#![no_main]

use imagegen_core::domain::error::{ErrorKind, Failure, StopReason};
use imagegen_core::stability::{Finish, classify, read_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    match first % 3 {
        0 => match read_json(rest) {
            Ok(answer) => {
                if answer.finish == Finish::Success {
                    assert!(!answer.image.is_empty());
                }
                if answer.finish != Finish::Success {
                    assert!(answer.finish.check(None).is_err());
                }
            }
            Err(f) => assert!(f.possibly_billed(), "an answered call is billed: {f}"),
        },
        1 => {
            let reason = std::str::from_utf8(rest).ok();
            let finish = Finish::parse(reason);
            let ok = finish.check(None).is_ok();
            assert_eq!(ok, finish == Finish::Success);
        }
        _ => {
            let status = 400 + u16::from(first / 3) % 200;
            let failure = classify(status, rest, None);
            assert!(!failure.message().is_empty());
            assert!(failure.message().chars().count() <= 1100);
            if status == 402 {
                assert!(matches!(
                    failure,
                    Failure::Stop {
                        reason: StopReason::QuotaExhausted,
                        ..
                    }
                ));
            }
            if failure.kind() == Some(ErrorKind::ContentPolicy) {
                assert!(!failure.is_retryable());
            }
            if status == 429 {
                assert!(matches!(failure, Failure::Retryable { after: Some(_), .. }));
            }
        }
    }
});
