//! The request body of the Images API and the usage read from its answers (or estimated).

use super::*;

#[test]
fn params_pass_through_and_worker_fields_win() {
    let settings = crate::config::Settings::load_with_overrides(
        &crate::config::Sources::default(),
        &[
            ("providers.openai.kind", "openai".into()),
            ("providers.openai.api_key", "sk-test".into()),
        ],
    )
    .unwrap();
    let crate::config::KindSettings::Openai(openai) = &settings.default_provider().kind else {
        panic!("kind openai")
    };
    let provider = OpenAi::new(openai, BufferPool::unbounded()).unwrap();
    let job = crate::domain::job::Job::parse(
        br#"{"id":"a","prompt":"p","n":3,"params":{"user":"u-1","output_compression":80}}"#,
        None,
        &settings.job_rules(),
    )
    .unwrap();
    let body = provider.body(&ImageRequest::for_job(&job, provider.defaults(), 2));
    assert_eq!(body["n"], 2);
    assert_eq!(body["model"], "gpt-image-2");
    assert_eq!(body["user"], "u-1");
    assert_eq!(body["output_compression"], 80);
    assert_eq!(body["size"], "1024x1024");
    assert_eq!(body["quality"], "auto");
    assert_eq!(body["output_format"], "png");
    assert!(body.get("response_format").is_none());
    assert!(body.get("background").is_none());
}

#[test]
fn usage_is_read_from_the_answer_or_estimated_and_marked() {
    let reported = serde_json::json!({"input_tokens": 50, "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
        "output_tokens": 8320, "output_tokens_details": {"image_tokens": 8320, "text_tokens": 0}});
    let u = reported_usage(&reported, 2);
    assert_eq!(
        (
            u.input_text_tokens,
            u.input_image_tokens,
            u.output_image_tokens,
            u.images
        ),
        (40.0, 10.0, 8320.0, 2)
    );
    assert!(!u.estimated);
    let plain = reported_usage(
        &serde_json::json!({"input_tokens": 7, "output_tokens": 99}),
        1,
    );
    assert_eq!(
        (plain.input_text_tokens, plain.output_image_tokens),
        (7.0, 99.0)
    );
    let request = ImageRequest {
        model: "gpt-image-2".into(),
        prompt: "a red fox in the snow".into(),
        negative_prompt: None,
        size: Size::parse("1024x1024"),
        count: 2,
        output_format: None,
        quality: Some("high".into()),
        background: None,
        seed: None,
        reference_count: 0,
        masked: false,
        refs: Default::default(),
        params: Map::new(),
    };
    // Two high-quality 1024x1024 images: 2 x 4160 output tokens, plus the prompt.
    let e = estimate(&request);
    assert!(e.estimated);
    assert_eq!(
        (e.input_text_tokens, e.output_image_tokens, e.images),
        (6.0, 8320.0, 2)
    );
    let wide = ImageRequest {
        size: Size::parse("2048x1024"),
        quality: None,
        count: 1,
        ..request
    };
    assert_eq!(estimate(&wide).output_image_tokens, 2112.0);
}
