//! The OpenAI Batch API's answers: a line of an output or error file read from anything has its
//! `custom_id` and says whether its request was answered (with a status and the raw body of the
//! live answer, a part of the line), never ran, or failed; a `custom_id` read back is a batch and
//! a job id that make a key; a batch object says where it stands. Never a panic.
#![no_main]

use imagegen_core::domain::job::is_valid_name;
use imagegen_core::openai::batch::{
    BatchList, BatchObject, LineOutcome, OutputLine, custom_id, parse_custom_id,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    match first % 3 {
        0 => {
            let Ok(line) = OutputLine::parse(rest) else {
                return;
            };
            if let Some((batch, job)) = parse_custom_id(&line.custom_id) {
                assert!(is_valid_name(job));
                assert!(batch.is_none_or(is_valid_name));
                assert_eq!(custom_id(batch, job), line.custom_id);
            }
            if let LineOutcome::Answered { body, .. } = line.outcome() {
                // The body is the line's own bytes, not a copy.
                let (start, end) = (rest.as_ptr() as usize, rest.as_ptr() as usize + rest.len());
                let at = body.as_ptr() as usize;
                assert!(body.is_empty() || (at >= start && at + body.len() <= end));
            }
        }
        1 => {
            if let Ok(batch) = serde_json::from_slice::<BatchObject>(rest) {
                let _ = (batch.state(), batch.first_error(), batch.meta("imagegen_file"));
            }
        }
        _ => {
            let _ = serde_json::from_slice::<BatchList>(rest);
        }
    }
});
