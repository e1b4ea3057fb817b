//! Reading job files and publishing their jobs with publisher confirms.
//!
//! Inputs: JSONL (one job object a line) or plain text (one prompt a line). Ids are deterministic
//! (an explicit `id` wins, else a digest of the batch, the canonical job and its occurrence in the
//! file), so that enqueueing the same file again finds the stored results instead of paying again.
//! Bad lines are reported with their line numbers and not published.

use std::collections::HashMap;
use std::sync::Arc;

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
    /// By extension (.jsonl/.ndjson: JSONL, .txt: text), else by the first line.
    Auto,
    Jsonl,
    Text,
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

/// Turns the lines of a file into validated jobs with deterministic ids. Blank lines are skipped.
pub fn prepare(text: &str, format: InputFormat, batch: Option<&str>, rules: &JobRules) -> Prepared {
    let mut out = Prepared::default();
    // Occurrences of each distinct job, keyed by its first id (which is order-independent).
    let mut seen: HashMap<String, u32> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        let mut error = |message: String| out.errors.push(LineError { line, message });
        let mut object = match format {
            InputFormat::Text => {
                let mut m = Map::new();
                m.insert("prompt".into(), Value::String(trimmed.to_string()));
                m
            }
            _ => match serde_json::from_str::<Value>(trimmed) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    error("a job must be a JSON object".into());
                    continue;
                }
                Err(e) => {
                    error(format!("not JSON: {e}"));
                    continue;
                }
            },
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
    out
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
        let a = prepare(text, InputFormat::Text, Some("b1"), &rules());
        assert!(a.errors.is_empty());
        assert_eq!(a.jobs.len(), 3);
        assert_eq!(a.jobs[1].body["prompt"], "a blue whale");
        assert_eq!(a.jobs[1].line, 3);
        // The same prompt twice: two jobs, two ids (occurrence numbers differ).
        assert_ne!(a.jobs[0].id, a.jobs[2].id);
        // Enqueueing again gives the same ids.
        let b = prepare(text, InputFormat::Text, Some("b1"), &rules());
        let ids = |p: &Prepared| p.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        // Another batch, other ids.
        assert_ne!(
            ids(&a),
            ids(&prepare(text, InputFormat::Text, Some("b2"), &rules()))
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
        let p = prepare(text, InputFormat::Jsonl, Some("b"), &rules());
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
            &rules(),
        );
        let b = prepare(
            r#"{"size":"1024x1536","prompt":"p"}"#,
            InputFormat::Jsonl,
            None,
            &rules(),
        );
        assert_eq!(a.jobs[0].id, b.jobs[0].id);
    }

    #[test]
    fn format_detection() {
        use std::path::Path;
        assert_eq!(detect_format(Path::new("x.jsonl"), "a"), InputFormat::Jsonl);
        assert_eq!(detect_format(Path::new("x.txt"), "{"), InputFormat::Text);
        assert_eq!(
            detect_format(Path::new("x"), "\n {\"prompt\":1}"),
            InputFormat::Jsonl
        );
        assert_eq!(detect_format(Path::new("x"), "a cat"), InputFormat::Text);
    }
}
