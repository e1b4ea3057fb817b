//! The job parser: any message body, however hostile, is a valid job or an `invalid_job` with a
//! usable id, and a valid job's objects stay under the storage prefix.
#![no_main]

use imagegen_core::domain::job::{Job, JobRules, is_valid_name};
use imagegen_core::domain::keys;
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "tenant/a/";

fuzz_target!(|body: &[u8]| {
    let rules = JobRules {
        max_message_bytes: 262_144,
        max_prompt_chars: 32_000,
        max_metadata_bytes: 16_384,
        providers: vec!["openai".into(), "placeholder".into()],
    };
    match Job::parse(body, Some("fallback-id"), &rules) {
        Ok(job) => {
            assert!(is_valid_name(&job.id), "{:?}", job.id);
            if let Some(batch) = &job.batch {
                assert!(is_valid_name(batch) && batch != keys::NO_BATCH, "{batch:?}");
            }
            assert!(!job.prompt.is_empty());
            assert!((1..=10).contains(&job.n), "n = {}", job.n);
            let dir = job.dir(PREFIX);
            let rest = dir.strip_prefix(PREFIX).expect("under the prefix");
            assert!(
                rest.split('/').all(|c| !c.is_empty() && c != "." && c != ".."),
                "{dir:?}"
            );
            for key in [keys::record(&dir), keys::lease(&dir), keys::image(&dir, 0, "png")] {
                assert!(key.starts_with(&dir) && !key.contains("//"), "{key:?}");
            }
            // The metadata is echoed as JSON, and the fingerprint depends on the job alone.
            serde_json::from_str::<serde_json::Value>(job.metadata.get()).expect("metadata");
            let again = Job::parse(body, Some("fallback-id"), &rules).expect("parses again");
            assert_eq!(job.fingerprint(), again.fingerprint());
            assert!(job.fingerprint().starts_with("f1-"));
        }
        Err(invalid) => {
            assert!(is_valid_name(&invalid.job_id), "{:?}", invalid.job_id);
            if let Some(batch) = &invalid.batch {
                assert!(is_valid_name(batch), "{batch:?}");
            }
            assert!(
                !invalid.message.chars().any(char::is_control),
                "{:?}",
                invalid.message
            );
        }
    }
});
