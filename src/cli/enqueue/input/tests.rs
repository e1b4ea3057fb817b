//! The reading of job files, templates and variations, tested on their own.

use super::*;

fn rules() -> JobRules {
    let settings = crate::config::Settings::load(&crate::config::Sources::default()).unwrap();
    settings.job_rules()
}

/// `text` read as JSON lines, shaped by `shape`.
fn jsonl(text: &str, shape: &Shape, rules: &JobRules) -> Prepared {
    prepare(text, InputFormat::Jsonl, None, shape, rules)
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
    let text = "{\"prompt\":\"a\"}\n{\"prompt\":\"b\",\"lane\":\"live\"}\n";
    let shape = Shape {
        lane: Some("batch".into()),
        ..Shape::default()
    };
    let p = jsonl(text, &shape, &rules());
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
    let p = jsonl(text, &shape, &settings.job_rules());
    assert_eq!(p.jobs.len(), 2, "{:?}", p.errors);
    assert!(p.jobs.iter().all(|j| j.body["provider"] == "other"));
    assert_eq!(p.errors.len(), 1);
    assert!(p.errors[0].message.contains("--provider"), "{:?}", p.errors);
    // Another provider, another job: the id changes with it.
    let plain = jsonl(text, &Shape::default(), &settings.job_rules());
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
