//! The job message contract: what a producer publishes to the jobs queue.
//!
//! A job is a JSON object. Only `prompt` is required. Unknown top-level fields make the job
//! invalid, so that a typo (`sise`) never silently buys the wrong image. `version` (default 1)
//! numbers the schema: a worker dead-letters a job of a newer version as `invalid_job` with a
//! message saying so, and it can be replayed once the workers are upgraded.

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::error::Failure;
use super::json::RawJson;

mod fields;
pub mod outputs;
pub mod references;

pub(crate) use fields::truncate;
pub use fields::{Lane, derive_id, is_valid_name};
use fields::{depth, is_blank, valid_option, whole, whole_number};
pub use outputs::{Encoding, Fit, OutputSpec};
pub use references::Reference;

/// The job schema version this worker understands.
/// Version 2 added `provider`, `negative_prompt` and `seed`; version 3 `images`, `mask`,
/// `outputs`, `fail_if_opaque` and `lane`. A job of an earlier version is a later one that does
/// not use them.
pub const JOB_SCHEMA_VERSION: u32 = 3;

/// Request fields that the worker controls: `params` may not set them.
pub const RESERVED_PARAMS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "stream",
    "response_format",
    "partial_images",
    "size",
    "quality",
    "output_format",
    "background",
];

const MAX_ID_LEN: usize = 128;

/// How deep `metadata` may nest (objects and arrays within it). The JSON reader stops at 128
/// levels of a whole document, and the metadata sits deeper in a stored record (inside the
/// event's `data`) than in the job: a bound well below that keeps every accepted job's record
/// readable again.
pub const MAX_METADATA_DEPTH: usize = 32;
const MAX_OPTION_LEN: usize = 64;

/// Bounds applied while parsing (from the settings: see `Settings::job_rules`).
#[derive(Debug, Clone)]
pub struct JobRules {
    pub max_message_bytes: usize,
    pub max_prompt_chars: usize,
    pub max_metadata_bytes: usize,
    /// The configured provider names a job may choose with `provider`.
    pub providers: Vec<String>,
}

/// A valid job, as the producer sent it: fields it left out stay `None` here, and take the
/// defaults of the job's provider when its request is made.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub batch: Option<String>,
    /// The configured provider to use; `None`: the default one (`worker.default_provider`).
    pub provider: Option<String>,
    pub prompt: String,
    /// What the image should not show, for providers that take it.
    pub negative_prompt: Option<String>,
    pub model: Option<String>,
    /// `WIDTHxHEIGHT`, an aspect ratio `W:H`, `auto`, or another string the provider knows.
    pub size: Option<String>,
    pub quality: Option<String>,
    pub output_format: Option<String>,
    pub background: Option<String>,
    /// For providers that take a seed: the same seed and request give the same image.
    pub seed: Option<u64>,
    pub n: u8,
    pub params: Map<String, Value>,
    /// As the producer wrote it, byte for byte (`null` when absent).
    pub metadata: RawJson,
    /// Past this instant the job ends as `expired`, without a provider call.
    pub deadline: Option<time::OffsetDateTime>,
    /// Reference images the provider is given with the prompt (a style plate, art to edit).
    pub images: Vec<Reference>,
    /// Where to paint, for an edit: a PNG whose transparent pixels mark it.
    pub mask: Option<Reference>,
    /// Variants made of each image, stored beside it.
    pub outputs: Vec<OutputSpec>,
    /// With `background: "transparent"`: fail rather than store an image with no transparent
    /// pixel (the provider ignored the request); without it, the event says so.
    pub fail_if_opaque: bool,
    /// `None`: the job did not say (the provider's deadline routing may send it to the batch
    /// lane).
    pub lane: Option<Lane>,
}

/// The wire form. Every field optional here so that the checks below give precise messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireJob {
    #[serde(default, deserialize_with = "whole_number")]
    version: Option<u64>,
    id: Option<String>,
    prompt: Option<String>,
    batch: Option<String>,
    provider: Option<String>,
    negative_prompt: Option<String>,
    seed: Option<Value>,
    model: Option<String>,
    size: Option<String>,
    quality: Option<String>,
    output_format: Option<String>,
    background: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    n: Option<u64>,
    params: Option<Map<String, Value>>,
    metadata: Option<Map<String, Value>>,
    deadline: Option<String>,
    images: Option<Vec<Value>>,
    mask: Option<Value>,
    outputs: Option<Vec<Value>>,
    fail_if_opaque: Option<bool>,
    lane: Option<String>,
}

/// A job that could not be accepted, with the id to report it under.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidJob {
    /// The job's id when it had a valid one, else `invalid-` and a digest of the message body.
    pub job_id: String,
    pub batch: Option<String>,
    /// As the producer wrote it, byte for byte (`null` when absent).
    pub metadata: RawJson,
    pub message: String,
}

impl InvalidJob {
    pub fn failure(&self) -> Failure {
        Failure::invalid_job(self.message.clone())
    }
}

impl Job {
    /// Parses and validates a message body. `message_id` is the AMQP `message_id`, used when the
    /// body has no `id`.
    pub fn parse(
        body: &[u8],
        message_id: Option<&str>,
        rules: &JobRules,
    ) -> Result<Job, InvalidJob> {
        let fallback_id = || format!("invalid-{}", &hex::encode(Sha256::digest(body))[..24]);
        let reject = |id: Option<&str>, batch: Option<&str>, metadata: RawJson, message: String| {
            InvalidJob {
                job_id: id
                    .filter(|i| is_valid_name(i))
                    .map(str::to_string)
                    .unwrap_or_else(fallback_id),
                batch: batch
                    .filter(|b| is_valid_name(b) && *b != super::keys::NO_BATCH)
                    .map(str::to_string),
                metadata,
                // What the producer wrote may be quoted in it (serde names an unknown field
                // as it was sent): escaped here, for every log, event and header it reaches.
                message: super::printable(&message),
            }
        };
        if body.len() > rules.max_message_bytes {
            return Err(reject(
                message_id,
                None,
                RawJson::null(),
                format!(
                    "message is {} bytes, larger than worker.max_message_bytes ({})",
                    body.len(),
                    rules.max_message_bytes
                ),
            ));
        }
        let text = match std::str::from_utf8(body) {
            Ok(t) => t,
            Err(e) => {
                return Err(reject(
                    message_id,
                    None,
                    RawJson::null(),
                    format!("message is not UTF-8: {e}"),
                ));
            }
        };
        let value: Value = match super::json::parse_unique(text) {
            Ok(v) => v,
            Err(e) => {
                return Err(reject(
                    message_id,
                    None,
                    RawJson::null(),
                    format!("message is not JSON: {e}"),
                ));
            }
        };
        // Best-effort id, batch and metadata for the failure report, before strict parsing.
        let loose_id = value
            .get("id")
            .and_then(Value::as_str)
            .or(message_id)
            .map(str::to_string);
        let loose_batch = value
            .get("batch")
            .and_then(Value::as_str)
            .map(str::to_string);
        let loose_metadata = value
            .get("metadata")
            .filter(|m| m.is_object())
            .cloned()
            .unwrap_or(Value::Null);
        // The metadata as written, when the body is an object that has one.
        let raw_metadata = super::json::raw_field(text, "metadata");
        let fail = |message: String| {
            // Only echo metadata that respects its own limits.
            let metadata = match raw_metadata {
                Some(raw)
                    if loose_metadata.is_object()
                        && raw.get().len() <= rules.max_metadata_bytes
                        && depth(&loose_metadata) <= MAX_METADATA_DEPTH =>
                {
                    RawJson::from_raw(raw)
                }
                _ => RawJson::null(),
            };
            reject(
                loose_id.as_deref(),
                loose_batch.as_deref(),
                metadata,
                message,
            )
        };
        let Some(object) = value.as_object() else {
            return Err(fail("message must be a JSON object".into()));
        };
        // `null` is no value: the schema refuses it, and so does the worker, rather than read it
        // as a field left out.
        if let Some(key) = object.iter().find_map(|(k, v)| v.is_null().then_some(k)) {
            return Err(fail(format!(
                "`{}` is null: leave the field out or give it a value",
                truncate(key, 64)
            )));
        }
        let wire: WireJob =
            serde_json::from_value(value).map_err(|e| fail(format!("invalid job: {e}")))?;

        if wire.version == Some(0) {
            return Err(fail(
                "job schema version 0 does not exist: versions start at 1".into(),
            ));
        }
        if let Some(v) = wire.version
            && v > u64::from(JOB_SCHEMA_VERSION)
        {
            return Err(fail(format!(
                "job schema version {v} is newer than this worker supports ({JOB_SCHEMA_VERSION}); \
                 upgrade the workers and replay it from the dead-letter queue"
            )));
        }
        let id = match wire.id.as_deref().or(message_id) {
            Some(id) if is_valid_name(id) => id.to_string(),
            Some(id) => {
                return Err(fail(format!(
                    "id {:?} must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-] and not only dots",
                    truncate(id, 140)
                )));
            }
            None => {
                return Err(fail(
                    "job has no `id` and the message has no message_id".into(),
                ));
            }
        };
        if let Some(b) = &wire.batch
            && !is_valid_name(b)
        {
            return Err(fail(format!(
                "batch {:?} must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-] and not only dots",
                truncate(b, 140)
            )));
        }
        if wire.batch.as_deref() == Some(super::keys::NO_BATCH) {
            return Err(fail(format!(
                "batch {:?} is reserved: it is where jobs without a batch are stored",
                super::keys::NO_BATCH
            )));
        }
        let prompt = match wire.prompt {
            Some(p) if !is_blank(&p) => p,
            Some(_) => return Err(fail("`prompt` is empty".into())),
            None => return Err(fail("`prompt` is required".into())),
        };
        let chars = prompt.chars().count();
        if chars > rules.max_prompt_chars {
            return Err(fail(format!(
                "`prompt` has {chars} characters, more than worker.max_prompt_chars ({})",
                rules.max_prompt_chars
            )));
        }
        let n = wire.n.unwrap_or(1);
        if !(1..=10).contains(&n) {
            return Err(fail(format!("`n` is {n}, must be between 1 and 10")));
        }
        let option = |name: &str, v: Option<String>| -> Result<Option<String>, InvalidJob> {
            match v {
                None => Ok(None),
                Some(v) if valid_option(&v) => Ok(Some(v)),
                Some(v) => Err(fail(format!(
                    "`{name}` {:?} must be 1-{MAX_OPTION_LEN} printable characters",
                    truncate(&v, 80)
                ))),
            }
        };
        let model = option("model", wire.model)?;
        let size = option("size", wire.size)?;
        let quality = option("quality", wire.quality)?;
        let output_format = option("output_format", wire.output_format)?;
        let background = option("background", wire.background)?;
        let provider = option("provider", wire.provider)?;
        if let Some(p) = &provider
            && !rules.providers.iter().any(|c| c == p)
        {
            return Err(fail(format!(
                "`provider` {p:?} is not a configured provider (configured: {})",
                rules.providers.join(", ")
            )));
        }
        let seed = match wire.seed {
            None => None,
            Some(v) => Some(whole(&v).ok_or_else(|| {
                fail(format!(
                    "`seed` {} must be a whole number from 0 to {}",
                    truncate(&v.to_string(), 40),
                    u64::MAX
                ))
            })?),
        };
        let negative_prompt = match wire.negative_prompt {
            Some(p) if p.chars().count() > rules.max_prompt_chars => {
                return Err(fail(format!(
                    "`negative_prompt` has more than worker.max_prompt_chars ({}) characters",
                    rules.max_prompt_chars
                )));
            }
            Some(p) if is_blank(&p) => None,
            other => other,
        };
        let deadline = match wire.deadline {
            None => None,
            Some(d) => {
                // The time crate takes any character between date and time; RFC 3339's
                // grammar (and JSON Schema's `date-time`) only `T` or `t`.
                let rfc3339 = &time::format_description::well_known::Rfc3339;
                let parsed = matches!(d.as_bytes().get(10), Some(b'T' | b't'))
                    .then(|| time::OffsetDateTime::parse(&d, rfc3339).ok())
                    .flatten();
                Some(parsed.ok_or_else(|| {
                    fail(format!(
                        "`deadline` {:?} is not an RFC 3339 date-time (2026-12-01T18:00:00Z)",
                        truncate(&d, 80)
                    ))
                })?)
            }
        };
        let images = references::parse(wire.images.unwrap_or_default()).map_err(&fail)?;
        let mask = match wire.mask {
            None => None,
            Some(_) if images.is_empty() => {
                return Err(fail(
                    "`mask` needs `images`: it marks where to paint on the first of them".into(),
                ));
            }
            Some(m) => Some(references::parse_one(m, "mask").map_err(&fail)?),
        };
        let outputs = outputs::parse(wire.outputs.unwrap_or_default()).map_err(&fail)?;
        let fail_if_opaque = wire.fail_if_opaque.unwrap_or(false);
        if fail_if_opaque && background.as_deref() != Some("transparent") {
            return Err(fail(
                "`fail_if_opaque` is only for jobs with `background: \"transparent\"`".into(),
            ));
        }
        let lane = match wire.lane.as_deref() {
            None => None,
            Some(l) => Some(Lane::parse(l).ok_or_else(|| {
                fail(format!(
                    "`lane` {:?} must be \"live\" or \"batch\"",
                    truncate(l, 40)
                ))
            })?),
        };
        let params = wire.params.unwrap_or_default();
        if let Some(key) = params
            .keys()
            .find(|k| RESERVED_PARAMS.contains(&k.as_str()))
        {
            return Err(fail(format!(
                "`params.{key}` is controlled by the worker; use the top-level field or leave it out"
            )));
        }
        let metadata = match (wire.metadata, raw_metadata) {
            (None, _) => RawJson::null(),
            (Some(_), None) => return Err(fail("`metadata` could not be read as written".into())),
            (Some(m), Some(raw)) => {
                let m = Value::Object(m);
                let levels = depth(&m);
                if levels > MAX_METADATA_DEPTH {
                    return Err(reject(
                        Some(&id),
                        wire.batch.as_deref(),
                        RawJson::null(),
                        format!(
                            "`metadata` nests {levels} levels deep, more than {MAX_METADATA_DEPTH}"
                        ),
                    ));
                }
                let size = raw.get().len();
                if size > rules.max_metadata_bytes {
                    return Err(reject(
                        Some(&id),
                        wire.batch.as_deref(),
                        RawJson::null(),
                        format!(
                            "`metadata` is {size} bytes of JSON, more than worker.max_metadata_bytes ({})",
                            rules.max_metadata_bytes
                        ),
                    ));
                }
                RawJson::from_raw(raw)
            }
        };
        Ok(Job {
            id,
            batch: wire.batch,
            provider,
            prompt,
            negative_prompt,
            model,
            size,
            quality,
            output_format,
            background,
            seed,
            n: n as u8,
            params,
            metadata,
            deadline,
            images,
            mask,
            outputs,
            fail_if_opaque,
            lane,
        })
    }

    /// A digest of what the job asks for, as its producer wrote it (prompt, provider, model,
    /// size, quality, format, background, n, seed, negative prompt, params; not the defaults
    /// config fills in, nor the id, batch, metadata or deadline). Stored with its results, so
    /// that another job under the same id never receives them.
    pub fn fingerprint(&self) -> String {
        let mut fields = Map::new();
        let mut put = |name: &str, value: Option<Value>| {
            if let Some(v) = value {
                fields.insert(name.to_string(), v);
            }
        };
        let text = |s: &Option<String>| s.clone().map(Value::String);
        put("prompt", Some(Value::String(self.prompt.clone())));
        put("negative_prompt", text(&self.negative_prompt));
        put("provider", text(&self.provider));
        put("model", text(&self.model));
        put("size", text(&self.size));
        put("quality", text(&self.quality));
        put("output_format", text(&self.output_format));
        put("background", text(&self.background));
        put("n", Some(Value::from(self.n)));
        put("seed", self.seed.map(Value::from));
        if !self.params.is_empty() {
            put("params", Some(Value::Object(self.params.clone())));
        }
        // Absent when empty, so that jobs without them keep the fingerprints they had.
        if !self.images.is_empty() {
            put("images", serde_json::to_value(&self.images).ok());
        }
        if let Some(mask) = &self.mask {
            put("mask", serde_json::to_value(mask).ok());
        }
        if !self.outputs.is_empty() {
            put("outputs", serde_json::to_value(&self.outputs).ok());
        }
        if self.fail_if_opaque {
            put("fail_if_opaque", Some(Value::Bool(true)));
        }
        let mut canonical = Vec::new();
        super::json::write_canonical(&Value::Object(fields), &mut canonical);
        format!("f1-{}", &hex::encode(Sha256::digest(&canonical))[..32])
    }

    /// The key directory of this job's objects.
    pub fn dir(&self, prefix: &str) -> String {
        super::keys::job_dir(prefix, self.batch.as_deref(), &self.id)
    }
}

#[cfg(test)]
mod tests;
