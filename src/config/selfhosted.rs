//! The keys of the self-hosted kinds (`comfyui`, `automatic1111`): servers a team runs on its own
//! GPUs, usually on a private network, with no key of their own.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use imagegen_core::comfyui::workflow::{Points as ComfyUiInputs, Workflow};

use super::{ConfigError, in_range, invalid};

/// The text-to-image workflow a `comfyui` provider runs when it names none: a checkpoint,
/// positive and negative prompts, an empty latent, KSampler, VAE decode, SaveImage. Its points
/// are the defaults of `inputs`.
pub const BUILT_IN_WORKFLOW: &str = include_str!("../../config/workflows/comfyui-txt2img.json");

/// Kind `comfyui`: a workflow run on one or more ComfyUI servers (one per GPU).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComfyUiSettings {
    /// Base URLs of the servers (`http://gpu-1:8188`), one per GPU: each job goes to the one
    /// with the shortest queue. These hosts, and no others, may be private addresses.
    pub hosts: Vec<String>,
    /// Bearer token for a proxy in front of the servers (ComfyUI has no auth of its own);
    /// empty: none. Never logged.
    pub api_key: SecretString,
    /// Path of the workflow, in ComfyUI's API format ("Export (API)"); empty: the built-in
    /// text-to-image workflow.
    pub workflow: String,
    /// Where the job's fields go in the workflow, each as `NODE.INPUT`.
    pub inputs: ComfyUiInputs,
    /// The node whose saved images are the job's; empty: every node that saves images.
    pub output_node: String,
    /// Model of jobs that name none, put at `inputs.model`; empty: the workflow's own.
    pub model: String,
    /// Size of jobs that name none: `WIDTHxHEIGHT` (sides multiples of 8), or `auto` (the
    /// workflow's own).
    pub size: String,
    /// Images one run makes at most (put at `inputs.count`).
    pub images_per_call: u8,
    /// Milliseconds before the first poll; later polls wait an eighth of the prompt's age.
    pub poll_min_ms: u64,
    /// Longest wait between two polls, in seconds.
    pub poll_max_secs: u64,
    /// Seconds allowed for one request (a submit, a poll, an image download).
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest image accepted, in bytes.
    pub max_response_bytes: usize,
    /// Seconds a server that stopped answering stays out of the rotation before it is asked
    /// again.
    pub host_probe_secs: u64,
    /// GPU seconds an image is expected to take, for the spend caps' estimate before a run (a
    /// finished run reports its own).
    pub seconds_per_image: f64,
}

/// Kind `automatic1111`: `POST {base_url}/sdapi/v1/txt2img` on AUTOMATIC1111's web UI or Forge
/// (started with `--api`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Automatic1111Settings {
    /// Base URL of the server (`http://gpu-1:7860`): it may be a private address.
    pub base_url: String,
    /// User of `--api-auth` (HTTP Basic); empty: no auth.
    pub username: String,
    /// Password of `--api-auth`. Never logged.
    pub password: SecretString,
    /// Checkpoint of jobs that name none, sent as `override_settings.sd_model_checkpoint`;
    /// empty: the one the server has loaded.
    pub model: String,
    /// Size of jobs that name none: `WIDTHxHEIGHT`, or `auto` (the server's 512x512).
    pub size: String,
    /// Images one call makes at most (`batch_size`).
    pub images_per_call: u8,
    /// Seconds allowed for one call: the server runs one at a time, so this covers the wait
    /// behind others' too.
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest answer accepted, in bytes (base64 PNGs of the whole batch).
    pub max_response_bytes: usize,
    /// GPU seconds an image is expected to take, for the spend caps' estimate before a call.
    pub seconds_per_image: f64,
}

/// A server's base URL: http(s), parseable.
fn validate_url(key: String, url: &str) -> Result<(), ConfigError> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && reqwest::Url::parse(url).is_ok_and(|u| u.host_str().is_some());
    if !ok {
        return Err(invalid(
            key,
            format!("{url:?} is not an http:// or https:// URL"),
        ));
    }
    Ok(())
}

fn validate_times(
    section: &str,
    [request_timeout_secs, connect_timeout_secs]: [u64; 2],
    max_response_bytes: usize,
    seconds_per_image: f64,
) -> Result<(), ConfigError> {
    super::checks::validate_limits(
        section,
        [request_timeout_secs, connect_timeout_secs],
        max_response_bytes,
    )?;
    if !(seconds_per_image.is_finite() && seconds_per_image > 0.0) {
        return Err(invalid(
            format!("{section}.seconds_per_image"),
            "must be above 0",
        ));
    }
    Ok(())
}

/// A size setting: `auto` or `WIDTHxHEIGHT`.
fn validate_size(section: &str, size: &str) -> Result<(), ConfigError> {
    let pixels = size
        .split_once('x')
        .is_some_and(|(w, h)| w.parse::<u32>().is_ok() && h.parse::<u32>().is_ok());
    if size != "auto" && !pixels {
        return Err(invalid(
            format!("{section}.size"),
            "must be WIDTHxHEIGHT or auto",
        ));
    }
    Ok(())
}

impl ComfyUiSettings {
    /// The workflow, read and checked against `inputs` and `output_node`.
    pub fn load_workflow(&self) -> Result<Workflow, String> {
        let text = if self.workflow.trim().is_empty() {
            BUILT_IN_WORKFLOW.to_string()
        } else {
            std::fs::read_to_string(&self.workflow)
                .map_err(|e| format!("{:?} cannot be read: {e}", self.workflow))?
        };
        Workflow::parse(&text, &self.inputs, &self.output_node)
    }

    pub(super) fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{section}.{name}");
        if self.hosts.is_empty() {
            return Err(invalid(key("hosts"), "must name at least one server"));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            validate_url(key("hosts"), host)?;
            if self.hosts[..i].contains(host) {
                return Err(invalid(key("hosts"), format!("names {host} twice")));
            }
        }
        self.load_workflow()
            .map_err(|e| invalid(key("workflow"), e))?;
        validate_size(section, &self.size)?;
        in_range(key("images_per_call"), self.images_per_call.into(), 1, 64)?;
        super::checks::validate_polls(section, self.poll_min_ms, self.poll_max_secs)?;
        in_range(key("host_probe_secs"), self.host_probe_secs, 1, 3600)?;
        validate_times(
            section,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
            self.seconds_per_image,
        )
    }
}

impl Automatic1111Settings {
    pub(super) fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{section}.{name}");
        validate_url(key("base_url"), &self.base_url)?;
        if self.username.is_empty() != self.password.expose_secret().is_empty() {
            return Err(invalid(
                key("password"),
                "username and password go together (--api-auth USER:PASSWORD), or neither",
            ));
        }
        validate_size(section, &self.size)?;
        in_range(key("images_per_call"), self.images_per_call.into(), 1, 64)?;
        validate_times(
            section,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
            self.seconds_per_image,
        )
    }
}
