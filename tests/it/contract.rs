//! The job contract has two statements, `schemas/job.schema.json` (what producers validate
//! against) and the worker's parser: on a corpus of jobs, valid and hostile, they must accept
//! the same set, except for the rules the schema's description lists as checked by the worker
//! beyond it (no key named twice, configured provider names).

use imagegen::domain::job::{Job, JobRules};
use serde_json::Value;

fn rules() -> JobRules {
    JobRules {
        max_message_bytes: 1 << 20,
        max_prompt_chars: 32_000,
        max_metadata_bytes: 16 * 1024,
        providers: vec!["main".into()],
    }
}

/// Jobs the schema and the parser must agree on, as producers write them.
const CORPUS: &[&str] = &[
    // Valid.
    r#"{"prompt":"p"}"#,
    r#"{"version":1,"id":"a","prompt":"p","n":1}"#,
    r#"{"version":2,"id":"a.b_c-1","batch":"b","provider":"main","prompt":"p","negative_prompt":"x",
        "seed":0,"model":"m","size":"1024x1024","quality":"high","output_format":"png",
        "background":"auto","n":10,"deadline":"2026-12-01T18:00:00Z","params":{"user":"u"},
        "metadata":{"k":[1,2,{"z":null}]}}"#,
    r#"{"prompt":"p","seed":18446744073709551615}"#,
    r#"{"prompt":"p","negative_prompt":"   "}"#,
    r#"{"prompt":"p","size":"éééééééééééééééééééééééééééééééééééééééé"}"#,
    r#"{"prompt":"p","params":{"N":1}}"#,
    // null is not a field left out.
    r#"{"prompt":"p","model":null}"#,
    r#"{"prompt":"p","n":null}"#,
    r#"{"prompt":"p","id":null}"#,
    r#"{"prompt":"p","batch":null}"#,
    r#"{"prompt":"p","version":null}"#,
    r#"{"prompt":"p","seed":null}"#,
    r#"{"prompt":"p","deadline":null}"#,
    r#"{"prompt":"p","params":null}"#,
    r#"{"prompt":"p","metadata":null}"#,
    r#"{"prompt":null}"#,
    // Versions.
    r#"{"prompt":"p","version":0}"#,
    r#"{"prompt":"p","version":3}"#,
    // Names.
    r#"{"prompt":"p","id":"a/b"}"#,
    r#"{"prompt":"p","id":".."}"#,
    r#"{"prompt":"p","id":""}"#,
    r#"{"prompt":"p","batch":"_"}"#,
    r#"{"prompt":"p","batch":"a b"}"#,
    r#"{"prompt":"p","provider":"Main"}"#,
    // Prompts and options.
    r#"{"prompt":""}"#,
    r#"{"prompt":"   "}"#,
    r#"{"prompt":5}"#,
    r#"{"prompt":"p","size":""}"#,
    r#"{"prompt":"p","size":"a\u0001b"}"#,
    r#"{"prompt":"p","quality":"ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé"}"#,
    r#"{"prompt":"p","n":0}"#,
    r#"{"prompt":"p","n":11}"#,
    r#"{"prompt":"p","n":1.5}"#,
    r#"{"prompt":"p","n":"2"}"#,
    r#"{"prompt":"p","seed":-1}"#,
    r#"{"prompt":"p","seed":1.5}"#,
    r#"{"prompt":"p","deadline":"tomorrow"}"#,
    r#"{"prompt":"p","params":{"model":"x"}}"#,
    r#"{"prompt":"p","params":[]}"#,
    r#"{"prompt":"p","metadata":[]}"#,
    r#"{"prompt":"p","metadata":"x"}"#,
    r#"{"prompt":"p","sise":"1x1"}"#,
    r#"[{"prompt":"p"}]"#,
    r#""p""#,
];

/// Jobs the schema cannot refuse and the worker does, by the rules the schema's description
/// names.
const WORKER_ONLY: &[&str] = &[
    r#"{"prompt":"p","n":1,"n":10}"#,
    r#"{"prompt":"p","params":{"user":"a","user":"b"}}"#,
    r#"{"prompt":"p","metadata":{"k":1,"k":2}}"#,
    r#"{"prompt":"p","provider":"other"}"#,
];

fn validator() -> jsonschema::Validator {
    let path = format!("{}/schemas/job.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles")
}

fn parsed(text: &str) -> Result<Job, String> {
    Job::parse(text.as_bytes(), Some("message-id"), &rules()).map_err(|e| e.message)
}

#[test]
fn the_schema_and_the_parser_accept_the_same_jobs() {
    let validator = validator();
    let mut disagreements = Vec::new();
    for text in CORPUS {
        let instance: Value = serde_json::from_str(text).unwrap();
        let schema = validator.is_valid(&instance);
        let parser = parsed(text);
        if schema != parser.is_ok() {
            disagreements.push(format!(
                "{text}\n  schema: {}, parser: {parser:?}",
                if schema { "valid" } else { "invalid" }
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "schema and parser disagree on:\n{}",
        disagreements.join("\n")
    );
}

#[test]
fn what_only_the_worker_checks_is_refused_by_it_alone() {
    let validator = validator();
    for text in WORKER_ONLY {
        let instance: Value = serde_json::from_str(text).unwrap();
        assert!(validator.is_valid(&instance), "schema: {text}");
        assert!(parsed(text).is_err(), "parser: {text}");
    }
}
