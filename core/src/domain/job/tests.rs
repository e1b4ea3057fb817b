use super::*;
use serde_json::json;

fn rules() -> JobRules {
    JobRules {
        max_message_bytes: 4096,
        max_prompt_chars: 100,
        max_metadata_bytes: 64,
        providers: vec!["openai".into(), "flux".into()],
    }
}

fn parse(v: Value) -> Result<Job, InvalidJob> {
    Job::parse(&serde_json::to_vec(&v).unwrap(), None, &rules())
}

#[test]
fn a_minimal_job_leaves_the_defaults_to_its_provider() {
    let job = parse(json!({"id": "a-1", "prompt": "a red fox"})).unwrap();
    assert_eq!(job.model, None);
    assert_eq!(job.provider, None);
    assert_eq!(job.n, 1);
    assert_eq!(job.metadata, Value::Null);
    assert_eq!(job.dir(""), "images/_/a-1");
}

#[test]
fn full_job_keeps_its_open_strings() {
    let job = parse(json!({
        "version": 1, "id": "x", "batch": "b.2", "prompt": "p", "model": "gpt-image-2.6-new",
        "size": "2048x1152", "quality": "xhigh", "output_format": "webp", "background": "transparent",
        "n": 3, "params": {"user": "u1", "moderation": "low"}, "metadata": {"row": 7}
    }))
    .unwrap();
    assert_eq!(job.model.as_deref(), Some("gpt-image-2.6-new"));
    assert_eq!(job.quality.as_deref(), Some("xhigh"));
    assert_eq!(job.n, 3);
    assert_eq!(job.params["moderation"], "low");
    assert_eq!(job.metadata, json!({"row": 7}));
    assert_eq!(job.dir("p/"), "p/images/b.2/x");
}

#[test]
fn version_2_fields_name_a_configured_provider_a_negative_prompt_and_a_seed() {
    let job = parse(json!({
        "version": 2, "id": "x", "prompt": "p", "provider": "flux",
        "negative_prompt": "text, watermark", "seed": 42
    }))
    .unwrap();
    assert_eq!(job.provider.as_deref(), Some("flux"));
    assert_eq!(job.negative_prompt.as_deref(), Some("text, watermark"));
    assert_eq!(job.seed, Some(42));
    let err = parse(json!({"id": "x", "prompt": "p", "provider": "dalle"})).unwrap_err();
    assert!(
        err.message
            .contains("\"dalle\" is not a configured provider (configured: openai, flux)"),
        "{}",
        err.message
    );
    assert_eq!(err.job_id, "x");
}

#[test]
fn message_id_is_the_fallback_id() {
    let job = Job::parse(br#"{"prompt":"p"}"#, Some("mid-9"), &rules()).unwrap();
    assert_eq!(job.id, "mid-9");
    let err = Job::parse(br#"{"prompt":"p"}"#, None, &rules()).unwrap_err();
    assert!(err.message.contains("no `id`"), "{}", err.message);
}

#[test]
fn bad_inputs_are_invalid_with_a_useful_message() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "not JSON"),
        (vec![0xff, 0xfe, b'{'], "not UTF-8"),
        (b"[1,2]".to_vec(), "JSON object"),
        (br#"{"id":"a","prompt":5}"#.to_vec(), "invalid type"),
        (br#"{"id":"a"}"#.to_vec(), "`prompt` is required"),
        (br#"{"id":"a","prompt":"   "}"#.to_vec(), "empty"),
        (
            br#"{"id":"a","prompt":"p","sise":"1x1"}"#.to_vec(),
            "unknown field `sise`",
        ),
        (br#"{"id":"a","prompt":"p","n":0}"#.to_vec(), "`n` is 0"),
        (br#"{"id":"a","prompt":"p","n":11}"#.to_vec(), "`n` is 11"),
        (br#"{"id":"a/b","prompt":"p"}"#.to_vec(), "must be 1-128"),
        (br#"{"id":"..","prompt":"p"}"#.to_vec(), "must be 1-128"),
        (br#"{"id":"a b","prompt":"p"}"#.to_vec(), "must be 1-128"),
        (
            br#"{"id":"a","batch":"../x","prompt":"p"}"#.to_vec(),
            "batch",
        ),
        (
            br#"{"id":"a","prompt":"p","params":{"model":"x"}}"#.to_vec(),
            "params.model",
        ),
        (
            br#"{"id":"a","prompt":"p","params":{"stream":true}}"#.to_vec(),
            "params.stream",
        ),
        (
            br#"{"id":"a","prompt":"p","version":4}"#.to_vec(),
            "version 4",
        ),
        (br#"{"id":"a","prompt":"p","seed":-1}"#.to_vec(), "seed"),
        (br#"{"id":"a","prompt":"p","size":""}"#.to_vec(), "`size`"),
        // A second value of a field is not a silent override.
        (
            br#"{"id":"a","prompt":"p","n":1,"n":10}"#.to_vec(),
            "duplicate key \"n\"",
        ),
        (
            br#"{"id":"a","prompt":"p","params":{"user":"u","user":"v"}}"#.to_vec(),
            "duplicate key \"user\"",
        ),
        // null is not a field left out; version 0 does not exist.
        (
            br#"{"id":"a","prompt":"p","model":null}"#.to_vec(),
            "`model` is null",
        ),
        (
            br#"{"id":"a","prompt":"p","n":null}"#.to_vec(),
            "`n` is null",
        ),
        (
            br#"{"id":"a","prompt":"p","version":0}"#.to_vec(),
            "version 0",
        ),
        // `_` is the directory of jobs without a batch.
        (
            br#"{"id":"a","batch":"_","prompt":"p"}"#.to_vec(),
            "reserved",
        ),
    ];
    for (body, expected) in cases {
        let err = Job::parse(&body, None, &rules()).expect_err(&String::from_utf8_lossy(&body));
        assert!(
            err.message.contains(expected),
            "{:?}: {}",
            String::from_utf8_lossy(&body),
            err.message
        );
        assert!(is_valid_name(&err.job_id), "{}", err.job_id);
    }
}

#[test]
fn metadata_is_accepted_only_as_deep_as_its_record_can_be_read_back() {
    let nested = |levels: usize| {
        let mut text = String::from("1");
        for _ in 0..levels {
            text = format!("{{\"k\":{text}}}");
        }
        format!(r#"{{"id":"deep","prompt":"p","metadata":{text}}}"#)
    };
    let roomy = JobRules {
        max_metadata_bytes: 4096,
        ..rules()
    };
    let err =
        Job::parse(nested(MAX_METADATA_DEPTH + 1).as_bytes(), None, &roomy).expect_err("too deep");
    assert!(err.message.contains("levels deep"), "{}", err.message);
    let job = Job::parse(nested(MAX_METADATA_DEPTH).as_bytes(), None, &roomy).unwrap();
    // The record that carries it is read back as it was written.
    let data = crate::domain::event::ResultData {
        schema_version: 1,
        job_id: job.id.clone(),
        batch: None,
        status: crate::domain::event::Status::Succeeded,
        images: Vec::new(),
        error: None,
        attempts: 1,
        possibly_billed: 0,
        model: None,
        revised_prompt: None,
        usage: None,
        cost_usd: None,
        cost_estimated: false,
        duration_ms: 1,
        provider_request_id: None,
        refusal: None,
        metadata: job.metadata.clone(),
        job_fingerprint: Some(job.fingerprint()),
        message_id: None,
        correlation_id: None,
        provider: None,
        providers_tried: Vec::new(),
        cost_by_provider: None,
        background_ignored: false,
        references: Vec::new(),
        mask: None,
        lane: Some("batch".into()),
        provider_batch: Some("batch_1".into()),
    };
    let event = crate::domain::event::CloudEvent::new("src", data);
    let record = serde_json::to_vec(&event).unwrap();
    let back: crate::domain::event::CloudEvent = serde_json::from_slice(&record).unwrap();
    assert_eq!(back, event);
}

#[test]
fn metadata_is_kept_as_written_byte_for_byte() {
    let written = r#"{ "z": 1, "a": 1e29, "b": 100.0, "c": -0.0, "s": "\u00e9", "n": [1.50] }"#;
    let body = format!(r#"{{"id":"m","prompt":"p","metadata":{written}}}"#);
    let job = Job::parse(body.as_bytes(), None, &rules_with_room()).unwrap();
    assert_eq!(job.metadata.get(), written);
    // An invalid job echoes it the same way.
    let body = format!(r#"{{"id":"m","prompt":"","metadata":{written}}}"#);
    let invalid = Job::parse(body.as_bytes(), None, &rules_with_room()).unwrap_err();
    assert_eq!(invalid.metadata.get(), written);
}

fn rules_with_room() -> JobRules {
    JobRules {
        max_metadata_bytes: 4096,
        ..rules()
    }
}

#[test]
fn what_a_producer_wrote_reaches_messages_only_escaped() {
    let body = "{\"id\":\"a\",\"prompt\":\"p\",\"x\\u001b[2J\\n\":1}";
    let err = Job::parse(body.as_bytes(), None, &rules()).unwrap_err();
    assert!(err.message.contains("x\\u{1b}[2J\\n"), "{}", err.message);
    assert!(
        !err.message.chars().any(char::is_control),
        "{:?}",
        err.message
    );
}

#[test]
fn limits_are_enforced() {
    let long = "x".repeat(101);
    let err = parse(json!({"id": "a", "prompt": long})).unwrap_err();
    assert!(err.message.contains("max_prompt_chars"));
    let err =
        parse(json!({"id": "a", "prompt": "p", "metadata": {"k": "v".repeat(100)}})).unwrap_err();
    assert!(err.message.contains("max_metadata_bytes"));
    assert_eq!(err.job_id, "a");
    let big = vec![b' '; 5000];
    let err = Job::parse(&big, None, &rules()).unwrap_err();
    assert!(err.message.contains("max_message_bytes"));
}

#[test]
fn invalid_job_keeps_a_valid_id_and_replaces_a_bad_one() {
    let err = parse(json!({"id": "keep-me", "prompt": ""})).unwrap_err();
    assert_eq!(err.job_id, "keep-me");
    let err = parse(json!({"id": "../../etc", "prompt": "p"})).unwrap_err();
    assert!(err.job_id.starts_with("invalid-"));
    // Deterministic: the same body gives the same id.
    let again = parse(json!({"id": "../../etc", "prompt": "p"})).unwrap_err();
    assert_eq!(err.job_id, again.job_id);
}

#[test]
fn derived_ids_are_stable_and_distinct() {
    let job = json!({"prompt": "a cat", "size": "1024x1024"});
    let same = json!({"size": "1024x1024", "prompt": "a cat"});
    let a = derive_id(Some("b"), &job, 0);
    assert_eq!(a, derive_id(Some("b"), &same, 0));
    assert!(is_valid_name(&a));
    assert_ne!(a, derive_id(Some("b"), &job, 1));
    assert_ne!(a, derive_id(Some("c"), &job, 0));
    assert_ne!(a, derive_id(None, &job, 0));
}

#[test]
fn lane_is_live_or_batch_and_left_out_says_nothing() {
    assert_eq!(parse(json!({"id": "a", "prompt": "p"})).unwrap().lane, None);
    let batch = parse(json!({"id": "a", "prompt": "p", "lane": "batch"})).unwrap();
    assert_eq!(batch.lane, Some(Lane::Batch));
    let live = parse(json!({"id": "a", "prompt": "p", "lane": "live"})).unwrap();
    assert_eq!(live.lane, Some(Lane::Live));
    // The lane does not change what the job asks for.
    assert_eq!(batch.fingerprint(), live.fingerprint());
    let err = parse(json!({"id": "a", "prompt": "p", "lane": "slow"})).unwrap_err();
    assert!(err.message.contains("`lane`"), "{}", err.message);
}
