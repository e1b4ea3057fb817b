//! Where every object imagegen writes lives, below `storage.prefix`. The one place that spells
//! out the layout, so that the worker, the CLI and the docs cannot drift apart:
//!
//! ```text
//! {prefix}images/{batch, or _}/{job}/{index}.{ext}     an image
//! {prefix}images/{batch, or _}/{job}/result.json       a succeeded job's event (its record)
//! {prefix}images/{batch, or _}/{job}/failed.json       a failed job's last event
//! {prefix}images/{batch, or _}/{job}/lease.json        which worker holds the job
//! {prefix}images/{batch, or _}/{job}/journal/{name}    the job's progress at its provider
//! {prefix}batches/{batch}.json                         the batch record (enqueue)
//! {prefix}batches/{batch}.cancelled                    present once the batch is cancelled
//! {prefix}spend/{batch}/{ms}-{micro USD}-{job}         one marker per paid call of a batch
//! {prefix}.imagegen/probe-{random}                     the start-up probe of conditional writes
//! {prefix}images/{batch, or _}/{job}/lane.json         a batch-lane job's record (write-once)
//! {prefix}lane/{provider}/open/{batch, or _}/{job}     a lane job not yet in an input file
//! {prefix}lane/{provider}/files/{file}/{step}          an input file's steps (write-once each)
//! ```
//!
//! Keys are full keys, the prefix included. Batch names and job ids are validated
//! ([`super::job::is_valid_name`]) before they reach a key.

/// The directory of jobs that have no batch.
pub const NO_BATCH: &str = "_";
/// A succeeded job's record, next to its images.
pub const RECORD_NAME: &str = "result.json";
/// A failed job's record, next to where its images would be.
pub const FAILED_RECORD_NAME: &str = "failed.json";
/// A job's lease.
pub const LEASE_NAME: &str = "lease.json";
/// The journal entry of a job waiting at a submit-and-poll provider.
pub const PENDING_JOURNAL_NAME: &str = "pending.json";

/// A batch-lane job's record: its message, kept in the store once the message is settled.
pub const LANE_RECORD_NAME: &str = "lane.json";

/// The journal entry of what a job's earlier deliveries bought and spent (a job of several
/// calls at a provider that queues them spans deliveries).
pub const SPENT_JOURNAL_NAME: &str = "spent.json";

/// The key directory of a job's objects: `{prefix}images/{batch or _}/{job}` (no trailing `/`).
pub fn job_dir(prefix: &str, batch: Option<&str>, job_id: &str) -> String {
    format!("{prefix}images/{}/{job_id}", batch.unwrap_or(NO_BATCH))
}

/// Every job directory of a batch lies below this.
pub fn batch_images(prefix: &str, batch: &str) -> String {
    format!("{prefix}images/{batch}/")
}

/// Image `index` of a job, with the extension its bytes call for.
pub fn image(job_dir: &str, index: u32, extension: &str) -> String {
    format!("{job_dir}/{index}.{extension}")
}

/// Variant `name` (one of the job's `outputs`) of image `index`.
pub fn variant(job_dir: &str, name: &str, index: u32, extension: &str) -> String {
    format!("{job_dir}/variants/{name}/{index}.{extension}")
}

/// Reads an image key's name back: `(index, extension)` of `{job_dir}/{index}.{ext}`.
pub fn parse_image(job_dir: &str, key: &str) -> Option<(u32, String)> {
    let name = key.strip_prefix(job_dir)?.strip_prefix('/')?;
    let (index, ext) = name.split_once('.')?;
    let index = index.parse().ok()?;
    (!ext.contains('/')).then(|| (index, ext.to_string()))
}

/// A succeeded job's record.
pub fn record(job_dir: &str) -> String {
    format!("{job_dir}/{RECORD_NAME}")
}

/// A failed job's record.
pub fn failed_record(job_dir: &str) -> String {
    format!("{job_dir}/{FAILED_RECORD_NAME}")
}

/// A job's lease.
pub fn lease(job_dir: &str) -> String {
    format!("{job_dir}/{LEASE_NAME}")
}

/// An entry of a job's journal.
pub fn journal(job_dir: &str, name: &str) -> String {
    format!("{job_dir}/journal/{name}")
}

/// Where the batch records are listed.
pub fn batches(prefix: &str) -> String {
    format!("{prefix}batches/")
}

/// The batch record.
pub fn batch_record(prefix: &str, batch: &str) -> String {
    format!("{prefix}batches/{batch}.json")
}

/// The batch's name from its record's key, when it is one.
pub fn batch_of_record<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix)?
        .strip_prefix("batches/")?
        .strip_suffix(".json")
}

/// The mark of a cancelled batch.
pub fn cancelled(prefix: &str, batch: &str) -> String {
    format!("{prefix}batches/{batch}.cancelled")
}

/// The directory of a batch's spend markers.
pub fn spend_dir(prefix: &str, batch: &str) -> String {
    format!("{prefix}spend/{batch}/")
}

/// A spend marker's name: it sorts by the writer's clock, then carries the cost and the job.
pub fn spend_marker(unix_ms: u64, micro_usd: u64, job_id: &str) -> String {
    format!("{unix_ms:013}-{micro_usd}-{job_id}")
}

/// Reads a spend marker's name back: `(unix ms, micro USD)`.
pub fn parse_spend_marker(name: &str) -> Option<(u64, u64)> {
    let mut parts = name.splitn(3, '-');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A batch-lane job's record.
pub fn lane_record(job_dir: &str) -> String {
    format!("{job_dir}/{LANE_RECORD_NAME}")
}

/// Every lane object of a provider lies below this.
pub fn lane(prefix: &str, provider: &str) -> String {
    format!("{prefix}lane/{provider}/")
}

/// Where the lane jobs of a provider that are in no input file yet are marked.
pub fn lane_open(prefix: &str, provider: &str) -> String {
    format!("{prefix}lane/{provider}/open/")
}

/// The mark of a lane job in no input file yet.
pub fn lane_open_job(prefix: &str, provider: &str, batch: Option<&str>, job_id: &str) -> String {
    format!(
        "{prefix}lane/{provider}/open/{}/{job_id}",
        batch.unwrap_or(NO_BATCH)
    )
}

/// `(batch, job)` of an open mark's key (`None` for the batch `_`).
pub fn parse_lane_open<'a>(open: &str, key: &'a str) -> Option<(Option<&'a str>, &'a str)> {
    let (batch, job) = key.strip_prefix(open)?.split_once('/')?;
    if job.is_empty() || job.contains('/') {
        return None;
    }
    Some(((batch != NO_BATCH).then_some(batch), job))
}

/// Where a provider's input files and their steps lie.
pub fn lane_files(prefix: &str, provider: &str) -> String {
    format!("{prefix}lane/{provider}/files/")
}

/// One step object of an input file (`intent.json`, `batch.json`, ...).
pub fn lane_file(prefix: &str, provider: &str, file: &str, step: &str) -> String {
    format!("{prefix}lane/{provider}/files/{file}/{step}")
}

/// The object written and deleted at start-up to learn whether the store honours conditional
/// writes.
pub fn probe(prefix: &str, random: u64) -> String {
    format!("{prefix}.imagegen/probe-{random:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_reads_back_what_it_writes() {
        let dir = job_dir("p/", Some("b.1"), "j-1");
        assert_eq!(dir, "p/images/b.1/j-1");
        assert_eq!(job_dir("", None, "x"), "images/_/x");
        assert!(dir.starts_with(&batch_images("p/", "b.1")));
        let key = image(&dir, 3, "webp");
        assert_eq!(key, "p/images/b.1/j-1/3.webp");
        assert_eq!(parse_image(&dir, &key), Some((3, "webp".into())));
        assert_eq!(parse_image(&dir, &record(&dir)), None);
        assert_eq!(parse_image(&dir, &journal(&dir, "0.json")), None);
        assert_eq!(parse_image("p/images/b.1/j", &key), None);
        assert_eq!(
            batch_of_record("p/", &batch_record("p/", "levels")),
            Some("levels")
        );
        assert_eq!(batch_of_record("p/", &cancelled("p/", "levels")), None);
        let marker = spend_marker(1_700_000_000_000, 40_000, "job-with-dashes");
        assert_eq!(
            parse_spend_marker(&marker),
            Some((1_700_000_000_000, 40_000))
        );
        assert!(spend_marker(999, 5, "z") < spend_marker(1000, 1, "a"));
        assert_eq!(parse_spend_marker("not-a-marker"), None);
        assert!(probe("p/", 1).starts_with("p/.imagegen/"));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::domain::job::{Job, JobRules};

    /// Ids and batch names as hostile producers write them: valid ones, path pieces, and any
    /// text.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![".", "..", "...", "_", "a/..", "./a", "a//b", ""])
                .prop_map(String::from),
            "[A-Za-z0-9._-]{1,12}",
            "[./\\\\_]{1,4}",
            "[a-z./]{0,6}/[a-z./]{0,6}",
            "\\PC{0,8}",
            "[A-Za-z0-9]{120,130}",
        ]
    }

    /// Prefixes that `storage.prefix` accepts: relative, without a `..` segment.
    fn prefix() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "([a-z0-9._-]{1,6}/){1,3}",
            "[a-z]{1,6}",
            Just("./tenant//a/".to_string()),
        ]
        .prop_filter("a valid prefix", |p| {
            !p.starts_with('/') && !p.split('/').any(|part| part == "..")
        })
    }

    proptest! {
        /// Every key of a job the parser accepts stays below the storage prefix, and what
        /// follows the prefix has no segment that a store resolving paths would move up or
        /// stay on (`..`, `.`, an empty one).
        #[test]
        fn every_key_of_an_accepted_job_stays_under_the_prefix(
            prefix in prefix(),
            id in proptest::option::of(name()),
            batch in proptest::option::of(name()),
            message_id in name(),
        ) {
            let mut job = json!({"prompt": "a lighthouse"});
            if let Some(id) = &id {
                job["id"] = json!(id);
            }
            if let Some(batch) = &batch {
                job["batch"] = json!(batch);
            }
            let rules = JobRules {
                max_message_bytes: 1 << 20,
                max_prompt_chars: 100,
                max_metadata_bytes: 1024,
                providers: vec![],
            };
            let body = serde_json::to_vec(&job).unwrap();
            let Ok(job) = Job::parse(&body, Some(&message_id), &rules) else {
                return Ok(());
            };
            let dir = job.dir(&prefix);
            let keys = [
                dir.clone(),
                image(&dir, 0, "png"),
                record(&dir),
                failed_record(&dir),
                lease(&dir),
                journal(&dir, PENDING_JOURNAL_NAME),
                lane_record(&dir),
                lane_open_job(&prefix, "openai", job.batch.as_deref(), &job.id),
            ];
            let open = lane_open(&prefix, "openai");
            prop_assert_eq!(
                parse_lane_open(&open, &keys[7]),
                Some((job.batch.as_deref(), job.id.as_str()))
            );
            let batch_keys = job.batch.as_deref().map(|b| {
                [
                    batch_images(&prefix, b),
                    batch_record(&prefix, b),
                    cancelled(&prefix, b),
                    spend_dir(&prefix, b),
                ]
            });
            for key in keys.iter().chain(batch_keys.iter().flatten()) {
                let rest = key.strip_prefix(prefix.as_str());
                prop_assert!(rest.is_some(), "{key:?} is not under {prefix:?}");
                let rest = rest.unwrap().trim_end_matches('/');
                prop_assert!(
                    rest.split('/').all(|part| !matches!(part, "" | "." | "..")),
                    "{key:?}: a segment leaves or stays"
                );
            }
            prop_assert!(dir.starts_with(&batch_images(&prefix, job.batch.as_deref().unwrap_or(NO_BATCH))));
        }
    }
}
