//! Azure OpenAI: the OpenAI Images API of an Azure resource's deployments, with Azure's URLs
//! and credentials.
//!
//! - The classic surface: `{endpoint}/openai/deployments/{model}/images/generations` with the
//!   `api-version` as a query string; the v1 surface: `{endpoint}/openai/v1/images/generations`
//!   with the deployment as the body's `model`. Either way a job's `model` names a deployment.
//! - The `api-key` header, or Microsoft Entra ID bearer tokens ([`entra`]).
//! - Answers, errors and rate-limit headers are OpenAI's: the same reader classifies Azure's
//!   content-filter codes (`contentFilter`, `content_policy_violation` with an inner
//!   `ResponsibleAIPolicyViolation`) as `content_policy`.
//! - No WebP: a job that asks for it is refused before any call.

pub mod entra;

use std::sync::Arc;

use secrecy::SecretString;

use self::entra::EntraTokens;
use super::buffers::BufferPool;
use super::openai::{OpenAi, Target};
use super::{Capabilities, Mode, Sizes};
use crate::config::{AuthScheme, AzureAuth, AzureOpenAiSettings, AzureSurface, OpenAiSettings};

const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 10,
    sizes: Sizes::Any,
    formats: Some(&["png", "jpeg"]),
    seed: false,
    negative_prompt: false,
    transparency: true,
    mode: Mode::Synchronous,
    references: 0,
    mask: false,
    params: &["user", "moderation", "output_compression"],
};

/// The driver of kind `azure-openai`.
pub fn build(settings: &AzureOpenAiSettings, buffers: BufferPool) -> anyhow::Result<OpenAi> {
    let endpoint = settings.endpoint.trim_end_matches('/');
    let (api_key, tokens) = match settings.auth {
        AzureAuth::ApiKey => (settings.api_key.clone(), None),
        AzureAuth::Entra => (
            SecretString::from(String::new()),
            Some(Arc::new(EntraTokens::new(settings)?)),
        ),
    };
    let (target, check_url) = match settings.surface {
        AzureSurface::Classic => (
            Target::Deployments {
                base: format!("{endpoint}/openai/deployments"),
                api_version: settings.api_version.clone(),
            },
            format!(
                "{endpoint}/openai/models?api-version={}",
                url::form_urlencoded::byte_serialize(settings.api_version.as_bytes())
                    .collect::<String>()
            ),
        ),
        AzureSurface::V1 => (
            Target::Fixed(format!("{endpoint}/openai/v1/images")),
            format!("{endpoint}/openai/v1/models"),
        ),
    };
    let common = OpenAiSettings {
        base_url: format!("{endpoint}/openai/v1"),
        api_key,
        auth: AuthScheme::ApiKey,
        model: settings.model.clone(),
        size: settings.size.clone(),
        quality: settings.quality.clone(),
        output_format: settings.output_format.clone(),
        background: settings.background.clone(),
        response_format: String::new(),
        request_timeout_secs: settings.request_timeout_secs,
        connect_timeout_secs: settings.connect_timeout_secs,
        max_response_bytes: settings.max_response_bytes,
        download_hosts: Vec::new(),
    };
    Ok(OpenAi::new(&common, buffers)?.speaking_for(
        "azure-openai",
        &CAPABILITIES,
        target,
        check_url,
        tokens,
    ))
}
