//! A ComfyUI workflow in the API format (`{NODE: {"class_type", "inputs": {...}}}`, as ComfyUI's
//! "Export (API)" writes it) and the named points where a job's fields go into it (`prompt` into
//! `6.text`, `seed` into `3.seed`, ...). Checked once, when the worker starts: every point names
//! a node of the graph and an input that node has, so a typo in config fails the start, not
//! every job.

use serde_json::{Map, Value};

/// The job's fields a workflow takes, and where each goes: `NODE.INPUT` (the node's id in the
/// graph, a dot, the input's name). Empty: the workflow keeps its own value.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Points {
    /// The prompt (required: a workflow that ignores it makes the same image for every job).
    pub prompt: String,
    /// The negative prompt.
    #[serde(default)]
    pub negative_prompt: String,
    /// The seed (a job without one gets a random one, or every job of the workflow would make
    /// the same image for the same prompt).
    #[serde(default)]
    pub seed: String,
    /// The width in pixels.
    #[serde(default)]
    pub width: String,
    /// The height in pixels.
    #[serde(default)]
    pub height: String,
    /// The images one run makes (a latent's `batch_size`).
    #[serde(default)]
    pub count: String,
    /// The model (a checkpoint's file name).
    #[serde(default)]
    pub model: String,
    /// Where a job's reference images go, in order: each the image input of a load-image
    /// node (`10.image`), set to the name of the file uploaded for it.
    #[serde(default)]
    pub images: Vec<String>,
}

/// One substitution point, resolved.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    node: String,
    input: String,
}

/// What one run puts into the workflow.
#[derive(Debug, Clone, Default)]
pub struct Values<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub seed: u64,
    pub size: Option<(u32, u32)>,
    pub count: u32,
    pub model: Option<&'a str>,
    /// The names of the uploaded reference images, in the order of the image points.
    pub images: &'a [String],
}

/// A checked workflow, ready to take a job's fields.
#[derive(Debug, Clone)]
pub struct Workflow {
    graph: Map<String, Value>,
    prompt: Point,
    negative_prompt: Option<Point>,
    seed: Option<Point>,
    width: Option<Point>,
    height: Option<Point>,
    count: Option<Point>,
    model: Option<Point>,
    images: Vec<Point>,
    /// The node whose saved images are the job's, when one is named.
    output_node: Option<String>,
}

impl Workflow {
    /// Reads and checks `text` (the workflow's JSON) with its points and output node (empty:
    /// any node's saved images). The error says what is wrong and where.
    pub fn parse(text: &str, points: &Points, output_node: &str) -> Result<Self, String> {
        let graph: Map<String, Value> = serde_json::from_str(text).map_err(|e| {
            format!("is not a workflow in ComfyUI's API format (a JSON object of nodes): {e}")
        })?;
        if graph.is_empty() {
            return Err("has no nodes".into());
        }
        for (id, node) in &graph {
            let ok = node.get("class_type").is_some_and(Value::is_string)
                && node.get("inputs").is_some_and(Value::is_object);
            if !ok {
                return Err(format!(
                    "node {id} has no class_type or no inputs: is this the API format (\"Export \
                     (API)\"), not the UI's workflow file?"
                ));
            }
        }
        let point = |name: &str, at: &str| -> Result<Option<Point>, String> {
            if at.trim().is_empty() {
                return Ok(None);
            }
            let (node, input) = at.rsplit_once('.').ok_or_else(|| {
                format!(
                    "inputs.{name} = {at:?} is not NODE.INPUT (the node's id, a dot, the input)"
                )
            })?;
            let Some(n) = graph.get(node) else {
                return Err(format!(
                    "inputs.{name} names node {node}, which the workflow does not have"
                ));
            };
            if n["inputs"].get(input).is_none() {
                let class = n["class_type"].as_str().unwrap_or("?");
                let has: Vec<&str> = n["inputs"]
                    .as_object()
                    .map(|i| i.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                return Err(format!(
                    "inputs.{name} names input {input:?} of node {node} ({class}), which has \
                     only {has:?}"
                ));
            }
            Ok(Some(Point {
                node: node.into(),
                input: input.into(),
            }))
        };
        let images = points
            .images
            .iter()
            .enumerate()
            .map(|(i, at)| {
                point(&format!("images[{i}]"), at)?
                    .ok_or_else(|| format!("inputs.images[{i}] is empty"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let prompt = point("prompt", &points.prompt)?
            .ok_or("inputs.prompt must name where the prompt goes (NODE.INPUT)")?;
        let output_node = match output_node.trim() {
            "" => None,
            node if graph.contains_key(node) => Some(node.to_string()),
            node => return Err(format!("output_node {node} is not a node of the workflow")),
        };
        Ok(Self {
            prompt,
            negative_prompt: point("negative_prompt", &points.negative_prompt)?,
            seed: point("seed", &points.seed)?,
            width: point("width", &points.width)?,
            height: point("height", &points.height)?,
            count: point("count", &points.count)?,
            model: point("model", &points.model)?,
            images,
            output_node,
            graph,
        })
    }

    /// The graph with `values` in their points.
    pub fn fill(&self, values: &Values<'_>) -> Map<String, Value> {
        let mut graph = self.graph.clone();
        let mut set = |point: &Option<Point>, value: Value| {
            if let Some(p) = point
                && let Some(inputs) = graph
                    .get_mut(&p.node)
                    .and_then(|n| n.get_mut("inputs"))
                    .and_then(Value::as_object_mut)
            {
                inputs.insert(p.input.clone(), value);
            }
        };
        set(&Some(self.prompt.clone()), values.prompt.into());
        if let Some(negative) = values.negative_prompt {
            set(&self.negative_prompt, negative.into());
        }
        set(&self.seed, values.seed.into());
        if let Some((width, height)) = values.size {
            set(&self.width, width.into());
            set(&self.height, height.into());
        }
        set(&self.count, values.count.into());
        if let Some(model) = values.model {
            set(&self.model, model.into());
        }
        for (point, name) in self.images.iter().zip(values.images) {
            set(&Some(point.clone()), name.as_str().into());
        }
        graph
    }

    /// Whether it takes each field (a job that sets one it does not take is refused).
    pub fn takes_negative_prompt(&self) -> bool {
        self.negative_prompt.is_some()
    }

    pub fn takes_seed(&self) -> bool {
        self.seed.is_some()
    }

    pub fn takes_size(&self) -> bool {
        self.width.is_some() && self.height.is_some()
    }

    pub fn takes_count(&self) -> bool {
        self.count.is_some()
    }

    pub fn takes_model(&self) -> bool {
        self.model.is_some()
    }

    /// How many reference images it takes (its image points).
    pub fn image_points(&self) -> usize {
        self.images.len()
    }

    /// The model the workflow names at its model point, as written in it.
    pub fn own_model(&self) -> Option<&str> {
        let p = self.model.as_ref()?;
        self.graph.get(&p.node)?["inputs"].get(&p.input)?.as_str()
    }

    /// The node whose images are the job's, when one is named.
    pub fn output_node(&self) -> Option<&str> {
        self.output_node.as_deref()
    }
}

/// A random version-4 UUID in its canonical lowercase form (the only form of `prompt_id`
/// recent servers take): the id a worker gives its prompt before submitting it.
pub fn new_prompt_id() -> String {
    let mut b: [u8; 16] = fastrand::u128(..).to_le_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAPH: &str = r#"{
        "4":{"class_type":"CheckpointLoaderSimple","inputs":{"ckpt_name":"sdxl.safetensors"}},
        "5":{"class_type":"EmptyLatentImage","inputs":{"width":512,"height":512,"batch_size":1}},
        "6":{"class_type":"CLIPTextEncode","inputs":{"text":"","clip":["4",1]}},
        "3":{"class_type":"KSampler","inputs":{"seed":1,"model":["4",0],"positive":["6",0]}},
        "9":{"class_type":"SaveImage","inputs":{"filename_prefix":"x","images":["3",0]}}}"#;

    fn points() -> Points {
        Points {
            prompt: "6.text".into(),
            seed: "3.seed".into(),
            width: "5.width".into(),
            height: "5.height".into(),
            count: "5.batch_size".into(),
            model: "4.ckpt_name".into(),
            ..Points::default()
        }
    }

    #[test]
    fn the_jobs_fields_go_into_their_points() {
        let w = Workflow::parse(GRAPH, &points(), "9").unwrap();
        assert_eq!(w.own_model(), Some("sdxl.safetensors"));
        let g = w.fill(&Values {
            prompt: "a castle",
            seed: 42,
            size: Some((1024, 768)),
            count: 3,
            model: Some("flux.safetensors"),
            ..Values::default()
        });
        assert_eq!(g["6"]["inputs"]["text"], "a castle");
        assert_eq!(g["6"]["inputs"]["clip"], serde_json::json!(["4", 1]));
        assert_eq!(g["3"]["inputs"]["seed"], 42);
        assert_eq!(g["5"]["inputs"]["width"], 1024);
        assert_eq!(g["5"]["inputs"]["batch_size"], 3);
        assert_eq!(g["4"]["inputs"]["ckpt_name"], "flux.safetensors");
        assert!(!w.takes_negative_prompt());
    }

    #[test]
    fn a_point_the_graph_lacks_fails_with_where() {
        let mut p = points();
        p.seed = "12.seed".into();
        let e = Workflow::parse(GRAPH, &p, "").unwrap_err();
        assert!(e.contains("inputs.seed names node 12"), "{e}");
        let mut p = points();
        p.seed = "3.noise_seed".into();
        let e = Workflow::parse(GRAPH, &p, "").unwrap_err();
        assert!(e.contains("\"noise_seed\" of node 3 (KSampler)"), "{e}");
        let mut p = points();
        p.prompt = String::new();
        assert!(Workflow::parse(GRAPH, &p, "").is_err());
        assert!(Workflow::parse(GRAPH, &points(), "99").is_err());
        let ui = r#"{"nodes":[{"id":1}],"links":[]}"#;
        assert!(
            Workflow::parse(ui, &points(), "")
                .unwrap_err()
                .contains("API format")
        );
    }

    #[test]
    fn prompt_ids_are_canonical_v4_uuids() {
        let id = new_prompt_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(id, id.to_lowercase());
        assert_ne!(id, new_prompt_id());
    }
}
