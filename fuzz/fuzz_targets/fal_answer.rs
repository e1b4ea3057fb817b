//! fal's answers: a submit read from anything has its request id and the URLs to follow (or a
//! billed failure), a status one of the documented three, a result at least one image with a URL
//! (or a billed failure), an error body a classified failure (a locked account pauses for quota,
//! never retried as an outage). Never a panic.
#![no_main]

use imagegen_core::domain::error::{Failure, StopReason};
use imagegen_core::fal::{classify, read_result, read_status, read_submit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    match first % 4 {
        0 => match read_submit(rest) {
            Ok(q) => assert!(
                !q.request_id.is_empty() && !q.status_url.is_empty() && !q.response_url.is_empty()
            ),
            Err(f) => assert!(f.possibly_billed(), "an accepted submit is billed: {f}"),
        },
        1 => {
            let _ = read_status(rest);
        }
        2 => match read_result(rest) {
            Ok(images) => {
                assert!(!images.is_empty());
                assert!(images.iter().all(|i| !i.url.is_empty()));
            }
            Err(f) => assert!(f.possibly_billed(), "a result of a run is billed: {f}"),
        },
        _ => {
            let status = 400 + u16::from(first / 4) % 200;
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
        }
    }
});
