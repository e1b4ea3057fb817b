use super::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn graph(text: &str, batch: u32) -> Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "run/img", "images": ["8", 0]}}
    })
}

const ID: &str = "0b5c1f3e-8a2d-4c6f-9e1a-2b3c4d5e6f70";

async fn post(url: String, body: Value) -> (u16, Value) {
    let r = client().post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(url: String) -> (u16, Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_prompt_waits_runs_once_and_leaves_history_and_files() {
    let server = ComfyFake::new(ComfyOptions::default())
        .start()
        .await
        .unwrap();
    let base = server.base_url();
    let (status, queued) = post(
        format!("{base}/prompt"),
        json!({"prompt": graph("a castle", 2), "client_id": "c", "prompt_id": ID}),
    )
    .await;
    assert_eq!(status, 200, "{queued}");
    assert_eq!(queued["prompt_id"], ID);
    // Waiting or running: history says nothing, as for a prompt it never had.
    assert_eq!(get(format!("{base}/history/{ID}")).await.1, json!({}));
    let (_, q) = get(format!("{base}/api/queue")).await;
    let held =
        q["queue_running"].as_array().unwrap().len() + q["queue_pending"].as_array().unwrap().len();
    assert_eq!(held, 1);
    // The same id again while it is held: 409.
    let (status, dup) = post(
        format!("{base}/prompt"),
        json!({"prompt": graph("a castle", 2), "prompt_id": ID}),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(dup["error"]["type"], "duplicate_prompt_id");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, h) = get(format!("{base}/history/{ID}")).await;
    assert_eq!(h[ID]["status"]["status_str"], "success");
    let images = h[ID]["outputs"]["9"]["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["subfolder"], "run");
    let (_, job) = get(format!("{base}/api/jobs/{ID}")).await;
    assert_eq!(job["status"], "completed");
    let r = client()
        .get(format!(
            "{base}/view?filename={}&subfolder=run&type=output",
            images[1]["filename"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().starts_with(b"\x89PNG"));
    assert_eq!(server.api.runs()[ID], 1);
    // A restart forgets the history; the files stay.
    server.api.restart();
    assert_eq!(get(format!("{base}/history/{ID}")).await.1, json!({}));
    assert_eq!(
        get(format!("{base}/api/jobs/{ID}")).await,
        (404, json!({"error": "Job not found"}))
    );
}

#[tokio::test]
async fn bad_graphs_and_ids_are_refused_as_comfyui_does() {
    let server = ComfyFake::new(ComfyOptions {
        checkpoints: vec!["sdxl.safetensors".into()],
        jobs_api: false,
        ..ComfyOptions::default()
    })
    .start()
    .await
    .unwrap();
    let base = server.base_url();
    let mut g = graph("x", 1);
    g["3"]["inputs"].as_object_mut().unwrap().remove("seed");
    g["4"]["inputs"]["ckpt_name"] = json!("missing.safetensors");
    let (status, e) = post(format!("{base}/prompt"), json!({"prompt": g})).await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(
        e["node_errors"]["3"]["errors"][0]["type"],
        "required_input_missing"
    );
    assert_eq!(e["node_errors"]["3"]["class_type"], "KSampler");
    assert_eq!(
        e["node_errors"]["4"]["errors"][0]["type"],
        "value_not_in_list"
    );
    let (status, e) = post(
        format!("{base}/prompt"),
        json!({"prompt": graph("x", 1), "prompt_id": "job-1"}),
    )
    .await;
    assert_eq!(
        (status, e["error"]["type"].clone()),
        (400, json!("invalid_prompt_id"))
    );
    let mut g = graph("x", 1);
    g["9"]["class_type"] = json!("VAEDecode");
    let (status, e) = post(format!("{base}/prompt"), json!({"prompt": g})).await;
    assert_eq!(
        (status, e["error"]["type"].clone()),
        (400, json!("prompt_no_outputs"))
    );
    let (status, e) = post(
        format!("{base}/prompt"),
        json!({"prompt": {"1": {"class_type": "Upscaler9000", "inputs": {}}}}),
    )
    .await;
    assert_eq!(
        (status, e["error"]["type"].clone()),
        (400, json!("missing_node_type"))
    );
    // An older server: no jobs API, its own 404 page.
    let r = client()
        .get(format!("{base}/api/jobs/{ID}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), "404: Not Found");
    assert_eq!(server.api.stats().billed, 0, "nothing refused ran");
}

#[tokio::test]
async fn one_prompt_runs_at_a_time_and_an_interrupt_stops_only_its_target() {
    let server = ComfyFake::new(ComfyOptions {
        generation: Duration::from_millis(300),
        ..ComfyOptions::default()
    })
    .start()
    .await
    .unwrap();
    let base = server.base_url();
    for text in ["first", "second", "third"] {
        assert_eq!(
            post(format!("{base}/prompt"), json!({"prompt": graph(text, 1)}))
                .await
                .0,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, q) = get(format!("{base}/queue")).await;
    assert_eq!(q["queue_running"].as_array().unwrap().len(), 1);
    assert_eq!(q["queue_pending"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(format!("{base}/prompt")).await.1["exec_info"]["queue_remaining"],
        3
    );
    let running = q["queue_running"][0][1].as_str().unwrap().to_string();
    // An interrupt naming another prompt does nothing.
    post(format!("{base}/interrupt"), json!({"prompt_id": ID})).await;
    post(format!("{base}/interrupt"), json!({"prompt_id": running})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, h) = get(format!("{base}/history/{running}")).await;
    assert_eq!(h[&running]["status"]["status_str"], "error");
    assert_eq!(
        h[&running]["status"]["messages"][1][0],
        "execution_interrupted"
    );
    assert_eq!(
        server.api.runs_for("second") + server.api.runs_for("third"),
        1,
        "the next one runs"
    );
}
