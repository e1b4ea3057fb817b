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
