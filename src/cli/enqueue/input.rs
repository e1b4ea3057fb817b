//! From input rows to jobs: JSONL (one job object a line), CSV with a header (a `prompt` column,
//! or a template filled from the columns; columns named like job fields set them and the others
//! go to `metadata`), or plain text (one prompt a line), each row times its variations (the
//! cross product of `--vary` lists). Ids are deterministic (an explicit `id` wins, else a digest
//! of the batch, the canonical job and its occurrence in the file), so that enqueueing the same
//! file again finds the stored results instead of paying again. Bad lines are reported with
//! their line numbers.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::domain::job::{Job, JobRules, derive_id};

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
    "provider",
    "negative_prompt",
    "seed",
    "lane",
];

/// How rows become jobs: an optional prompt template and variations.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// `{name}` placeholders are filled from the row's columns (or fields, or metadata) and the
    /// variation's values.
    pub template: Option<String>,
    /// `--vary name=v1,v2`: each row becomes one job per combination of values.
    pub vary: Vec<(String, Vec<String>)>,
    /// `--provider NAME`: the configured provider of every job that names none.
    pub provider: Option<String>,
    /// `--reference FILE`: the store keys of files uploaded once, referenced by every job (its
    /// `images`).
    pub references: Vec<String>,
    /// `--lane`: the lane of every job that names none (`live` or `batch`).
    pub lane: Option<String>,
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
        let value = if name == "n" || name == "seed" {
            Value::from(
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{name} = {value:?} is not a whole number"))?,
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
            match (object.get("provider"), &shape.provider) {
                (Some(Value::String(own)), Some(given)) if own != given => {
                    error(format!(
                        "the job's provider {own:?} differs from --provider {given:?}"
                    ));
                    continue;
                }
                (None | Some(Value::Null), Some(given)) => {
                    object.insert("provider".into(), Value::String(given.clone()));
                }
                _ => {}
            }
            match (object.get("lane"), &shape.lane) {
                (Some(Value::String(own)), Some(given)) if own != given => {
                    error(format!(
                        "the job's lane {own:?} differs from --lane {given:?}"
                    ));
                    continue;
                }
                (None, Some(given)) => {
                    object.insert("lane".into(), Value::String(given.clone()));
                }
                _ => {}
            }
            if !shape.references.is_empty() {
                if object.contains_key("images") {
                    error("the job names its own images, and --reference gives some".into());
                    continue;
                }
                object.insert("images".into(), serde_json::json!(shape.references));
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

#[cfg(test)]
mod tests;
