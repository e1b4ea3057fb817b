//! How a ComfyUI server checks a prompt's graph before it queues it (its `validate_prompt`), for
//! the nodes of a text-to-image workflow: every node has a known `class_type`; there is an output
//! node; every required input is there; a link (`["NODE", SLOT]`) names a node of the graph; a
//! checkpoint is one the server has. The answers are ComfyUI's 400 bodies: `{"error": {"type",
//! "message", "details", "extra_info"}, "node_errors": {NODE: {"errors", "dependent_outputs",
//! "class_type"}}}`.

use serde_json::{Map, Value, json};

/// The nodes the fake knows, with their required inputs; output nodes last.
const NODES: &[(&str, &[&str])] = &[
    ("CheckpointLoaderSimple", &["ckpt_name"]),
    ("CLIPTextEncode", &["text", "clip"]),
    ("EmptyLatentImage", &["width", "height", "batch_size"]),
    (
        "KSampler",
        &[
            "model",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "denoise",
        ],
    ),
    ("VAEDecode", &["samples", "vae"]),
    ("VAEEncode", &["pixels", "vae"]),
    ("LoadImage", &["image"]),
    ("SaveImage", &["images", "filename_prefix"]),
    ("PreviewImage", &["images"]),
];

const OUTPUT_NODES: &[&str] = &["SaveImage", "PreviewImage"];

fn error(kind: &str, message: &str, details: &str) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": {}})
}

/// Checks `prompt` as the server would (`has_input`: whether the input folder has a file, for
/// load-image nodes). `Err`: the 400 body.
pub(crate) fn validate(
    prompt: &Map<String, Value>,
    checkpoints: &[String],
    has_input: &dyn Fn(&str) -> bool,
) -> Result<(), Value> {
    for (id, node) in prompt {
        let class = node.get("class_type").and_then(Value::as_str);
        let title = node
            .pointer("/_meta/title")
            .and_then(Value::as_str)
            .map(str::to_string);
        let Some(class) = class else {
            return Err(json!({
                "error": {"type": "missing_node_type",
                    "message": format!("Node '{}' has no class_type. The workflow may be corrupted or a custom node is missing.", title.clone().unwrap_or(format!("ID #{id}"))),
                    "details": format!("Node ID '#{id}'"),
                    "extra_info": {"node_id": id, "class_type": null, "node_title": title}},
                "node_errors": {}}));
        };
        if !NODES.iter().any(|(c, _)| *c == class) {
            return Err(json!({
                "error": {"type": "missing_node_type",
                    "message": format!("Node '{}' not found. The custom node may not be installed.", title.clone().unwrap_or(class.to_string())),
                    "details": format!("Node ID '#{id}'"),
                    "extra_info": {"node_id": id, "class_type": class, "node_title": title}},
                "node_errors": {}}));
        }
    }
    let outputs: Vec<&String> = prompt
        .iter()
        .filter(|(_, n)| {
            n.get("class_type")
                .and_then(Value::as_str)
                .is_some_and(|c| OUTPUT_NODES.contains(&c))
        })
        .map(|(id, _)| id)
        .collect();
    if outputs.is_empty() {
        return Err(json!({
            "error": error("prompt_no_outputs", "Prompt has no outputs", ""),
            "node_errors": {}}));
    }
    let mut node_errors = Map::new();
    for (id, node) in prompt {
        let class = node["class_type"].as_str().unwrap_or_default();
        let required = NODES
            .iter()
            .find(|(c, _)| *c == class)
            .map_or(&[][..], |(_, r)| *r);
        let inputs = node.get("inputs").and_then(Value::as_object);
        let mut errors = Vec::new();
        for input in required {
            let value = inputs.and_then(|i| i.get(*input));
            let Some(value) = value else {
                errors.push(json!({"type": "required_input_missing",
                    "message": "Required input is missing", "details": input,
                    "extra_info": {"input_name": input}}));
                continue;
            };
            if let Some(link) = value.as_array() {
                let ok = link.len() == 2
                    && link[0].as_str().is_some_and(|n| prompt.contains_key(n))
                    && link[1].is_u64();
                if !ok {
                    errors.push(json!({"type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        "details": input,
                        "extra_info": {"input_name": input, "received_value": value}}));
                }
                continue;
            }
            match (class, *input) {
                ("CheckpointLoaderSimple", "ckpt_name")
                    if !checkpoints.is_empty()
                        && !value
                            .as_str()
                            .is_some_and(|v| checkpoints.iter().any(|c| c == v)) =>
                {
                    errors.push(
                        json!({"type": "value_not_in_list", "message": "Value not in list",
                        "details": format!("ckpt_name: {value} not in {checkpoints:?}"),
                        "extra_info": {"input_name": "ckpt_name", "received_value": value}}),
                    );
                }
                ("LoadImage", "image") if !value.as_str().is_some_and(has_input) => {
                    errors.push(json!({"type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": format!("image - Invalid image file: {}", value.as_str().unwrap_or("")),
                        "extra_info": {"input_name": "image", "received_value": value}}));
                }
                ("EmptyLatentImage", "width" | "height") => match value.as_i64() {
                    Some(v) if v < 16 => errors.push(bound(input, value, "smaller than min of 16")),
                    Some(v) if v > 16_384 => {
                        errors.push(bound(input, value, "bigger than max of 16384"))
                    }
                    Some(_) => {}
                    None => errors.push(not_int(input, value)),
                },
                ("EmptyLatentImage", "batch_size") | ("KSampler", "seed" | "steps") => {
                    match value.as_i64().or_else(|| value.as_u64().map(|_| 1)) {
                        Some(v) if v < 0 || (v < 1 && *input != "seed") => {
                            errors.push(bound(input, value, "smaller than min of 1"))
                        }
                        Some(_) => {}
                        None => errors.push(not_int(input, value)),
                    }
                }
                _ => {}
            }
        }
        if !errors.is_empty() {
            node_errors.insert(
                id.clone(),
                json!({"errors": errors, "dependent_outputs": outputs, "class_type": class}),
            );
        }
    }
    if node_errors.is_empty() {
        return Ok(());
    }
    let details: Vec<String> = node_errors
        .values()
        .flat_map(|n| n["errors"].as_array().cloned().unwrap_or_default())
        .map(|e| format!("{}: {}", e["message"].as_str().unwrap_or(""), e["details"]))
        .collect();
    Err(json!({
        "error": error("prompt_outputs_failed_validation", "Prompt outputs failed validation", &details.join("\n")),
        "node_errors": node_errors}))
}

fn bound(input: &str, value: &Value, what: &str) -> Value {
    json!({"type": if what.starts_with("smaller") { "value_smaller_than_min" } else { "value_bigger_than_max" },
        "message": format!("Value {value} {what}"), "details": input,
        "extra_info": {"input_name": input, "received_value": value}})
}

fn not_int(input: &str, value: &Value) -> Value {
    json!({"type": "invalid_input_type",
        "message": "Failed to convert an input value to a INT value",
        "details": format!("{input}, {value}, invalid literal"),
        "extra_info": {"input_name": input, "received_value": value}})
}

/// What a run of the graph makes: for each output node, its images (batch size of the latent
/// it decodes, at the latent's size) and its file name prefix; and the prompt text (for rules
/// and the ledger). A simplification of execution: the first empty latent sets the batch.
pub(crate) struct Plan {
    pub text: String,
    pub batch: u32,
    pub width: u32,
    pub height: u32,
    /// (node id, filename prefix, type) of each output node.
    pub outputs: Vec<(String, String, &'static str)>,
    /// The input files its load-image nodes read, in node order.
    pub loads: Vec<String>,
}

pub(crate) fn plan(prompt: &Map<String, Value>) -> Plan {
    let mut text = Vec::new();
    let mut batch = 1;
    let (mut width, mut height) = (512, 512);
    let mut outputs = Vec::new();
    let mut loads = Vec::new();
    for (id, node) in prompt {
        let inputs = &node["inputs"];
        match node["class_type"].as_str().unwrap_or_default() {
            "CLIPTextEncode" => {
                if let Some(t) = inputs["text"].as_str().filter(|t| !t.is_empty()) {
                    text.push(t.to_string());
                }
            }
            "EmptyLatentImage" => {
                batch = inputs["batch_size"].as_u64().unwrap_or(1).clamp(1, 64) as u32;
                width = inputs["width"].as_u64().unwrap_or(512) as u32;
                height = inputs["height"].as_u64().unwrap_or(512) as u32;
            }
            "SaveImage" => outputs.push((
                id.clone(),
                inputs["filename_prefix"]
                    .as_str()
                    .unwrap_or("ComfyUI")
                    .to_string(),
                "output",
            )),
            "PreviewImage" => outputs.push((id.clone(), "ComfyUI_temp".into(), "temp")),
            "LoadImage" => {
                if let Some(name) = inputs["image"].as_str() {
                    loads.push(name.to_string());
                }
            }
            _ => {}
        }
    }
    Plan {
        text: text.join(" | "),
        batch,
        width,
        height,
        outputs,
        loads,
    }
}
