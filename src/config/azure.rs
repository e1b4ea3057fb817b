//! Kind `azure-openai`: its keys, the environment workload identity sets, and their checks.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, in_range, invalid};

/// Which of Azure OpenAI's URL shapes a provider calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AzureSurface {
    /// `{endpoint}/openai/deployments/{model}/images/generations?api-version={api_version}`.
    Classic,
    /// `{endpoint}/openai/v1/images/generations`, the deployment in the body's `model`.
    V1,
}

/// How an `azure-openai` provider authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AzureAuth {
    /// The resource's key in the `api-key` header.
    ApiKey,
    /// Microsoft Entra ID bearer tokens (client credentials: a client secret, or the federated
    /// token file of workload identity), refreshed before they expire.
    Entra,
}

/// Kind `azure-openai`: the Images API of an Azure OpenAI resource. A job's `model` names a
/// deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureOpenAiSettings {
    /// The resource's endpoint, `https://RESOURCE.openai.azure.com`.
    pub endpoint: String,
    /// `classic` (deployment URLs with an `api-version`) or `v1`.
    pub surface: AzureSurface,
    /// The `api-version` of the classic surface.
    pub api_version: String,
    /// `api-key` or `entra`.
    pub auth: AzureAuth,
    /// The resource's key, for `auth = "api-key"`. Never logged.
    pub api_key: SecretString,
    /// Entra: the directory (tenant) id; empty: `AZURE_TENANT_ID`.
    pub tenant_id: String,
    /// Entra: the application (client) id; empty: `AZURE_CLIENT_ID`.
    pub client_id: String,
    /// Entra: the client secret; empty: the federated token file is used. Never logged.
    pub client_secret: SecretString,
    /// Entra: the file holding a federated token (workload identity mounts one and rotates
    /// it); empty: `AZURE_FEDERATED_TOKEN_FILE`. Read again at every token refresh.
    pub federated_token_file: String,
    /// Entra: the authority; empty: `AZURE_AUTHORITY_HOST`, else
    /// `https://login.microsoftonline.com`.
    pub authority_host: String,
    /// Entra: the scope of the tokens asked for.
    pub scope: String,
    /// Model (deployment name) of jobs that name none.
    pub model: String,
    /// Size of jobs that name none.
    pub size: String,
    /// Quality of jobs that name none (Azure's own default is `high`).
    pub quality: String,
    /// Output format of jobs that name none: `png` or `jpeg` (Azure makes no WebP).
    pub output_format: String,
    /// Background of jobs that name none; empty: not sent.
    pub background: String,
    /// Seconds allowed for one request, the answer's body included.
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection.
    pub connect_timeout_secs: u64,
    /// Largest answer accepted, in bytes.
    pub max_response_bytes: usize,
}

impl AzureOpenAiSettings {
    /// Fills the Entra keys left empty from the variables workload identity sets.
    pub(super) fn with_environment(mut self) -> Self {
        for (value, var) in [
            (&mut self.tenant_id, "AZURE_TENANT_ID"),
            (&mut self.client_id, "AZURE_CLIENT_ID"),
            (&mut self.federated_token_file, "AZURE_FEDERATED_TOKEN_FILE"),
            (&mut self.authority_host, "AZURE_AUTHORITY_HOST"),
        ] {
            if value.trim().is_empty()
                && let Ok(v) = std::env::var(var)
            {
                *value = v;
            }
        }
        if self.authority_host.trim().is_empty() {
            self.authority_host = "https://login.microsoftonline.com".into();
        }
        self
    }

    pub(super) fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{section}.{name}");
        for (name, url) in [
            ("endpoint", &self.endpoint),
            ("authority_host", &self.authority_host),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || reqwest::Url::parse(url).is_err()
            {
                return Err(invalid(key(name), "must be an http:// or https:// URL"));
            }
        }
        if self.surface == AzureSurface::Classic && self.api_version.trim().is_empty() {
            return Err(invalid(
                key("api_version"),
                "is required by the classic surface",
            ));
        }
        match self.auth {
            AzureAuth::ApiKey if self.api_key.expose_secret().trim().is_empty() => {
                let name = section.trim_start_matches("providers.").to_uppercase();
                return Err(invalid(
                    key("api_key"),
                    format!(
                        "is required with auth = \"api-key\" (set IMAGEGEN__PROVIDERS__{name}__API_KEY)"
                    ),
                ));
            }
            AzureAuth::ApiKey => {}
            AzureAuth::Entra => {
                for (name, value, var) in [
                    ("tenant_id", &self.tenant_id, "AZURE_TENANT_ID"),
                    ("client_id", &self.client_id, "AZURE_CLIENT_ID"),
                ] {
                    if value.trim().is_empty() {
                        return Err(invalid(
                            key(name),
                            format!("is required with auth = \"entra\" (or {var})"),
                        ));
                    }
                }
                let secret = !self.client_secret.expose_secret().trim().is_empty();
                let file = !self.federated_token_file.trim().is_empty();
                if secret == file {
                    return Err(invalid(
                        key("client_secret"),
                        "auth = \"entra\" takes a client_secret or a federated_token_file \
                         (AZURE_FEDERATED_TOKEN_FILE), one of them",
                    ));
                }
                if self.scope.trim().is_empty() {
                    return Err(invalid(key("scope"), "must not be empty"));
                }
            }
        }
        if self.model.trim().is_empty() {
            return Err(invalid(key("model"), "must not be empty"));
        }
        if !matches!(self.output_format.as_str(), "png" | "jpeg") {
            return Err(invalid(
                key("output_format"),
                "must be \"png\" or \"jpeg\" (Azure OpenAI makes no WebP)",
            ));
        }
        in_range(
            key("request_timeout_secs"),
            self.request_timeout_secs,
            1,
            3600,
        )?;
        in_range(
            key("connect_timeout_secs"),
            self.connect_timeout_secs,
            1,
            600,
        )?;
        in_range(
            key("max_response_bytes"),
            self.max_response_bytes as u64,
            1024,
            1 << 32,
        )
    }
}
