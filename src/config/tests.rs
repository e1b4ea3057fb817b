//! Loading, layering, validation and self-documentation of the settings.

use super::*;

fn defaults() -> Settings {
    Settings::load(&Sources::default()).expect("defaults are valid")
}

#[test]
fn embedded_defaults_are_valid_and_offline() {
    let s = defaults();
    assert_eq!(s.providers.len(), 1, "one implicit provider");
    assert_eq!(s.default_provider().name, "placeholder");
    assert_eq!(s.default_provider().kind.kind(), ProviderKind::Placeholder);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(s.storage.kind, StorageKind::Fs);
    assert_eq!(s.amqp.jobs_queue, "imagegen.jobs");
    assert_eq!(s.worker.concurrency, 8);
    assert_eq!(s.worker.threads, 0);
    // 8 + 2 + 1: a little above the provider concurrency.
    assert_eq!(s.prefetch(), 11);
}

#[test]
fn overrides_apply_and_are_typed() {
    let s = Settings::load_with_overrides(
        &Sources::default(),
        &[
            ("worker.concurrency", "32".into()),
            ("worker.prefetch", "40".into()),
        ],
    )
    .unwrap();
    assert_eq!(s.worker.concurrency, 32);
    assert_eq!(s.prefetch(), 40);
}

fn error_of(overrides: &[(&str, String)]) -> String {
    Settings::load_with_overrides(&Sources::default(), overrides)
        .expect_err("must be rejected")
        .to_string()
}

#[test]
fn invalid_values_name_the_key() {
    assert!(error_of(&[("worker.concurrency", "0".into())]).contains("worker.concurrency"));
    assert!(error_of(&[("worker.threads", "257".into())]).contains("worker.threads"));
    assert!(error_of(&[("amqp.frame_max", "4095".into())]).contains("amqp.frame_max"));
    assert!(error_of(&[("amqp.frame_max", "1048577".into())]).contains("amqp.frame_max"));
    assert!(error_of(&[("amqp.url", "http://x".into())]).contains("amqp.url"));
    assert!(
        error_of(&[
            ("worker.concurrency", "16".into()),
            ("worker.prefetch", "4".into())
        ])
        .contains("worker.prefetch")
    );
    assert!(
        error_of(&[("providers.openai.kind", "openai".into())])
            .contains("providers.openai.api_key")
    );
    assert!(error_of(&[("provider.kind", "openai".into())]).contains("providers.openai.api_key"));
    assert!(
        error_of(&[
            ("storage.kind", "s3".into()),
            ("storage.bucket", "Bad_Bucket".into())
        ])
        .contains("storage.bucket")
    );
    assert!(error_of(&[("storage.prefix", "../up".into())]).contains("storage.prefix"));
    assert!(error_of(&[("provider.kind", "dalle".into())]).contains("provider.kind"));
    assert!(error_of(&[("providers.x.kind", "dalle".into())]).contains("providers.x.kind"));
    assert!(error_of(&[("providers.x.model", "m".into())]).contains("providers.x.kind"));
    assert!(
        error_of(&[("worker.default_provider", "nope".into())]).contains("worker.default_provider")
    );
}

#[test]
fn delay_tiers_pick_the_shortest_that_covers_the_wait() {
    let s = defaults();
    assert_eq!(
        s.delay_queue(Duration::from_secs(3)),
        ("imagegen.jobs.delay.5s".into(), Duration::from_secs(5))
    );
    assert_eq!(
        s.delay_queue(Duration::from_secs(31)).1,
        Duration::from_secs(120)
    );
    assert_eq!(
        s.delay_queue(Duration::from_secs(99_999)).1,
        Duration::from_secs(1800)
    );
}

#[test]
fn files_with_unknown_keys_or_bad_values_are_refused_naming_them() {
    for (text, named) in [
        (
            "[amqp]\ndelay_tiers_secs = [30, 10]\n",
            "amqp.delay_tiers_secs",
        ),
        ("[worker]\nconcurency = 3\n", "concurency"),
        (
            "[providers.p]\nkind = \"placeholder\"\nsise = \"1x1\"\n",
            "sise",
        ),
    ] {
        let err = load_toml(text).unwrap_err().to_string();
        assert!(err.contains(named), "{text}: {err}");
    }
}

#[test]
fn environment_file_layers_over_defaults() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("staging.toml"),
        "[worker]\nconcurrency = 3\n",
    )
    .unwrap();
    let s = Settings::load(&Sources {
        app_env: Some("staging".into()),
        config_dir: Some(dir.path().to_path_buf()),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(s.worker.concurrency, 3);
    // A missing environment file is not an error.
    let s = Settings::load(&Sources {
        app_env: Some("nowhere".into()),
        config_dir: Some(dir.path().to_path_buf()),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(s.worker.concurrency, 8);
    assert_eq!(s.worker.threads, 0);
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let s = Settings::load_with_overrides(
        &Sources::default(),
        &[
            ("providers.openai.kind", "openai".into()),
            ("providers.openai.api_key", "sk-very-secret".into()),
            ("amqp.url", "amqp://bob:hunter2@rabbit:5672/%2f".into()),
            ("storage.secret_access_key", "s3-secret".into()),
            ("storage.access_key_id", "AKID".into()),
        ],
    )
    .unwrap();
    let debug = format!("{s:?}");
    for secret in ["sk-very-secret", "hunter2", "s3-secret"] {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
    assert_eq!(s.amqp_url_redacted(), "amqp://bob:****@rabbit:5672/%2f");
    // Any character in a password, encoded or not.
    for password in ["pa/ss", "p?w#1", "a@b", "x:y", "%2Fenc", "s/p@c#e?"] {
        let url = format!("amqp://bob:{password}@rabbit:5672/%2f");
        let shown = super::redact_url(&url);
        assert!(!shown.contains(password), "{url} -> {shown}");
        assert!(shown.ends_with("@rabbit:5672/%2f"), "{shown}");
    }
    assert_eq!(super::redact_url("amqp://rabbit/%2f"), "amqp://rabbit/%2f");
}

/// Loads the defaults and a file of these contents.
fn load_toml(text: &str) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.toml");
    std::fs::write(&file, text).unwrap();
    load_file(&file)
}

fn load(overrides: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let overrides: Vec<(&str, String)> =
        overrides.iter().map(|(k, v)| (*k, v.to_string())).collect();
    Settings::load_with_overrides(&Sources::default(), &overrides)
}

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
fn default_toml_documents_every_field_and_nothing_else() {
    use serde_reflection::{ContainerFormat, Format, Registry, Samples, Tracer, TracerConfig};

    fn walk(
        format: &Format,
        value: &serde_json::Value,
        path: &str,
        registry: &Registry,
        problems: &mut Vec<String>,
    ) {
        match format {
            Format::TypeName(name) => match registry.get(name) {
                Some(ContainerFormat::Struct(fields)) => {
                    let Some(object) = value.as_object() else {
                        problems.push(format!("{path} is not a table"));
                        return;
                    };
                    for field in fields {
                        let key = format!("{path}.{}", field.name);
                        match object.get(&field.name) {
                            Some(v) => walk(&field.value, v, &key, registry, problems),
                            None => problems.push(format!("{key} is a field, not in the file")),
                        }
                    }
                    for key in object.keys() {
                        if !fields.iter().any(|f| &f.name == key) {
                            problems.push(format!("{path}.{key} is in the file, not a field"));
                        }
                    }
                }
                Some(ContainerFormat::NewTypeStruct(inner)) => {
                    walk(inner, value, path, registry, problems)
                }
                _ => {}
            },
            Format::Seq(inner) => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    walk(inner, item, &format!("{path}[{i}]"), registry, problems);
                }
            }
            Format::Option(inner) => walk(inner, value, path, registry, problems),
            _ => {}
        }
    }

    let mut tracer = Tracer::new(TracerConfig::default());
    // Enums are traced on their own first, so that every variant is known.
    tracer.trace_simple_type::<AuthScheme>().unwrap();
    tracer.trace_simple_type::<LogFormat>().unwrap();
    tracer.trace_simple_type::<StorageKind>().unwrap();
    let (format, _) = tracer
        .trace_type::<Settings>(&Samples::new())
        .expect("the settings can be traced");
    let registry = tracer
        .registry()
        .expect("every enum of the settings is traced above");
    let file: serde_json::Value = config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap();
    let mut problems = Vec::new();
    walk(&format, &file, "", &registry, &mut problems);
    let problems: Vec<String> = problems
        .into_iter()
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    // The walk reached the providers' defaults, not only the top.
    assert!(DEFAULT_TOML.contains("[provider_defaults.openai]"));
}

#[test]
fn secrets_come_from_the_files_that_file_variables_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let var = |k: &str, v: String| (k.to_string(), v);
    let env = vec![
        var("IMAGEGEN__PROVIDERS__OPENAI__KIND", "openai".into()),
        var("OPENAI_API_KEY_FILE", file("openai", "sk-from-a-file\n")),
        var(
            "AMQP_URL_FILE",
            file("amqp", "amqp://u:p@rabbit:5672/%2f\r\n"),
        ),
        var("IMAGEGEN__AMQP__HEADER_KEY_FILE", file("seal", "fleet-key")),
    ];
    let load = |env: Vec<(String, String)>| {
        Settings::load(&Sources {
            use_env: true,
            env: Some(env),
            ..Sources::default()
        })
    };
    let s = load(env.clone()).unwrap();
    let KindSettings::Openai(openai) = &s.default_provider().kind else {
        panic!("kind openai")
    };
    assert_eq!(openai.api_key.expose_secret(), "sk-from-a-file");
    assert_eq!(s.amqp.url.expose_secret(), "amqp://u:p@rabbit:5672/%2f");
    assert_eq!(s.amqp.header_key.expose_secret(), "fleet-key");

    // A variable and its file variable both set: refused, naming them.
    let mut both = env.clone();
    both.push(var("IMAGEGEN__AMQP__HEADER_KEY", "other".into()));
    let e = load(both).unwrap_err().to_string();
    assert!(e.contains("IMAGEGEN__AMQP__HEADER_KEY_FILE"), "{e}");
    // A file that cannot be read: the variable and the path, never a secret.
    let mut missing = env;
    missing.push(var(
        "IMAGEGEN__STORAGE__SECRET_ACCESS_KEY_FILE",
        "/nonexistent/s3".into(),
    ));
    let e = load(missing).unwrap_err().to_string();
    assert!(
        e.contains("SECRET_ACCESS_KEY_FILE") && e.contains("/nonexistent/s3"),
        "{e}"
    );
    assert!(
        !e.contains("sk-from-a-file") && !e.contains("fleet-key"),
        "{e}"
    );
}

mod properties;

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
