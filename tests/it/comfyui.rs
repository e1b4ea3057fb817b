//! The `comfyui` provider end to end, against fakes of ComfyUI servers (one prompt at a time per
//! server, history and queue in memory): a workflow queued once under the worker's prompt id and
//! its images stored; jobs spread over two servers; a graph the server refuses (fails fast, names
//! the node); a server restart that forgets the prompt (queued again under the same id, with and
//! without the jobs API); a server that stops answering; and a worker killed while its prompt
//! runs (exactly one run); a submit whose answer is lost (found by its id, not run again); a
//! run that fails at a node, or out of GPU memory.

use std::time::Duration;

use imagegen::domain::error::ErrorKind;
use imagegen::domain::event::Status;
use imagegen_fakes::comfyui::{ComfyFake, ComfyOptions, ComfyServer, Fault};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, killed_while_queued_with, rule};

const WAIT: Duration = Duration::from_secs(30);

async fn fake(opts: ComfyOptions) -> ComfyServer {
    ComfyFake::new(ComfyOptions {
        image_bytes: 20_000,
        ..opts
    })
    .start()
    .await
    .expect("fake ComfyUI server starts")
}

/// The settings that make `comfyui` (on `hosts`) the default provider.
fn settings(hosts: &[&ComfyServer]) -> Vec<(&'static str, String)> {
    let hosts: Vec<String> = hosts.iter().map(|h| h.base_url()).collect();
    vec![
        ("providers.comfyui.kind", "comfyui".to_string()),
        ("providers.comfyui.hosts", hosts.join(",")),
        ("providers.comfyui.poll_min_ms", "100".into()),
        ("providers.comfyui.poll_max_secs", "1".into()),
        ("providers.comfyui.host_probe_secs", "1".into()),
        ("worker.default_provider", "comfyui".into()),
    ]
}

#[tokio::test]
async fn a_workflow_is_queued_once_under_the_workers_id_and_its_images_stored() {
    let gpu = fake(ComfyOptions::default()).await;
    let env = TestEnv::with(Store::S3, &settings(&[&gpu])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"id": "c1", "prompt": "a comfy castle", "n": 2, "size": "768x512",
        "seed": 11, "negative_prompt": "fog"}),
    )
    .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.images.len(), 2);
    assert_eq!(gpu.api.stats().requests, 1, "one submit");
    assert_eq!(
        gpu.api.runs_for("a comfy castle"),
        1,
        "one run made both images"
    );
    let runs = gpu.api.runs();
    let prompt_id = event
        .data
        .provider_request_id
        .clone()
        .expect("the prompt id");
    assert_eq!(
        runs.get(&prompt_id),
        Some(&1),
        "the worker's own id: {runs:?}"
    );
    let store = env.store().await;
    let mut seen = Vec::new();
    for image in &event.data.images {
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 15_000);
        seen.push(bytes);
    }
    assert_ne!(seen[0], seen[1], "both images, not one twice");
    let usage = event.data.usage.clone().expect("usage");
    assert!(
        usage["gpu_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{usage}"
    );
    assert_eq!(
        event.data.model.as_deref(),
        Some("sd_xl_base_1.0.safetensors")
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn jobs_spread_over_the_servers_by_their_queues() {
    let slow = ComfyOptions {
        generation: Duration::from_millis(400),
        ..ComfyOptions::default()
    };
    let (a, b) = (fake(slow.clone()).await, fake(slow).await);
    let env = TestEnv::with(Store::Fs, &settings(&[&a, &b])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    for i in 0..6 {
        env.publish(json!({"id": format!("s{i}"), "prompt": format!("spread {i}")}))
            .await;
    }
    let events = env.events(&mut listener, 6, WAIT).await;
    assert!(events.iter().all(|e| e.data.status == Status::Succeeded));
    let (ra, rb) = (a.api.stats().billed, b.api.stats().billed);
    assert_eq!(ra + rb, 6, "one run per job");
    assert!(ra >= 2 && rb >= 2, "both GPUs worked: {ra} and {rb}");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_graph_the_server_refuses_fails_at_once_naming_the_node() {
    let gpu = fake(ComfyOptions {
        checkpoints: vec!["sd_xl_base_1.0.safetensors".into()],
        ..ComfyOptions::default()
    })
    .await;
    let env = TestEnv::with(Store::Fs, &settings(&[&gpu])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "g1", "prompt": "a refused graph", "model": "missing.safetensors"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Failed);
    let error = event.data.error.expect("an error");
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert!(
        error.message.contains("node 4 (CheckpointLoaderSimple)")
            && error.message.contains("missing.safetensors"),
        "{}",
        error.message
    );
    assert_eq!(event.data.attempts, 1, "not retried");
    assert_eq!(gpu.api.stats().requests, 1);
    assert_eq!(gpu.api.stats().billed, 0, "nothing ran");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

/// The server restarts while the prompt runs: queue and history are gone, so the worker finds
/// the prompt nowhere and queues it again under the same id.
async fn restart_forgets(jobs_api: bool, id: &str, prompt: &str) {
    let gpu = fake(ComfyOptions {
        generation: Duration::from_millis(1500),
        jobs_api,
        ..ComfyOptions::default()
    })
    .await;
    let env = TestEnv::with(Store::Fs, &settings(&[&gpu])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": id, "prompt": prompt})).await;
    let deadline = std::time::Instant::now() + WAIT;
    while gpu.api.runs_for(prompt) == 0 {
        assert!(std::time::Instant::now() < deadline, "the prompt never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gpu.api.restart();
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.images.len(), 1);
    let runs = gpu.api.runs();
    assert_eq!(runs.len(), 1, "one prompt id: {runs:?}");
    assert_eq!(
        runs.values().sum::<u64>(),
        2,
        "run again after the restart: {runs:?}"
    );
    assert_eq!(
        gpu.api.stats().requests,
        2,
        "submitted twice, under the same id"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_restarted_server_gets_the_forgotten_prompt_again_under_the_same_id() {
    restart_forgets(true, "r1", "a forgotten keep").await;
}

#[tokio::test]
async fn without_the_jobs_api_history_and_queue_tell_a_forgotten_prompt() {
    restart_forgets(false, "r2", "a forgotten tower").await;
}

#[tokio::test]
async fn a_server_that_stops_answering_is_taken_out_and_its_prompts_placed_again() {
    let slow = ComfyOptions {
        generation: Duration::from_millis(1500),
        ..ComfyOptions::default()
    };
    let (a, b) = (fake(slow.clone()).await, fake(slow).await);
    let env = TestEnv::with(Store::Fs, &settings(&[&a, &b])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    for i in 0..4 {
        env.publish(json!({"id": format!("d{i}"), "prompt": format!("outage {i}")}))
            .await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    while a.api.stats().billed == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "server A never ran a prompt"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A goes away (its connections reset) and comes back empty, as after a crash.
    a.api.set_down(true);
    let events = env.events(&mut listener, 4, Duration::from_secs(60)).await;
    assert!(
        events.iter().all(|e| e.data.status == Status::Succeeded),
        "{:?}",
        events.iter().map(|e| &e.data.error).collect::<Vec<_>>()
    );
    assert!(
        b.api.stats().billed >= 4 - a.api.stats().images.min(4),
        "B took A's prompts"
    );
    // Back, and probed: it gets work again.
    a.api.restart();
    a.api.set_down(false);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = a.api.stats().billed;
    for i in 0..2 {
        env.publish(json!({"id": format!("u{i}"), "prompt": format!("back {i}")}))
            .await;
    }
    let events = env.events(&mut listener, 2, WAIT).await;
    assert!(events.iter().all(|e| e.data.status == Status::Succeeded));
    assert!(a.api.stats().billed > before, "A is back in the rotation");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_while_its_prompt_runs_costs_no_second_run() {
    let gpu = fake(ComfyOptions {
        generation: Duration::from_secs(3),
        ..ComfyOptions::default()
    })
    .await;
    let event = killed_while_queued_with(
        "comfyui",
        &[("HOSTS", &gpu.base_url())],
        "kc",
        "a patient comfy",
        || gpu.api.runs_for("patient comfy") == 1,
    )
    .await;
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(gpu.api.stats().requests, 1, "submitted once");
    assert_eq!(gpu.api.runs_for("patient comfy"), 1, "exactly one run");
}

#[tokio::test]
async fn a_submit_whose_answer_was_lost_is_found_by_its_id_not_run_again() {
    let gpu = fake(ComfyOptions {
        generation: Duration::from_millis(600),
        ..ComfyOptions::default()
    })
    .await;
    gpu.api
        .push_rule(rule("a lost answer", Fault::ResetAfterSubmit, Some(1)));
    let env = TestEnv::with(Store::Fs, &settings(&[&gpu])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "la", "prompt": "a lost answer"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(
        gpu.api.runs_for("a lost answer"),
        1,
        "the recorded id was found: one run"
    );
    assert_eq!(gpu.api.stats().requests, 1, "never submitted again");
    assert_eq!(event.data.possibly_billed, 0, "looked up, not guessed");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_run_that_fails_at_a_node_fails_the_job_and_one_out_of_memory_runs_again() {
    let gpu = fake(ComfyOptions::default()).await;
    gpu.api.push_rule(rule(
        "a broken sampler",
        Fault::ExecutionError {
            exception_type: "RuntimeError".into(),
            message: "mat1 and mat2 shapes cannot be multiplied".into(),
        },
        None,
    ));
    gpu.api
        .push_rule(rule("a crowded gpu", Fault::OutOfMemory, Some(1)));
    let env = TestEnv::with(Store::Fs, &settings(&[&gpu])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "e1", "prompt": "a broken sampler"}))
        .await;
    env.publish(json!({"id": "e2", "prompt": "a crowded gpu"}))
        .await;
    let events = env.events(&mut listener, 2, WAIT).await;
    let broken = events.iter().find(|e| e.data.job_id == "e1").unwrap();
    assert_eq!(broken.data.status, Status::Failed);
    let error = broken.data.error.as_ref().unwrap();
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert!(
        error.message.contains("node 3 (KSampler)") && error.message.contains("mat1"),
        "{}",
        error.message
    );
    assert_eq!(gpu.api.runs_for("a broken sampler"), 1, "not run again");
    let crowded = events.iter().find(|e| e.data.job_id == "e2").unwrap();
    assert_eq!(
        crowded.data.status,
        Status::Succeeded,
        "{:?}",
        crowded.data.error
    );
    assert_eq!(
        gpu.api.runs_for("a crowded gpu"),
        2,
        "run again, as a new prompt"
    );
    assert_eq!(gpu.api.runs().len(), 3, "three prompt ids");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn with_every_server_down_the_job_falls_back_to_another_gpu_provider() {
    let gpu = fake(ComfyOptions::default()).await;
    gpu.api.set_down(true);
    let sd = imagegen_fakes::automatic1111::A1111Fake::new(Default::default())
        .start()
        .await
        .unwrap();
    let mut vars = settings(&[&gpu]);
    vars.extend([
        ("providers.comfyui.fallback", "sd".to_string()),
        ("providers.sd.kind", "automatic1111".into()),
        ("providers.sd.base_url", sd.base_url()),
        ("retry.max_attempts", "2".into()),
        ("retry.initial_delay_ms", "50".into()),
    ]);
    let env = TestEnv::with(Store::Fs, &vars).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "f1", "prompt": "a fallen castle"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.providers_tried, ["comfyui", "sd"]);
    assert_eq!(gpu.api.stats().billed, 0);
    assert_eq!(sd.api.runs_for("a fallen castle"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_reference_is_uploaded_and_loaded_by_the_workflows_load_image_node() {
    let gpu = fake(ComfyOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let workflow = dir.path().join("img2img.json");
    std::fs::write(
        &workflow,
        json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
            "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
            "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 20, "cfg": 7.0,
                "sampler_name": "euler", "scheduler": "normal", "denoise": 0.6, "model": ["4", 0],
                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "edit", "images": ["8", 0]}}
        })
        .to_string(),
    )
    .unwrap();
    let mut vars = settings(&[&gpu]);
    vars.extend([
        (
            "providers.comfyui.workflow",
            workflow.to_str().unwrap().to_string(),
        ),
        ("providers.comfyui.inputs.width", String::new()),
        ("providers.comfyui.inputs.height", String::new()),
        ("providers.comfyui.inputs.count", String::new()),
        ("providers.comfyui.inputs.images", "10.image".into()),
    ]);
    let env = TestEnv::with(Store::Fs, &vars).await;
    let (key, png) = crate::helpers::stored_png(&env, "plate.png", 24, [1, 2, 3]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"version": 3, "id": "ref1", "prompt": "the plate, at dusk",
        "images": [key]}),
    )
    .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(gpu.api.loaded(), vec![vec![imagegen_fakes::digest(&png)]]);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}
