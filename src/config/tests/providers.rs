//! `[providers.NAME]`: kinds, their defaults and checks, fallbacks, and the `[provider]` of
//! earlier releases.

use super::*;

#[test]
fn named_providers_take_their_kinds_defaults_and_their_own_sections() {
    let s = load(&[
        ("providers.main.kind", "openai"),
        ("providers.main.api_key", "sk-main"),
        ("providers.main.concurrency", "3"),
        ("providers.main.limits.requests_per_minute", "60"),
        ("providers.main.retry.max_attempts", "2"),
        ("providers.cheap.kind", "openai"),
        ("providers.cheap.api_key", "sk-cheap"),
        ("providers.cheap.base_url", "https://images.example/v1"),
        ("providers.cheap.model", "tiny-image"),
        ("providers.dry.kind", "placeholder"),
        ("worker.default_provider", "main"),
        ("worker.concurrency", "5"),
    ])
    .unwrap();
    let names: Vec<&str> = s.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["cheap", "dry", "main"]);
    assert_eq!(s.default_provider().name, "main");
    let main = s.provider("main").unwrap();
    assert_eq!(main.concurrency, 3);
    assert_eq!(main.limits.requests_per_minute, 60);
    // Keys the provider's table leaves out come from the worker's sections...
    assert_eq!(main.limits.burst_secs, s.limits.burst_secs);
    assert_eq!(main.retry.max_attempts, 2);
    assert_eq!(main.retry.initial_delay_ms, s.retry.initial_delay_ms);
    assert_eq!(main.pricing, s.pricing);
    let KindSettings::Openai(main_kind) = &main.kind else {
        panic!("main is of kind openai")
    };
    // ...and from its kind's defaults.
    assert_eq!(main_kind.base_url, s.provider_defaults.openai.base_url);
    assert_eq!(main_kind.model, s.provider_defaults.openai.model);
    let cheap = s.provider("cheap").unwrap();
    assert_eq!(cheap.concurrency, 5, "worker.concurrency by default");
    let KindSettings::Openai(cheap_kind) = &cheap.kind else {
        panic!("cheap is of kind openai")
    };
    assert_eq!(cheap_kind.model, "tiny-image");
    assert_eq!(cheap_kind.base_url, "https://images.example/v1");
    // Prefetch covers every provider's slots.
    assert_eq!(s.concurrency(), 3 + 5 + 5);
    assert_eq!(s.prefetch(), 13 + 3 + 1);
    assert_eq!(s.job_rules().providers, ["cheap", "dry", "main"]);
}

#[test]
fn provider_tables_are_checked_like_any_section() {
    // Each case: the overrides, and what the refusal must name.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        // A kind's keys only, under deny_unknown_fields.
        (
            &[
                ("providers.p.kind", "placeholder"),
                ("providers.p.api_key", "x"),
            ],
            &["providers.p", "api_key"],
        ),
        (
            &[
                ("providers.p.kind", "placeholder"),
                ("providers.p.limits.requests_per_minit", "1"),
            ],
            &["providers.p", "requests_per_minit"],
        ),
        (
            &[
                ("providers.p.kind", "placeholder"),
                ("providers.p.retry.max_attempts", "0"),
            ],
            &["providers.p.retry.max_attempts"],
        ),
        (
            &[
                ("providers.p.kind", "placeholder"),
                ("providers.p.concurrency", "2"),
                ("providers.p.limits.min_concurrency", "3"),
            ],
            &["providers.p.limits.min_concurrency"],
        ),
        // Names that an IMAGEGEN__PROVIDERS__NAME__KEY variable could not reach.
        (
            &[("providers.Main.kind", "placeholder")],
            &["providers.Main", "[a-z0-9_]"],
        ),
        // Several providers and no default named, or a default that is not one of them.
        (
            &[
                ("providers.a.kind", "placeholder"),
                ("providers.b.kind", "placeholder"),
            ],
            &["worker.default_provider", "a, b"],
        ),
        (
            &[
                ("providers.a.kind", "placeholder"),
                ("worker.default_provider", "b"),
            ],
            &["worker.default_provider", "configured: a"],
        ),
    ];
    for (overrides, names) in cases {
        let e = load(overrides).expect_err("must be rejected").to_string();
        assert!(names.iter().all(|n| e.contains(n)), "{overrides:?}: {e}");
    }
    // A field the worker controls cannot be allowed through params; others can.
    let e =
        load_toml("[providers.p]\nkind = \"placeholder\"\nparams_allowed = [\"steps\", \"n\"]\n")
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("providers.p.params_allowed") && e.contains("\"n\""),
        "{e}"
    );
    let s =
        load_toml("[providers.p]\nkind = \"placeholder\"\nparams_allowed = [\"steps\"]\n").unwrap();
    assert_eq!(s.providers[0].params_allowed, ["steps"]);
    // A spend cap needs every provider priced.
    let e = load_toml(
        "[budget]\nmax_worker_usd = 5.0\n[providers.a]\nkind = \"placeholder\"\n\
         [providers.a.pricing]\nper_image = []\nmodels = []\nper_megapixel = []\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("budget.max_worker_usd") && e.contains("provider a"),
        "{e}"
    );
}

#[test]
fn the_provider_section_of_earlier_releases_is_read_as_a_provider_named_after_its_kind() {
    let s = load(&[
        ("provider.kind", "openai"),
        ("provider.api_key", "sk-legacy"),
        ("provider.model", "gpt-image-1-mini"),
        ("provider.request_timeout_secs", "120"),
    ])
    .unwrap();
    assert_eq!(s.providers.len(), 1);
    let p = s.default_provider();
    assert_eq!(p.name, "openai");
    let KindSettings::Openai(o) = &p.kind else {
        panic!("kind openai")
    };
    assert_eq!(o.api_key.expose_secret(), "sk-legacy");
    assert_eq!(o.model, "gpt-image-1-mini");
    assert_eq!(o.request_timeout_secs, 120);
    assert_eq!(o.base_url, s.provider_defaults.openai.base_url);
    assert_eq!(s.warnings.len(), 1);
    let w = &s.warnings[0];
    assert!(
        w.contains("[providers.openai]") && w.contains("deprecated"),
        "{w}"
    );
    assert!(
        w.contains("IMAGEGEN__PROVIDER__API_KEY -> IMAGEGEN__PROVIDERS__OPENAI__API_KEY"),
        "{w}"
    );
    // Its keys of other kinds were accepted and ignored, as they always were; typos were not.
    let s = load(&[
        ("provider.kind", "placeholder"),
        ("provider.base_url", "https://x/v1"),
    ])
    .unwrap();
    assert_eq!(s.default_provider().name, "placeholder");
    let e = load(&[("provider.kind", "placeholder"), ("provider.modle", "x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("modle"), "{e}");
    let e = load(&[
        ("provider.kind", "openai"),
        ("provider.api_key", "sk"),
        ("providers.openai.kind", "openai"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("both set"), "{e}");
}

/// Every key of `config/default.toml` is a field of the settings, and every field is in the
/// file, so that the file documents all of them. (Unknown keys are refused anyway; this also
/// finds a field that only a `#[serde(default)]` would have hidden from the file.)

#[test]
fn a_gemini_provider_takes_its_kinds_defaults_and_needs_a_key() {
    let err = error_of(&[("providers.g.kind", "gemini".into())]);
    assert!(
        err.contains("providers.g.api_key") && err.contains("IMAGEGEN__PROVIDERS__G__API_KEY"),
        "{err}"
    );
    let err = error_of(&[
        ("providers.g.kind", "gemini".into()),
        ("providers.g.api_key", "k".into()),
        ("providers.g.base_url", "ftp://x".into()),
    ]);
    assert!(err.contains("providers.g.base_url"), "{err}");
    let s = Settings::load_with_overrides(
        &Sources::default(),
        &[
            ("providers.g.kind", "gemini".into()),
            ("providers.g.api_key", "k".into()),
            ("providers.g.size", "16:9".into()),
        ],
    )
    .unwrap();
    let KindSettings::Gemini(g) = &s.default_provider().kind else {
        panic!("kind gemini")
    };
    assert_eq!(g.model, "gemini-2.5-flash-image");
    assert_eq!(g.size, "16:9");
    assert_eq!(
        g.base_url,
        "https://generativelanguage.googleapis.com/v1beta"
    );
}

#[test]
fn a_bfl_provider_checks_its_polling_and_cap() {
    let base = [
        ("providers.f.kind", "bfl".to_string()),
        ("providers.f.api_key", "k".into()),
    ];
    fn with<'a>(base: &[(&'a str, String)], extra: &[(&'a str, String)]) -> Vec<(&'a str, String)> {
        base.iter().chain(extra).cloned().collect()
    }
    let err = error_of(&with(&base, &[("providers.f.max_active", "0".into())]));
    assert!(err.contains("providers.f.max_active"), "{err}");
    let err = error_of(&with(
        &base,
        &[
            ("providers.f.poll_min_ms", "5000".into()),
            ("providers.f.poll_max_secs", "2".into()),
        ],
    ));
    assert!(err.contains("providers.f.poll_max_secs"), "{err}");
    let err = error_of(&with(
        &base,
        &[("providers.f.output_format", "webp".into())],
    ));
    assert!(err.contains("providers.f.output_format"), "{err}");
    let s = Settings::load_with_overrides(&Sources::default(), &with(&base, &[])).unwrap();
    let KindSettings::Bfl(f) = &s.default_provider().kind else {
        panic!("kind bfl")
    };
    assert_eq!((f.model.as_str(), f.max_active), ("flux-2-pro", 24));
}

#[test]
fn fallbacks_name_other_configured_providers_as_a_list_or_from_the_environment() {
    let two = |fallback: &str| {
        vec![
            ("providers.a.kind", "placeholder".to_string()),
            ("providers.b.kind", "placeholder".into()),
            ("worker.default_provider", "a".into()),
            ("providers.a.fallback", fallback.into()),
        ]
    };
    let s = Settings::load_with_overrides(&Sources::default(), &two("b")).unwrap();
    let a = s.providers.iter().find(|p| p.name == "a").unwrap();
    assert_eq!(a.fallback, ["b"]);
    assert!(!a.fallback_on_refusal);
    for wrong in ["c", "a", "b,b"] {
        let err = error_of(&two(wrong));
        assert!(err.contains("providers.a.fallback"), "{wrong}: {err}");
    }
    let s = load_toml(
        "[providers.a]\nkind = \"placeholder\"\nfallback = [\"b\"]\nfallback_on_refusal = true\n\
         [providers.b]\nkind = \"placeholder\"\n[worker]\ndefault_provider = \"a\"\n",
    )
    .unwrap();
    let a = s.providers.iter().find(|p| p.name == "a").unwrap();
    assert_eq!(
        (a.fallback.as_slice(), a.fallback_on_refusal),
        (&["b".to_string()][..], true)
    );
}

#[test]
fn a_comfyui_workflow_is_checked_against_its_points_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux.json");
    std::fs::write(
        &path,
        r#"{"10": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
            "11": {"class_type": "DualCLIPLoader", "inputs": {}},
            "12": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "f"}}}"#,
    )
    .unwrap();
    let workflow = path.to_str().unwrap().to_string();
    // The built-in workflow's points do not fit this graph: the start fails, saying where.
    let base = [
        ("providers.gpu.kind", "comfyui".to_string()),
        ("providers.gpu.workflow", workflow),
    ];
    let err = error_of(&base);
    assert!(
        err.contains("providers.gpu.workflow") && err.contains("inputs.prompt names node 6"),
        "{err}"
    );
    let mut fitted = base.to_vec();
    for (key, value) in [
        ("providers.gpu.inputs.prompt", "10.text"),
        ("providers.gpu.inputs.negative_prompt", ""),
        ("providers.gpu.inputs.seed", ""),
        ("providers.gpu.inputs.width", ""),
        ("providers.gpu.inputs.height", ""),
        ("providers.gpu.inputs.count", ""),
        ("providers.gpu.inputs.model", ""),
    ] {
        fitted.push((key, value.to_string()));
    }
    fitted.push(("providers.gpu.output_node", "12".into()));
    // Hosts from the environment: URLs separated by commas.
    fitted.push((
        "providers.gpu.hosts",
        "http://10.0.0.5:8188, http://10.0.0.6:8188".into(),
    ));
    let s = Settings::load_with_overrides(&Sources::default(), &fitted).unwrap();
    let KindSettings::ComfyUi(gpu) = &s.default_provider().kind else {
        panic!("kind comfyui")
    };
    assert_eq!(gpu.hosts, ["http://10.0.0.5:8188", "http://10.0.0.6:8188"]);
    assert!(gpu.load_workflow().is_ok());
    let mut twice = fitted.clone();
    twice.push(("providers.gpu.hosts", "http://a:1,http://a:1".into()));
    assert!(error_of(&twice).contains("twice"));
    // AUTOMATIC1111: a user needs its password.
    let err = error_of(&[
        ("providers.sd.kind", "automatic1111".to_string()),
        ("providers.sd.username", "art".into()),
    ]);
    assert!(err.contains("providers.sd.password"), "{err}");
}
