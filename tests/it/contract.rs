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
    // Whole numbers as some JSON libraries write them.
    r#"{"prompt":"p","n":2.0,"version":1.0,"seed":7.0}"#,
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
    r#"{"prompt":"p","version":4}"#,
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
    r#"{"prompt":"p","seed":1e20}"#,
    r#"{"prompt":"\u2028\u3000\ufeff"}"#,
    r#"{"prompt":"p","n":"2"}"#,
    r#"{"prompt":"p","seed":-1}"#,
    r#"{"prompt":"p","seed":1.5}"#,
    r#"{"prompt":"p","deadline":"tomorrow"}"#,
    // RFC 3339's date-time, as JSON Schema's format reads it: `T` (or `t`), an offset.
    r#"{"prompt":"p","deadline":"2026-12-01t18:00:00z"}"#,
    r#"{"prompt":"p","deadline":"2026-12-01T18:00:00.123+01:00"}"#,
    r#"{"prompt":"p","deadline":"2026-12-01 18:00:00Z"}"#,
    r#"{"prompt":"p","deadline":"2026-12-01_18:00:00Z"}"#,
    r#"{"prompt":"p","deadline":"2026-02-30T00:00:00Z"}"#,
    r#"{"prompt":"p","deadline":"2026-12-31T23:59:60Z"}"#,
    r#"{"prompt":"p","deadline":"2026-06-30T12:00:60Z"}"#,
    r#"{"prompt":"p","deadline":"2026-12-01T18:00:00"}"#,
    r#"{"prompt":"p","deadline":"2026-12-01T18:00:00+24:00"}"#,
    r#"{"prompt":"p","deadline":"2026-12-01"}"#,
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

/// The schema, compiled once.
fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: std::sync::LazyLock<jsonschema::Validator> =
        std::sync::LazyLock::new(compile);
    &VALIDATOR
}

fn compile() -> jsonschema::Validator {
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

/// A prompt of one character is refused by both when that character is white space, whatever
/// the character (every one of the first three planes, surrogates aside).
#[test]
fn the_schema_and_the_parser_agree_on_what_white_space_is() {
    let validator = validator();
    let disagree: Vec<String> = (0u32..0x30000)
        .filter_map(char::from_u32)
        .filter(|c| {
            let job = serde_json::json!({"prompt": c.to_string()});
            validator.is_valid(&job) != parsed(&job.to_string()).is_ok()
        })
        .map(|c| format!("U+{:04X}", c as u32))
        .collect();
    assert!(disagree.is_empty(), "disagree on {disagree:?}");
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

mod generated {
    //! The same agreement on generated jobs: each field absent, valid, or wrong in one of the
    //! ways producers get it wrong (type, range, length, pattern, control characters, null).

    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::{parsed, validator};

    fn pick(values: Vec<Value>) -> BoxedStrategy<Value> {
        prop::sample::select(values).boxed()
    }

    fn name() -> BoxedStrategy<Value> {
        prop_oneof![
            "[A-Za-z0-9._-]{1,12}".prop_map(Value::from),
            "[A-Za-z0-9._/ -]{0,6}".prop_map(Value::from),
            "[a-z]{126,130}".prop_map(Value::from),
            pick(vec![
                json!("."),
                json!(".."),
                json!("_"),
                json!(""),
                json!(5),
                Value::Null
            ]),
        ]
        .boxed()
    }

    fn text() -> BoxedStrategy<Value> {
        prop_oneof![
            "\\PC{0,8}".prop_map(Value::from),
            "[ \t\n]{0,3}".prop_map(Value::from),
            pick(
                [
                    "\u{a0}", "\u{feff}", "\u{2028}", "\u{85}", "\u{200b}", "\u{3000}", " a "
                ]
                .into_iter()
                .map(Value::from)
                .collect()
            ),
            pick(vec![json!(5), Value::Null, json!(["p"])]),
        ]
        .boxed()
    }

    fn option() -> BoxedStrategy<Value> {
        prop_oneof![
            "[a-z0-9:x]{1,10}".prop_map(Value::from),
            "[a-zé]{63,66}".prop_map(Value::from),
            "[a-z]{0,2}[\u{0}-\u{1f}\u{7f}-\u{9f}][a-z]{0,2}".prop_map(Value::from),
            pick(vec![json!(""), json!(5), Value::Null, json!(true)]),
        ]
        .boxed()
    }

    fn number(valid: std::ops::RangeInclusive<i64>) -> BoxedStrategy<Value> {
        prop_oneof![
            (valid.start() - 2..=valid.end() + 2).prop_map(Value::from),
            pick(vec![
                json!(1.0),
                json!(1.5),
                json!(-0.0),
                json!("1"),
                json!(u64::MAX),
                json!(1e20),
                Value::Null
            ]),
        ]
        .boxed()
    }

    fn deadline() -> BoxedStrategy<Value> {
        pick(
            [
                "2026-12-01T18:00:00Z",
                "2026-12-01T18:00:00.123+01:00",
                "2026-12-01t18:00:00z",
                "2026-12-01 18:00:00Z",
                "2026-02-30T00:00:00Z",
                "2026-12-31T23:59:60Z",
                "2026-12-01T18:00:00",
                "2026-12-01",
                "tomorrow",
            ]
            .into_iter()
            .map(Value::from)
            .chain([json!(5), Value::Null])
            .collect(),
        )
    }

    fn object(keys: &[&'static str]) -> BoxedStrategy<Value> {
        let key = prop::sample::select(keys.to_vec());
        prop_oneof![
            prop::collection::btree_map(key, pick(vec![json!("v"), json!(1), Value::Null]), 0..3)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.into(), v)).collect())),
            pick(vec![json!([]), json!("x"), Value::Null]),
        ]
        .boxed()
    }

    /// A job: each field absent (`None`) or drawn from its strategy.
    fn job() -> impl Strategy<Value = Value> {
        let fields: Vec<(&str, BoxedStrategy<Value>)> = vec![
            ("version", number(1..=2)),
            ("id", name()),
            ("prompt", text()),
            ("batch", name()),
            (
                "provider",
                pick(vec![json!("main"), json!("Main"), json!(""), json!(7)]),
            ),
            ("negative_prompt", text()),
            ("seed", number(0..=3)),
            ("model", option()),
            ("size", option()),
            ("quality", option()),
            ("output_format", option()),
            ("background", option()),
            ("n", number(1..=10)),
            ("deadline", deadline()),
            (
                "params",
                object(&["user", "moderation", "model", "stream", "N", "size"]),
            ),
            ("metadata", object(&["k", "nested", "user"])),
            ("sise", pick(vec![json!("1x1")])),
        ];
        let (names, strategies): (Vec<_>, Vec<_>) = fields
            .into_iter()
            .map(|(name, s)| {
                // The prompt is there most of the time, every other field a third of it, and
                // the unknown field rarely.
                let weight = match name {
                    "prompt" => 0.9,
                    "sise" => 0.05,
                    _ => 0.35,
                };
                (name, proptest::option::weighted(weight, s))
            })
            .unzip();
        strategies.prop_map(move |values| {
            let mut job = Map::new();
            for (name, value) in names.iter().zip(values) {
                if let Some(value) = value {
                    job.insert((*name).to_string(), value);
                }
            }
            Value::Object(job)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn the_schema_and_the_parser_accept_the_same_generated_jobs(job in job()) {
            let text = serde_json::to_string(&job).unwrap();
            let schema = validator().is_valid(&job);
            let parser = parsed(&text);
            prop_assert_eq!(schema, parser.is_ok(), "{}\n  parser: {:?}", text, parser);
        }
    }
}
