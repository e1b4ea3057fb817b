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
    tracer
        .trace_simple_type::<crate::config::AzureAuth>()
        .unwrap();
    tracer
        .trace_simple_type::<crate::config::AzureSurface>()
        .unwrap();
    tracer.trace_simple_type::<LogFormat>().unwrap();
    tracer.trace_simple_type::<StorageKind>().unwrap();
    tracer
        .trace_simple_type::<crate::config::Unfinished>()
        .unwrap();
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
mod providers;
