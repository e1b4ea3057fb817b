//! The kinds of provider and the keys of each (`[provider_defaults.KIND]` documents them all in
//! `config/default.toml`); their start-up checks are in `checks.rs`.

use secrecy::SecretString;
use serde::Deserialize;

pub use super::azure::{AzureAuth, AzureOpenAiSettings, AzureSurface};
pub use super::selfhosted::{Automatic1111Settings, ComfyUiInputs, ComfyUiSettings};

/// The kinds of provider this worker has a driver for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// The OpenAI Images API, or a host that speaks it.
    Openai,
    /// Renders a deterministic PNG locally: no network, no cost.
    Placeholder,
    /// The Gemini API's image models (`generateContent`).
    Gemini,
    /// Black Forest Labs' FLUX models: submit, then poll.
    Bfl,
    /// Azure OpenAI: the Images API of a deployment (classic or v1 surface), by key or Entra ID.
    AzureOpenai,
    /// Stability AI's Stable Image API (v2beta, multipart).
    Stability,
    /// Replicate's predictions: create, then poll.
    Replicate,
    /// fal's queue: submit, then poll.
    Fal,
    /// Self-hosted ComfyUI servers: a workflow queued under an id of the worker's, then polled.
    ComfyUi,
    /// A self-hosted AUTOMATIC1111 web UI (or Forge): `txt2img`, synchronous.
    Automatic1111,
}

impl ProviderKind {
    /// Every kind, as written in `kind`.
    pub const ALL: &'static [ProviderKind] = &[
        ProviderKind::Openai,
        ProviderKind::Placeholder,
        ProviderKind::Gemini,
        ProviderKind::Bfl,
        ProviderKind::AzureOpenai,
        ProviderKind::Stability,
        ProviderKind::Replicate,
        ProviderKind::Fal,
        ProviderKind::ComfyUi,
        ProviderKind::Automatic1111,
    ];

    /// The kind as written in `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Placeholder => "placeholder",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Bfl => "bfl",
            ProviderKind::AzureOpenai => "azure-openai",
            ProviderKind::Stability => "stability",
            ProviderKind::Replicate => "replicate",
            ProviderKind::Fal => "fal",
            ProviderKind::ComfyUi => "comfyui",
            ProviderKind::Automatic1111 => "automatic1111",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.as_str() == s)
    }

    pub(super) fn names() -> String {
        Self::ALL
            .iter()
            .map(|k| format!("\"{}\"", k.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `[provider_defaults.KIND]`: every key of each kind, with its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderDefaults {
    /// The keys of kind `openai`.
    pub openai: OpenAiSettings,
    /// The keys of kind `placeholder`.
    pub placeholder: PlaceholderSettings,
    /// The keys of kind `gemini`.
    pub gemini: GeminiSettings,
    /// The keys of kind `bfl`.
    pub bfl: BflSettings,
    /// The keys of kind `azure-openai`.
    #[serde(rename = "azure-openai")]
    pub azure_openai: AzureOpenAiSettings,
    /// The keys of kind `stability`.
    pub stability: StabilitySettings,
    /// The keys of kind `replicate`.
    pub replicate: ReplicateSettings,
    /// The keys of kind `fal`.
    pub fal: FalSettings,
    /// The keys of kind `comfyui`.
    pub comfyui: ComfyUiSettings,
    /// The keys of kind `automatic1111`.
    pub automatic1111: Automatic1111Settings,
}

/// Kind `fal`: requests put in fal's queue at `{base_url}/{model}`, then followed at the
/// `status_url` and `response_url` it answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FalSettings {
    /// Base URL of the queue (`https://queue.fal.run`).
    pub base_url: String,
    /// API key, sent as `Authorization: Key ...` to the base URL's host and fal's own only.
    /// Never logged.
    pub api_key: SecretString,
    /// Model of jobs that name none: the app's id (`fal-ai/flux/schnell`).
    pub model: String,
    /// The app's input a job's reference image goes to, as a data URI (`image_url` for most
    /// image-to-image apps).
    pub image_input: String,
    /// Size of jobs that name none: `WIDTHxHEIGHT`, one of fal's aspect ratios, or `auto`.
    pub size: String,
    /// Output format of jobs that name none: `png` or `jpeg`.
    pub output_format: String,
    /// Milliseconds before the first poll; later polls wait an eighth of the request's age.
    pub poll_min_ms: u64,
    /// Longest wait between two polls, in seconds.
    pub poll_max_secs: u64,
    /// Seconds allowed for one request (a submit, a poll or a download).
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest image accepted, in bytes.
    pub max_response_bytes: usize,
    /// Hosts (`host:port`) that images may come from over plain http or from a private
    /// address, besides the base URL's own. Others must be https and public.
    pub download_hosts: Vec<String>,
}

/// Kind `replicate`: predictions created at `{base_url}/v1/...`, then polled at their `urls.get`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicateSettings {
    /// Base URL of the API (`https://api.replicate.com`).
    pub base_url: String,
    /// API token, sent as a bearer token to the base URL's host only. Never logged.
    pub api_key: SecretString,
    /// Model of jobs that name none: `owner/name`, `owner/name:VERSION` or a version id.
    pub model: String,
    /// Images one prediction is asked for (`num_outputs`, when above 1): 1 for models that
    /// make one whatever they are asked, up to 4 for those that take `num_outputs`.
    pub images_per_call: u8,
    /// The model's input a job's reference image goes to, as a data URI (`image`,
    /// `input_image`, `image_prompt`: each model names its own).
    pub image_input: String,
    /// Size of jobs that name none: `WIDTHxHEIGHT`, `W:H` or `auto`.
    pub size: String,
    /// Output format of jobs that name none: `png`, `jpeg` or `webp`.
    pub output_format: String,
    /// Milliseconds before the first poll; later polls wait an eighth of the prediction's age.
    pub poll_min_ms: u64,
    /// Longest wait between two polls, in seconds.
    pub poll_max_secs: u64,
    /// Seconds allowed for one request (a create, a poll or a download).
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest image accepted, in bytes.
    pub max_response_bytes: usize,
    /// Hosts (`host:port`) that outputs may come from over plain http or from a private
    /// address, besides the base URL's own. Others must be https and public.
    pub download_hosts: Vec<String>,
}

/// Kind `stability`: `POST {base_url}/v2beta/stable-image/generate/{endpoint}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StabilitySettings {
    /// Base URL of the API (`https://api.stability.ai`).
    pub base_url: String,
    /// API key, sent as a bearer token. Never logged.
    pub api_key: SecretString,
    /// Model of jobs that name none: `ultra`, `core` or an SD 3.5 model.
    pub model: String,
    /// Size of jobs that name none: an aspect ratio, `WIDTHxHEIGHT` of one, or `auto`.
    pub size: String,
    /// Output format of jobs that name none: `png`, `jpeg` or `webp`.
    pub output_format: String,
    /// Seconds the API times an account out after a 429 (its answer names no delay): the wait
    /// before the job's next call.
    pub rate_limit_wait_secs: u64,
    /// Seconds allowed for one request, the answer's body included.
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest answer accepted, in bytes.
    pub max_response_bytes: usize,
}

/// How an `openai` provider sends its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthScheme {
    /// `Authorization: Bearer KEY` (OpenAI and compatible hosts).
    Bearer,
    /// The `api-key` header (Azure OpenAI with key authentication).
    ApiKey,
}

/// Kind `openai`: `POST {base_url}/images/generations`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSettings {
    /// Base URL of the API.
    pub base_url: String,
    /// API key. Never logged.
    pub api_key: SecretString,
    /// `bearer` or `api-key`.
    pub auth: AuthScheme,
    /// Model of jobs that name none.
    pub model: String,
    /// Size of jobs that name none.
    pub size: String,
    /// Quality of jobs that name none.
    pub quality: String,
    /// Output format of jobs that name none.
    pub output_format: String,
    /// Background of jobs that name none; empty: not sent.
    pub background: String,
    /// `url` or `b64_json` for models that take it; empty: not sent.
    pub response_format: String,
    /// Seconds allowed for one request, the answer's body included.
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest answer accepted, in bytes.
    pub max_response_bytes: usize,
    /// Hosts (`host:port`) that images answered by URL may come from over plain http or from a
    /// private address, besides the base URL's own. Others must be https and public.
    pub download_hosts: Vec<String>,
}

/// Kind `placeholder`: a PNG rendered from the prompt.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceholderSettings {
    /// The model reported in events (and looked up in the prices).
    pub model: String,
    /// Size of jobs that name none.
    pub size: String,
    /// Output format of jobs that name none (the image is a PNG whatever it says).
    pub output_format: String,
}

/// Kind `gemini`: `POST {base_url}/models/{model}:generateContent` with image output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeminiSettings {
    /// Base URL of the API version (`.../v1beta`).
    pub base_url: String,
    /// API key, sent as `x-goog-api-key`. Never logged.
    pub api_key: SecretString,
    /// Model of jobs that name none.
    pub model: String,
    /// Size of jobs that name none: an aspect ratio, `WIDTHxHEIGHT` of one, or `auto`.
    pub size: String,
    /// Seconds allowed for one request, the answer's body included.
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest answer accepted, in bytes.
    pub max_response_bytes: usize,
}

/// Kind `bfl`: `POST {base_url}/{model}`, then `GET` of the `polling_url` it answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BflSettings {
    /// Base URL of the API (`https://api.bfl.ai/v1`, or a regional host).
    pub base_url: String,
    /// API key, sent as `x-key` to BFL's own hosts only. Never logged.
    pub api_key: SecretString,
    /// Model of jobs that name none (the path after the base URL).
    pub model: String,
    /// Size of jobs that name none: `WIDTHxHEIGHT` or `auto`.
    pub size: String,
    /// Output format of jobs that name none: `png` or `jpeg`.
    pub output_format: String,
    /// Tasks this worker keeps active at the provider at once (the account allows 24 by
    /// default, fewer for some models); a submit above it waits.
    pub max_active: usize,
    /// Milliseconds before the first poll of a task; later polls wait an eighth of its age.
    pub poll_min_ms: u64,
    /// Longest wait between two polls of a task, in seconds.
    pub poll_max_secs: u64,
    /// Seconds allowed for one request (a submit, a poll or a download).
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest image accepted, in bytes.
    pub max_response_bytes: usize,
    /// Hosts (`host:port`) that samples may come from over plain http or from a private
    /// address, besides the base URL's own. Others must be https and public.
    pub download_hosts: Vec<String>,
}

/// The keys of a provider's kind.
#[derive(Debug, Clone)]
pub enum KindSettings {
    /// Kind `openai`.
    Openai(OpenAiSettings),
    /// Kind `placeholder`.
    Placeholder(PlaceholderSettings),
    /// Kind `gemini`.
    Gemini(GeminiSettings),
    /// Kind `bfl`.
    Bfl(BflSettings),
    /// Kind `azure-openai`.
    AzureOpenai(AzureOpenAiSettings),
    /// Kind `stability`.
    Stability(StabilitySettings),
    /// Kind `replicate`.
    Replicate(ReplicateSettings),
    /// Kind `fal`.
    Fal(FalSettings),
    /// Kind `comfyui`.
    ComfyUi(ComfyUiSettings),
    /// Kind `automatic1111`.
    Automatic1111(Automatic1111Settings),
}

impl KindSettings {
    /// The kind these settings are of.
    pub fn kind(&self) -> ProviderKind {
        match self {
            KindSettings::Openai(_) => ProviderKind::Openai,
            KindSettings::Placeholder(_) => ProviderKind::Placeholder,
            KindSettings::Gemini(_) => ProviderKind::Gemini,
            KindSettings::Bfl(_) => ProviderKind::Bfl,
            KindSettings::AzureOpenai(_) => ProviderKind::AzureOpenai,
            KindSettings::Stability(_) => ProviderKind::Stability,
            KindSettings::Replicate(_) => ProviderKind::Replicate,
            KindSettings::Fal(_) => ProviderKind::Fal,
            KindSettings::ComfyUi(_) => ProviderKind::ComfyUi,
            KindSettings::Automatic1111(_) => ProviderKind::Automatic1111,
        }
    }
}
