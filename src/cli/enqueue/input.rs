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
mod tests {
    use super::*;

    fn rules() -> JobRules {
        let settings = crate::config::Settings::load(&crate::config::Sources::default()).unwrap();
        settings.job_rules()
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
            provider: None,
            references: Vec::new(),
            lane: None,
        }
    }

    #[test]
    fn lane_sets_the_lane_of_jobs_that_name_none() {
        let settings =
            crate::config::Settings::load_with_overrides(&crate::config::Sources::default(), &[])
                .unwrap();
        let text = "{\"prompt\":\"a\"}\n{\"prompt\":\"b\",\"lane\":\"live\"}\n";
        let shape = Shape {
            lane: Some("batch".into()),
            ..Shape::default()
        };
        let p = prepare(
            text,
            InputFormat::Jsonl,
            None,
            &shape,
            &settings.job_rules(),
        );
        assert_eq!(p.jobs.len(), 1, "{:?}", p.errors);
        assert_eq!(p.jobs[0].body["lane"], "batch");
        assert!(p.errors[0].message.contains("--lane"), "{:?}", p.errors);
    }

    #[test]
    fn provider_sets_the_provider_of_jobs_that_name_none() {
        let settings = crate::config::Settings::load_with_overrides(
            &crate::config::Sources::default(),
            &[
                ("providers.main.kind", "placeholder".into()),
                ("providers.other.kind", "placeholder".into()),
                ("worker.default_provider", "main".into()),
            ],
        )
        .unwrap();
        let text = "{\"prompt\":\"a\"}\n{\"prompt\":\"b\",\"provider\":\"main\"}\n{\"prompt\":\"c\",\"provider\":\"other\"}\n";
        let shape = Shape {
            provider: Some("other".into()),
            ..Shape::default()
        };
        let p = prepare(
            text,
            InputFormat::Jsonl,
            None,
            &shape,
            &settings.job_rules(),
        );
        assert_eq!(p.jobs.len(), 2, "{:?}", p.errors);
        assert!(p.jobs.iter().all(|j| j.body["provider"] == "other"));
        assert_eq!(p.errors.len(), 1);
        assert!(p.errors[0].message.contains("--provider"), "{:?}", p.errors);
        // Another provider, another job: the id changes with it.
        let plain = prepare(
            text,
            InputFormat::Jsonl,
            None,
            &Shape::default(),
            &settings.job_rules(),
        );
        assert_ne!(plain.jobs[0].id, p.jobs[0].id);
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
