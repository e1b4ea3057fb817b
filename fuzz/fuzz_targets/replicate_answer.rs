//! Replicate's answers: a prediction read from anything has an id and a URL to poll, a succeeded
//! one at least one output, a failed one a classified failure (a refusal never retried); an error
//! body is a classified failure whose delay, when a 429 names one, is under an hour. Never a
//! panic.
#![no_main]

use imagegen_core::domain::error::{ErrorKind, Failure, StopReason};
use imagegen_core::replicate::{State, classify, failure, read_prediction};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    if first % 2 == 0 {
        match read_prediction(rest) {
            Ok(p) => {
                assert!(!p.id.is_empty() && !p.get.is_empty());
                assert!(p.predict_time.is_none_or(|t| t.is_finite() && t >= 0.0));
                match &p.state {
                    State::Succeeded(outputs) => {
                        assert!(!outputs.is_empty());
                        assert!(outputs.iter().all(|o| !o.is_empty()));
                    }
                    State::Refused(_) => {
                        let f = failure(&p.state, &p.id);
                        assert_eq!(f.kind(), Some(ErrorKind::ContentPolicy));
                        assert!(!f.is_retryable());
                    }
                    State::Failed(_) | State::Canceled => {
                        assert!(failure(&p.state, &p.id).is_retryable());
                    }
                    State::Running => {}
                }
            }
            Err(f) => assert!(f.possibly_billed(), "an accepted create is billed: {f}"),
        }
    } else {
        let status = 400 + u16::from(first / 2) % 200;
        let f = classify(status, rest, None);
        assert!(!f.message().is_empty());
        if status == 402 {
            assert!(matches!(
                f,
                Failure::Stop {
                    reason: StopReason::QuotaExhausted,
                    ..
                }
            ));
        }
        if let Failure::Retryable { after: Some(d), .. } = f {
            assert!(d.as_secs() < 3600);
        }
    }
});
