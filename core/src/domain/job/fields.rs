//! The pieces a job's fields are read with: its lane, whole numbers as JSON writes them, ids
//! and names that become keys, option strings, and the deterministic ids `enqueue` derives.

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{MAX_ID_LEN, MAX_OPTION_LEN};

/// How a job is bought: answered at once, or through the provider's batch API (half the price,
/// within a day).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Lane {
    /// Called at once (the default).
    #[default]
    Live,
    /// Sent in the provider's next batch file: the job may take up to a day.
    Batch,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Live => "live",
            Lane::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Lane::Live),
            "batch" => Some(Lane::Batch),
            _ => None,
        }
    }
}

/// A whole number from 0 to `u64::MAX`, written as JSON writes it: `2`, or `2.0` as some
/// producers' JSON libraries do (JSON Schema's `integer` accepts both).
pub(super) fn whole(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0)
            .map(|f| f as u64)
    })
}

/// Deserializes a field that holds a whole number ([`whole`]).
pub(super) fn whole_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    let v = Value::deserialize(d)?;
    whole(&v).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "invalid type: {}, expected a whole number from 0 to {}",
            truncate(&v.to_string(), 40),
            u64::MAX
        ))
    })
}

/// True when `s` is a valid id or batch name: 1-128 characters of `[A-Za-z0-9._-]`, and not a
/// path component such as `.` or `..` (ids become object keys).
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.bytes().all(|b| b == b'.')
}

/// Levels of objects and arrays in `v`: 0 for a scalar, 1 for `{}`.
pub(super) fn depth(v: &Value) -> usize {
    match v {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// True when `s` has nothing but white space as the schema's prompt pattern spells it out:
/// ECMAScript's white space and line terminators (what `\\s` means in JSON Schema), which are
/// Unicode's space separators, tab, the line breaks, vertical tab, form feed and U+FEFF, but not
/// U+0085 (which Rust's `char::is_whitespace` includes).
pub(super) fn is_blank(s: &str) -> bool {
    s.chars().all(|c| {
        matches!(
            c,
            '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
                ..='\u{200a}'
                    | '\u{2028}'
                    | '\u{2029}'
                    | '\u{202f}'
                    | '\u{205f}'
                    | '\u{3000}'
                    | '\u{feff}'
        )
    })
}

pub(super) fn valid_option(v: &str) -> bool {
    // Characters, as the schema's maxLength counts them (not bytes).
    !v.is_empty() && v.chars().count() <= MAX_OPTION_LEN && !v.chars().any(char::is_control)
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A deterministic job id: the same job, in the same batch, at the same occurrence in its file,
/// always gets the same id, so that enqueueing a file again finds the stored results.
/// `job` is the job object without `id`; its keys are sorted before hashing.
pub fn derive_id(batch: Option<&str>, job: &Value, occurrence: u32) -> String {
    let mut h = Sha256::new();
    h.update(batch.unwrap_or("").as_bytes());
    h.update([0]);
    let mut canonical = Vec::new();
    crate::domain::json::write_canonical(job, &mut canonical);
    h.update(&canonical);
    h.update([0]);
    h.update(occurrence.to_be_bytes());
    format!("j-{}", &hex::encode(h.finalize())[..32])
}
