//! Reading job files and publishing their jobs with publisher confirms.
//!
//! Inputs: JSONL (one job object a line), CSV with a header (a `prompt` column, or a template
//! filled from the columns; `id`, `size`, `model`, `quality`, `n`, ... map to job fields and the
//! other columns go to `metadata`), or plain text (one prompt a line). Each row can be expanded
//! into variations (`--vary biome=forest,desert --vary time=day,night`: the cross product). Ids are deterministic
//! (an explicit `id` wins, else a digest of the batch, the canonical job and its occurrence in the
//! file), so that enqueueing the same file again finds the stored results instead of paying again.
//! Bad lines are reported with their line numbers and not published.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use futures_util::StreamExt;
use lapin::BasicProperties;
use serde_json::{Map, Value};

use crate::amqp::publisher::{Publisher, unix_now};
use crate::amqp::{connect, topology};
use crate::config::Settings;
use crate::job::{Job, JobRules, derive_id};

/// Confirms awaited at once while publishing.
const PUBLISH_WINDOW: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// By extension (.jsonl/.ndjson: JSONL, .csv: CSV, .txt: text), else by the first line.
    Auto,
    Jsonl,
    Csv,
    Text,
}

/// Columns of a CSV row (and `--vary` names) that are job fields; other columns go to `metadata`.
pub const JOB_COLUMNS: &[&str] = &[
    "id",
    "prompt",
    "batch",
    "model",
    "size",
    "quality",
    "output_format",
    "background",
    "n",
    "deadline",
];

/// How rows become jobs: an optional prompt template and variations.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// `{name}` placeholders are filled from the row's columns (or fields, or metadata) and the
    /// variation's values.
    pub template: Option<String>,
    /// `--vary name=v1,v2`: each row becomes one job per combination of values.
    pub vary: Vec<(String, Vec<String>)>,
}

impl Shape {
    /// Combinations per row.
    pub fn variations(&self) -> usize {
        self.vary.iter().map(|(_, v)| v.len()).product()
    }

    /// Every combination of the `--vary` values, in order (the last name varies fastest).
    fn combinations(&self) -> Vec<Vec<(&str, &str)>> {
        let mut out: Vec<Vec<(&str, &str)>> = vec![Vec::new()];
        for (name, values) in &self.vary {
            out = out
                .into_iter()
                .flat_map(|combo| {
                    values.iter().map(move |v| {
                        let mut c = combo.clone();
                        c.push((name.as_str(), v.as_str()));
                        c
                    })
                })
                .collect();
        }
        out
    }
}

/// Parses `name=v1,v2,...` (a `--vary` argument).
pub fn parse_vary(arg: &str) -> Result<(String, Vec<String>), String> {
    let (name, values) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?} is not name=value1,value2,..."))?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{name:?}: a variation name is letters, digits and _"
        ));
    }
    let values: Vec<String> = values
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        return Err(format!("--vary {name} has no values"));
    }
    Ok((name.to_string(), values))
}

/// Fills `{name}` placeholders; `{{` and `}}` are literal braces.
pub fn fill_template(
    template: &str,
    mut lookup: impl FnMut(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err("unmatched `}` in the template (write `}}` for a brace)".into());
        }
        let end = tail
            .find('}')
            .ok_or("unclosed `{` in the template (write `{{` for a brace)")?;
        let name = tail[1..end].trim();
        let value = lookup(name).ok_or_else(|| {
            format!("the template's {{{name}}} matches no column, field or --vary name")
        })?;
        out.push_str(&value);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A job ready to publish.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    pub line: usize,
    pub id: String,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Prepared {
    pub jobs: Vec<PreparedJob>,
    pub errors: Vec<LineError>,
}

/// Picks the format of a file.
pub fn detect_format(path: &std::path::Path, text: &str) -> InputFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson") => InputFormat::Jsonl,
        Some("csv") => InputFormat::Csv,
        Some("txt") => InputFormat::Text,
        _ => {
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("");
            if first.starts_with('{') {
                InputFormat::Jsonl
            } else {
                InputFormat::Text
            }
        }
    }
}

/// One input row before it becomes a job: a job object (JSONL), a prompt (text), or columns (CSV).
struct Row {
    line: usize,
    object: Map<String, Value>,
    /// CSV columns are strings to map onto job fields; JSONL objects are jobs already.
    from_columns: bool,
}

/// Reads the rows of an input. Errors are per line.
fn rows(text: &str, format: InputFormat, errors: &mut Vec<LineError>) -> Vec<Row> {
    let mut out = Vec::new();
    match format {
        InputFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .flexible(false)
                .trim(csv::Trim::All)
                .from_reader(text.as_bytes());
            let headers = match reader.headers() {
                Ok(h) => h.clone(),
                Err(e) => {
                    errors.push(LineError {
                        line: 1,
                        message: format!("the CSV header cannot be read: {e}"),
                    });
                    return out;
                }
            };
            for record in reader.records() {
                match record {
                    Ok(record) => {
                        let line = record.position().map_or(0, |p| p.line() as usize);
                        if record.iter().all(str::is_empty) {
                            continue;
                        }
                        let object = headers
                            .iter()
                            .zip(record.iter())
                            .filter(|(_, v)| !v.is_empty())
                            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                            .collect();
                        out.push(Row {
                            line,
                            object,
                            from_columns: true,
                        });
                    }
                    Err(e) => errors.push(LineError {
                        line: e.position().map_or(0, |p| p.line() as usize),
                        message: format!("bad CSV row: {e}"),
                    }),
                }
            }
        }
        _ => {
            for (i, raw) in text.lines().enumerate() {
                let line = i + 1;
                let trimmed = raw.trim();
                if trimmed.is_empty() {
                    continue;
                }
                let object = match format {
                    InputFormat::Text => {
                        let mut m = Map::new();
                        m.insert("prompt".into(), Value::String(trimmed.to_string()));
                        m
                    }
                    _ => match serde_json::from_str::<Value>(trimmed) {
                        Ok(Value::Object(m)) => m,
                        Ok(_) => {
                            errors.push(LineError {
                                line,
                                message: "a job must be a JSON object".into(),
                            });
                            continue;
                        }
                        Err(e) => {
                            errors.push(LineError {
                                line,
                                message: format!("not JSON: {e}"),
                            });
                            continue;
                        }
                    },
                };
                out.push(Row {
                    line,
                    object,
                    from_columns: false,
                });
            }
        }
    }
    out
}

/// Sets a job field or, for other names, a metadata entry, from a string (a CSV cell or a
/// `--vary` value).
fn set_from_text(job: &mut Map<String, Value>, name: &str, value: &str) -> Result<(), String> {
    if JOB_COLUMNS.contains(&name) {
        let value = if name == "n" {
            Value::from(
                value
                    .parse::<u64>()
                    .map_err(|_| format!("n = {value:?} is not a whole number"))?,
            )
        } else {
            Value::String(value.to_string())
        };
        job.insert(name.to_string(), value);
    } else {
        let metadata = job
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = metadata {
            m.insert(name.to_string(), Value::String(value.to_string()));
        }
    }
    Ok(())
}

/// One job object from a row and a combination of variations.
fn shape_job(
    row: &Row,
    combo: &[(&str, &str)],
    shape: &Shape,
) -> Result<Map<String, Value>, String> {
    let mut job = if row.from_columns {
        let mut job = Map::new();
        for (name, value) in &row.object {
            if let Value::String(v) = value {
                set_from_text(&mut job, name, v)?;
            }
        }
        job
    } else {
        row.object.clone()
    };
    for (name, value) in combo {
        set_from_text(&mut job, name, value)?;
    }
    if let Some(template) = &shape.template {
        let text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        let prompt = fill_template(template, |name| {
            combo
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
                .or_else(|| row.object.get(name).and_then(text))
                .or_else(|| job.get(name).and_then(text))
                .or_else(|| job.get("metadata")?.get(name).and_then(text))
        })?;
        job.insert("prompt".into(), Value::String(prompt));
    }
    if !job.contains_key("prompt") {
        return Err(if row.from_columns {
            "no prompt: add a `prompt` column or give --template".into()
        } else {
            "no prompt".into()
        });
    }
    Ok(job)
}

/// Turns the rows of a file (times the variations) into validated jobs with deterministic ids.
/// Blank lines are skipped.
pub fn prepare(
    text: &str,
    format: InputFormat,
    batch: Option<&str>,
    shape: &Shape,
    rules: &JobRules,
) -> Prepared {
    let mut out = Prepared::default();
    let rows = rows(text, format, &mut out.errors);
    expand(rows, batch, shape, rules, out)
}

/// The jobs of a template and variations alone, without an input file.
pub fn prepare_without_file(batch: Option<&str>, shape: &Shape, rules: &JobRules) -> Prepared {
    let row = Row {
        line: 0,
        object: Map::new(),
        from_columns: true,
    };
    expand(vec![row], batch, shape, rules, Prepared::default())
}

/// How many jobs `prepare` would make, before making them (rows x variations).
pub fn count(text: &str, format: InputFormat, shape: &Shape) -> usize {
    rows(text, format, &mut Vec::new()).len() * shape.variations()
}

fn expand(
    rows: Vec<Row>,
    batch: Option<&str>,
    shape: &Shape,
    rules: &JobRules,
    mut out: Prepared,
) -> Prepared {
    // Occurrences of each distinct job, keyed by its first id (which is order-independent).
    let mut seen: HashMap<String, u32> = HashMap::new();
    let combinations = shape.combinations();
    for row in &rows {
        let line = row.line;
        for combo in &combinations {
            let mut error = |message: String| out.errors.push(LineError { line, message });
            let mut object = match shape_job(row, combo, shape) {
                Ok(o) => o,
                Err(e) => {
                    error(e);
                    continue;
                }
            };
            match (object.get("batch"), batch) {
                (Some(Value::String(own)), Some(given)) if own != given => {
                    error(format!(
                        "the job's batch {own:?} differs from --batch {given:?}"
                    ));
                    continue;
                }
                (None, Some(given)) => {
                    object.insert("batch".into(), Value::String(given.to_string()));
                }
                _ => {}
            }
            let job_batch = object
                .get("batch")
                .and_then(Value::as_str)
                .map(str::to_string);
            if !object.contains_key("id") {
                let canonical = Value::Object(object.clone());
                let occurrence = seen
                    .entry(derive_id(job_batch.as_deref(), &canonical, 0))
                    .or_insert(0);
                let id = derive_id(job_batch.as_deref(), &canonical, *occurrence);
                *occurrence += 1;
                object.insert("id".into(), Value::String(id));
            }
            let body = Value::Object(object);
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            match Job::parse(&bytes, None, rules) {
                Ok(job) => out.jobs.push(PreparedJob {
                    line,
                    id: job.id,
                    body,
                }),
                Err(invalid) => error(invalid.message),
            }
        }
    }
    out.errors.sort_by_key(|e| e.line);
    out
}

/// What `imagegen enqueue` was asked to do.
#[derive(Debug)]
pub struct EnqueueRequest {
    pub file: Option<PathBuf>,
    pub batch: Option<String>,
    pub format: InputFormat,
    pub shape: Shape,
    pub max_jobs: usize,
    pub dry_run: bool,
    pub yes: bool,
    pub json: bool,
}

/// Exit code: published, but some input lines were invalid (or jobs failed, for other commands).
pub const EXIT_PARTIAL: u8 = 3;
/// Exit code: a usage problem (bad arguments, a guard tripped, no confirmation).
pub const EXIT_USAGE: u8 = 2;

/// Reads the input (or only the template and variations), checks the job count against
/// `max_jobs`, and returns the prepared jobs; errors are printed with their line numbers.
pub fn read_input(
    settings: &Settings,
    file: Option<&Path>,
    batch: Option<&str>,
    format: InputFormat,
    shape: &Shape,
    max_jobs: usize,
) -> Result<Prepared, InputError> {
    if let Some(b) = batch
        && !crate::job::is_valid_name(b)
    {
        return Err(InputError::Usage(format!(
            "--batch {b:?} must be 1-128 characters of [A-Za-z0-9._-]"
        )));
    }
    let rules = JobRules::from_settings(settings);
    let (count, text, format) = match file {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                InputError::Other(anyhow::anyhow!("cannot read {}: {e}", file.display()))
            })?;
            let format = match format {
                InputFormat::Auto => detect_format(file, &text),
                f => f,
            };
            (count(&text, format, shape), Some(text), format)
        }
        None if shape.template.is_some() => (shape.variations(), None, format),
        None => {
            return Err(InputError::Usage(
                "give an input file, or --template (with --vary) to make jobs without one".into(),
            ));
        }
    };
    if shape.variations() > 1 {
        eprintln!(
            "{count} jobs: {} input rows x {} variations",
            count / shape.variations().max(1),
            shape.variations()
        );
    }
    if count > max_jobs {
        return Err(InputError::Usage(format!(
            "{count} jobs is more than --max-jobs {max_jobs}: check the --vary lists, or raise --max-jobs"
        )));
    }
    let prepared = match &text {
        Some(text) => prepare(text, format, batch, shape, &rules),
        None => prepare_without_file(batch, shape, &rules),
    };
    let name = file.map_or_else(|| "--template".to_string(), |f| f.display().to_string());
    for e in &prepared.errors {
        eprintln!("{name}:{}: {}", e.line, e.message);
    }
    Ok(prepared)
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What the jobs will cost by the price table, if it knows their models (no usage yet: an
/// estimate from size and quality).
pub fn estimate(settings: &Settings, jobs: &[PreparedJob]) -> Option<f64> {
    let rules = JobRules::from_settings(settings);
    let mut total = 0.0;
    for job in jobs {
        let bytes = serde_json::to_vec(&job.body).ok()?;
        let parsed = Job::parse(&bytes, None, &rules).ok()?;
        let cost = settings.pricing.cost(crate::cost::Purchase {
            model: &parsed.model,
            size: &parsed.size,
            quality: &parsed.quality,
            prompt: &parsed.prompt,
            images: parsed.n as u32,
            usage: None,
        })?;
        total += cost.usd;
    }
    Some(total)
}

/// Records the jobs in their batches' records, so that `watch`, `status` and `gallery` know
/// each batch's size and prompts.
pub async fn record_batches(
    settings: &Settings,
    jobs: &[PreparedJob],
    estimated: Option<f64>,
) -> anyhow::Result<()> {
    let mut per_batch: BTreeMap<String, Vec<(String, crate::batch::BatchJob)>> = BTreeMap::new();
    let rules = JobRules::from_settings(settings);
    for job in jobs {
        let bytes = serde_json::to_vec(&job.body)?;
        let Ok(parsed) = Job::parse(&bytes, None, &rules) else {
            continue;
        };
        let Some(batch) = parsed.batch.clone() else {
            continue;
        };
        per_batch.entry(batch).or_default().push((
            parsed.id.clone(),
            crate::batch::BatchJob {
                prompt: parsed.prompt,
                n: parsed.n as u32,
                size: parsed.size,
                model: parsed.model,
            },
        ));
    }
    if per_batch.is_empty() {
        return Ok(());
    }
    let store = crate::storage::from_settings(settings).await?;
    let single = per_batch.len() == 1;
    for (batch, jobs) in per_batch {
        crate::batch::record_jobs(
            &*store,
            &settings.storage.prefix,
            &batch,
            jobs,
            estimated.filter(|_| single),
        )
        .await
        .with_context(|| format!("the record of batch {batch} could not be written"))?;
    }
    Ok(())
}

/// `imagegen enqueue`.
pub async fn command(settings: &Settings, request: EnqueueRequest) -> anyhow::Result<ExitCode> {
    let prepared = match read_input(
        settings,
        request.file.as_deref(),
        request.batch.as_deref(),
        request.format,
        &request.shape,
        request.max_jobs,
    ) {
        Ok(p) => p,
        Err(InputError::Usage(message)) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Err(InputError::Other(e)) => return Err(e),
    };
    let estimated = estimate(settings, &prepared.jobs);
    let images: u64 = prepared
        .jobs
        .iter()
        .map(|j| j.body.get("n").and_then(Value::as_u64).unwrap_or(1))
        .sum();
    let cost_text = match estimated {
        Some(usd) => format!(", estimated ${usd:.2}"),
        None => String::new(),
    };
    if request.dry_run {
        for job in &prepared.jobs {
            println!("{}", serde_json::to_string(&job.body)?);
        }
        eprintln!(
            "{} jobs ({images} images{cost_text}) would be published; {} invalid lines",
            prepared.jobs.len(),
            prepared.errors.len()
        );
        return Ok(exit_for(&prepared));
    }
    if prepared.jobs.is_empty() {
        eprintln!("error: no valid job to publish");
        return Ok(ExitCode::from(EXIT_PARTIAL));
    }
    if let Some(usd) = estimated.filter(|usd| *usd > 0.0)
        && !request.yes
    {
        let question = format!(
            "Publish {} jobs ({images} images, estimated ${usd:.2}) to {}?",
            prepared.jobs.len(),
            settings.amqp.jobs_queue
        );
        if !std::io::stdin().is_terminal() {
            eprintln!("error: {question} Pass --yes to confirm without a prompt.");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        eprint!("{question} [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing published");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }
    record_batches(settings, &prepared.jobs, estimated).await?;
    let bar = progress_bar(prepared.jobs.len() as u64, "publishing");
    let started = std::time::Instant::now();
    let published = publish(settings, &prepared.jobs, |n| bar.set_position(n as u64)).await;
    bar.finish_and_clear();
    let published = published?;
    let batches: std::collections::BTreeSet<&str> = prepared
        .jobs
        .iter()
        .filter_map(|j| j.body.get("batch").and_then(Value::as_str))
        .collect();
    if request.json {
        let summary = serde_json::json!({
            "published": published,
            "images": images,
            "invalid_lines": prepared.errors.len(),
            "queue": settings.amqp.jobs_queue,
            "batches": batches,
            "estimated_usd": estimated,
        });
        println!("{summary}");
    }
    eprintln!(
        "published {published} jobs ({images} images{cost_text}) to {} with confirms in {:.1} s{}; {} invalid lines not published",
        settings.amqp.jobs_queue,
        started.elapsed().as_secs_f64(),
        match batches.len() {
            0 => String::new(),
            _ => format!(
                " (batch {})",
                batches.into_iter().collect::<Vec<_>>().join(", ")
            ),
        },
        prepared.errors.len()
    );
    Ok(exit_for(&prepared))
}

fn exit_for(prepared: &Prepared) -> ExitCode {
    if prepared.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PARTIAL)
    }
}

/// A progress bar on stderr; hidden when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// Publishes jobs to the jobs queue with confirms. Returns how many were confirmed; stops at the
/// first publish the broker does not confirm.
pub async fn publish(
    settings: &Settings,
    jobs: &[PreparedJob],
    mut progress: impl FnMut(usize),
) -> anyhow::Result<usize> {
    let connection = Arc::new(connect(settings, "enqueue").await?);
    if settings.amqp.declare_topology {
        topology::declare(&connection, settings).await?;
    }
    let publisher = Publisher::new(connection.clone());
    let queue = settings.amqp.jobs_queue.as_str();
    let mut confirmed = 0;
    let mut results = futures_util::stream::iter(jobs)
        .map(|job| {
            let publisher = &publisher;
            async move {
                let payload = serde_json::to_vec(&job.body)?;
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(job.id.as_str().into())
                    .with_app_id("imagegen".into())
                    .with_timestamp(unix_now());
                publisher.publish("", queue, &payload, properties).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PUBLISH_WINDOW);
    let mut failure = None;
    while let Some(result) = results.next().await {
        match result {
            Ok(()) => {
                confirmed += 1;
                progress(confirmed);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(results);
    publisher.close().await;
    let _ = connection.close(200, "enqueued".into()).await;
    match failure {
        Some(e) => Err(e.context(format!(
            "{confirmed} of {} jobs were confirmed before the failure",
            jobs.len()
        ))),
        None => Ok(confirmed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> JobRules {
        let settings = Settings::load(&crate::config::Sources::default()).unwrap();
        JobRules::from_settings(&settings)
    }

    #[test]
    fn text_lines_become_jobs_with_stable_distinct_ids() {
        let text = "a red fox\n\n  a blue whale  \na red fox\n";
        let a = prepare(
            text,
            InputFormat::Text,
            Some("b1"),
            &Shape::default(),
            &rules(),
        );
        assert!(a.errors.is_empty());
        assert_eq!(a.jobs.len(), 3);
        assert_eq!(a.jobs[1].body["prompt"], "a blue whale");
        assert_eq!(a.jobs[1].line, 3);
        // The same prompt twice: two jobs, two ids (occurrence numbers differ).
        assert_ne!(a.jobs[0].id, a.jobs[2].id);
        // Enqueueing again gives the same ids.
        let b = prepare(
            text,
            InputFormat::Text,
            Some("b1"),
            &Shape::default(),
            &rules(),
        );
        let ids = |p: &Prepared| p.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        // Another batch, other ids.
        assert_ne!(
            ids(&a),
            ids(&prepare(
                text,
                InputFormat::Text,
                Some("b2"),
                &Shape::default(),
                &rules()
            ))
        );
    }

    #[test]
    fn jsonl_keeps_explicit_ids_and_reports_bad_lines() {
        let text = r#"{"id":"own-id","prompt":"p1"}
{"prompt":"p2","size":"1536x1024"}
not json
{"prompt":"p3","sise":"1x1"}
{"prompt":"p4","batch":"other"}
[1]
{"prompt":"p5","n":3}
"#;
        let p = prepare(
            text,
            InputFormat::Jsonl,
            Some("b"),
            &Shape::default(),
            &rules(),
        );
        let ids: Vec<_> = p.jobs.iter().map(|j| (j.line, j.id.as_str())).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[0], (1, "own-id"));
        assert_eq!(ids[1].0, 2);
        assert_eq!(ids[2].0, 7);
        assert_eq!(p.jobs[1].body["batch"], "b");
        let lines: Vec<usize> = p.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6]);
        assert!(p.errors[1].message.contains("sise"));
    }

    #[test]
    fn key_order_does_not_change_the_id() {
        let a = prepare(
            r#"{"prompt":"p","size":"1024x1536"}"#,
            InputFormat::Jsonl,
            None,
            &Shape::default(),
            &rules(),
        );
        let b = prepare(
            r#"{"size":"1024x1536","prompt":"p"}"#,
            InputFormat::Jsonl,
            None,
            &Shape::default(),
            &rules(),
        );
        assert_eq!(a.jobs[0].id, b.jobs[0].id);
    }

    fn shape(template: Option<&str>, vary: &[&str]) -> Shape {
        Shape {
            template: template.map(str::to_string),
            vary: vary.iter().map(|v| parse_vary(v).unwrap()).collect(),
        }
    }

    #[test]
    fn csv_columns_map_to_fields_and_the_rest_to_metadata() {
        let text = "prompt,size,n,quality,sku,notes\n\
                    a red fox,1536x1024,2,high,SKU-1,\n\
                    \n\
                    \"a cat, sitting\",,1,,SKU-2,cute\n\
                    a dog,,two,,SKU-3,\n";
        let p = prepare(
            text,
            InputFormat::Csv,
            Some("cat"),
            &Shape::default(),
            &rules(),
        );
        assert_eq!(p.jobs.len(), 2, "{:?}", p.errors);
        let fox = &p.jobs[0].body;
        assert_eq!(fox["prompt"], "a red fox");
        assert_eq!(fox["size"], "1536x1024");
        assert_eq!(fox["n"], 2);
        assert_eq!(fox["quality"], "high");
        assert_eq!(fox["metadata"], serde_json::json!({"sku": "SKU-1"}));
        assert_eq!(fox["batch"], "cat");
        assert_eq!(p.jobs[0].line, 2);
        let cat = &p.jobs[1].body;
        assert_eq!(cat["prompt"], "a cat, sitting");
        assert!(cat.get("size").is_none(), "an empty cell is no value");
        assert_eq!(
            cat["metadata"],
            serde_json::json!({"sku": "SKU-2", "notes": "cute"})
        );
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].line, 5);
        assert!(p.errors[0].message.contains("two"), "{:?}", p.errors);
    }

    #[test]
    fn a_template_fills_from_columns_and_a_missing_prompt_is_an_error() {
        let text = "subject,style\nfox,watercolor\nowl,ink\n";
        let t = shape(Some("a {subject} in {style}, {{signed}}"), &[]);
        let p = prepare(text, InputFormat::Csv, None, &t, &rules());
        let prompts: Vec<_> = p.jobs.iter().map(|j| j.body["prompt"].clone()).collect();
        assert_eq!(
            prompts,
            [
                serde_json::json!("a fox in watercolor, {signed}"),
                serde_json::json!("a owl in ink, {signed}")
            ]
        );
        assert_eq!(p.jobs[0].body["metadata"]["subject"], "fox");
        let bad = prepare(
            text,
            InputFormat::Csv,
            None,
            &shape(Some("a {animal}"), &[]),
            &rules(),
        );
        assert!(bad.jobs.is_empty());
        assert!(
            bad.errors[0].message.contains("{animal}"),
            "{:?}",
            bad.errors
        );
        let none = prepare(text, InputFormat::Csv, None, &Shape::default(), &rules());
        assert!(
            none.errors[0].message.contains("no prompt"),
            "{:?}",
            none.errors
        );
    }

    #[test]
    fn variations_expand_the_cross_product_with_stable_ids() {
        let s = shape(
            Some("pixel-art background, {biome}, {time}"),
            &["biome=forest,desert,snow", "time=day,night"],
        );
        assert_eq!(s.variations(), 6);
        let a = prepare_without_file(Some("levels"), &s, &rules());
        assert!(a.errors.is_empty(), "{:?}", a.errors);
        let prompts: Vec<_> = a
            .jobs
            .iter()
            .map(|j| j.body["prompt"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(prompts[0], "pixel-art background, forest, day");
        assert_eq!(prompts[1], "pixel-art background, forest, night");
        assert_eq!(prompts[5], "pixel-art background, snow, night");
        assert_eq!(
            a.jobs[5].body["metadata"],
            serde_json::json!({"biome": "snow", "time": "night"})
        );
        let ids: std::collections::HashSet<_> = a.jobs.iter().map(|j| j.id.clone()).collect();
        assert_eq!(ids.len(), 6);
        let b = prepare_without_file(Some("levels"), &s, &rules());
        assert_eq!(
            a.jobs.iter().map(|j| &j.id).collect::<Vec<_>>(),
            b.jobs.iter().map(|j| &j.id).collect::<Vec<_>>()
        );
        // A variation of a job field sets the field; rows x variations.
        let rows = "a cat\na dog\n";
        let sized = shape(None, &["size=1024x1024,1536x1024"]);
        assert_eq!(count(rows, InputFormat::Text, &sized), 4);
        let p = prepare(rows, InputFormat::Text, None, &sized, &rules());
        assert_eq!(p.jobs.len(), 4);
        assert_eq!(p.jobs[1].body["size"], "1536x1024");
        assert!(parse_vary("biome").is_err());
        assert!(parse_vary("biome=").is_err());
        assert!(parse_vary("bad name=x").is_err());
    }

    #[test]
    fn format_detection() {
        use std::path::Path;
        assert_eq!(detect_format(Path::new("x.jsonl"), "a"), InputFormat::Jsonl);
        assert_eq!(detect_format(Path::new("x.txt"), "{"), InputFormat::Text);
        assert_eq!(
            detect_format(Path::new("x.csv"), "prompt"),
            InputFormat::Csv
        );
        assert_eq!(
            detect_format(Path::new("x"), "\n {\"prompt\":1}"),
            InputFormat::Jsonl
        );
        assert_eq!(detect_format(Path::new("x"), "a cat"), InputFormat::Text);
    }
}
