//! The binary: `enqueue` against the real broker, `run` end to end, `worker` stopping on SIGTERM.

use std::process::{Command, Stdio};

use crate::helpers::{Store, TestEnv};

fn imagegen(env: &TestEnv) -> Command {
    env.command()
}

#[tokio::test]
async fn enqueue_publishes_good_lines_reports_bad_ones_and_ids_are_stable() {
    let env = TestEnv::new(Store::Fs).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobs.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\":\"a castle\"}\n{\"prompt\":\"a moat\",\"sise\":\"1x1\"}\n\n{\"id\":\"own\",\"prompt\":\"a bridge\",\"n\":2}\nnot json\n",
    )
    .unwrap();
    // Real money at stake and nobody to ask: refused without --yes, nothing published.
    let refused = imagegen(&env)
        .args(["enqueue", file.to_str().unwrap(), "--batch", "castles"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("estimated $") && stderr.contains("--yes"),
        "{stderr}"
    );
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 0);

    let out = imagegen(&env)
        .args([
            "enqueue",
            file.to_str().unwrap(),
            "--batch",
            "castles",
            "--yes",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "bad lines make exit code 3: {stderr}"
    );
    assert!(
        stderr.contains("jobs.jsonl:2:") && stderr.contains("sise"),
        "{stderr}"
    );
    assert!(stderr.contains("jobs.jsonl:5:"), "{stderr}");
    assert!(stderr.contains("published 2 jobs"), "{stderr}");
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 2);

    // --dry-run prints the same ids as the real run, and publishes nothing.
    let dry = imagegen(&env)
        .args([
            "enqueue",
            file.to_str().unwrap(),
            "--batch",
            "castles",
            "--dry-run",
        ])
        .output()
        .unwrap();
    let jobs: Vec<serde_json::Value> = String::from_utf8_lossy(&dry.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[1]["id"], "own");
    assert!(jobs[0]["id"].as_str().unwrap().starts_with("j-"));
    assert_eq!(jobs[0]["batch"], "castles");
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 2);
    let channel = env.connection.create_channel().await.unwrap();
    let first = channel
        .basic_get(
            env.settings.amqp.jobs_queue.as_str().into(),
            Default::default(),
        )
        .await
        .unwrap()
        .unwrap();
    let published: serde_json::Value = serde_json::from_slice(&first.delivery.data).unwrap();
    assert_eq!(published["id"], jobs[0]["id"], "the same id on every run");
    assert_eq!(
        first
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        jobs[0]["id"]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn run_processes_a_text_file_end_to_end_with_placeholder_and_fs() {
    let env = TestEnv::new(Store::Fs).await;
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("few.txt");
    std::fs::write(
        &prompts,
        "a small red square\na small blue circle\n\na green triangle\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let run = || {
        imagegen(&env)
            .env("IMAGEGEN__PROVIDERS__PLACEHOLDER__KIND", "placeholder")
            .env("IMAGEGEN__PROVIDERS__PLACEHOLDER__SIZE", "64x64")
            .env("IMAGEGEN__WORKER__DEFAULT_PROVIDER", "placeholder")
            .env("IMAGEGEN__STORAGE__KIND", "fs")
            .env("IMAGEGEN__STORAGE__ROOT", &data)
            .args(["run", prompts.to_str().unwrap(), "--timeout", "60"])
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 jobs") && stdout.contains("3 succeeded"),
        "{stdout}"
    );
    let pngs = std::fs::read_dir(data.join(&env.settings.storage.prefix).join("images/few"))
        .unwrap()
        .count();
    assert_eq!(pngs, 3);
    // Again: the stored results are found, nothing new is made.
    let again = run();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("3 succeeded"));
    assert_eq!(
        std::fs::read_dir(data.join(&env.settings.storage.prefix).join("images/few"))
            .unwrap()
            .count(),
        3
    );
    env.cleanup().await;
}

#[tokio::test]
async fn worker_stops_on_sigterm_and_exits_zero() {
    let env = TestEnv::new(Store::Fs).await;
    let dir = tempfile::tempdir().unwrap();
    // The [provider] section of earlier releases still configures a worker (here beside the
    // test's own [providers.openai]), with a warning that names the keys to use instead.
    let child = imagegen(&env)
        .env("IMAGEGEN__PROVIDER__KIND", "placeholder")
        .env("IMAGEGEN__STORAGE__ROOT", dir.path())
        .arg("worker")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_consumers(1).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("deprecated") && stderr.contains("IMAGEGEN__PROVIDERS__PLACEHOLDER__KIND"),
        "{stderr}"
    );
    env.cleanup().await;
}

#[test]
fn invalid_configuration_names_the_key_and_exits_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .env("IMAGEGEN__WORKER__CONCURRENCY", "0")
        .arg("worker")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("worker.concurrency"), "{stderr}");
    // A named provider, and the [provider] section of earlier releases read as one.
    for kind_var in [
        "IMAGEGEN__PROVIDERS__OPENAI__KIND",
        "IMAGEGEN__PROVIDER__KIND",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
            .env(kind_var, "openai")
            .env_remove("OPENAI_API_KEY")
            .arg("worker")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("providers.openai.api_key") && stderr.contains("OPENAI_API_KEY"),
            "{kind_var}: {stderr}"
        );
    }
}

#[tokio::test]
async fn providers_lists_each_provider_and_whether_it_answers_with_its_credentials() {
    let env = TestEnv::new(Store::Fs).await;
    let gemini = imagegen_fakes::gemini::GeminiFake::new(imagegen_fakes::gemini::GeminiOptions {
        api_key: Some("the-right-key".into()),
        ..Default::default()
    })
    .start()
    .await
    .unwrap();
    let bfl = imagegen_fakes::bfl::BflFake::new(Default::default())
        .start()
        .await
        .unwrap();
    let (gemini_url, bfl_url) = (gemini.base_url(), bfl.base_url());
    let run = |gemini_key: &'static str, offline: bool| {
        let mut cmd = env.command();
        cmd.env("IMAGEGEN__PROVIDERS__GEMINI__KIND", "gemini")
            .env("IMAGEGEN__PROVIDERS__GEMINI__BASE_URL", &gemini_url)
            .env("IMAGEGEN__PROVIDERS__GEMINI__API_KEY", gemini_key)
            .env("IMAGEGEN__PROVIDERS__FLUX__KIND", "bfl")
            .env("IMAGEGEN__PROVIDERS__FLUX__BASE_URL", &bfl_url)
            .env("IMAGEGEN__PROVIDERS__FLUX__API_KEY", "k")
            .env("IMAGEGEN__PROVIDERS__OPENAI__FALLBACK", "gemini,flux")
            .env("IMAGEGEN__WORKER__DEFAULT_PROVIDER", "openai")
            .args(["providers", "--json"]);
        if offline {
            cmd.arg("--offline");
        }
        // Off this test's runtime, which serves the fakes meanwhile.
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    let out = run("the-right-key", false).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |name: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {rows}"))
            .clone()
    };
    assert_eq!(row("openai")["default"], true);
    assert_eq!(
        row("openai")["fallback"],
        serde_json::json!(["gemini", "flux"])
    );
    assert_eq!(row("flux")["kind"], "bfl");
    assert_eq!(row("flux")["price"], "$0.03 per megapixel");
    assert!(
        row("flux")["check"]
            .as_str()
            .unwrap()
            .contains("credits left")
    );
    for name in ["openai", "gemini", "flux"] {
        assert_eq!(row(name)["answers"], true, "{}", row(name));
    }
    // A wrong key is found without buying anything, and the exit code says so.
    let out = run("a-wrong-key", false).await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gemini_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gemini")
        .unwrap();
    assert_eq!(gemini_row["answers"], false);
    assert!(
        gemini_row["check"].as_str().unwrap().contains("HTTP 400"),
        "{gemini_row}"
    );
    // Offline: the configuration only.
    let out = run("a-wrong-key", true).await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(gemini.api.stats().billed + bfl.api.stats().billed, 0);
    assert_eq!(env.fake().stats().billed, 0);
    env.cleanup().await;
}
