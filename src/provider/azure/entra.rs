//! Microsoft Entra ID access tokens for Azure OpenAI: the OAuth 2.0 client-credentials grant at
//! `{authority}/{tenant}/oauth2/v2.0/token`, with a client secret or with the federated token
//! that workload identity mounts in a file (sent as a `client_assertion`, read again at every
//! refresh, because the kubelet rotates it).
//!
//! A token is fetched at the first call and refreshed once half its life has passed, by the first
//! call that finds it so (the others wait for that one fetch, never make their own). A refresh
//! that fails keeps the current token while it is still valid. The token and the secret never
//! reach a log.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::AzureOpenAiSettings;
use crate::domain::error::Failure;
use crate::provider::http::{MAX_ERROR_BODY, USER_AGENT, transport_failure};
use imagegen_core::entra::read_grant;

/// How the application proves who it is.
enum Credential {
    Secret(SecretString),
    /// The path of a federated token (a JWT), sent as a client assertion.
    AssertionFile(PathBuf),
}

struct Token {
    /// `Bearer ...`, marked sensitive.
    header: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

/// The tokens of one provider.
pub struct EntraTokens {
    client: reqwest::Client,
    url: String,
    client_id: String,
    scope: String,
    credential: Credential,
    timeout: Duration,
    current: Mutex<Option<Token>>,
}

impl EntraTokens {
    pub fn new(settings: &AzureOpenAiSettings) -> anyhow::Result<Self> {
        let credential = if settings.client_secret.expose_secret().trim().is_empty() {
            Credential::AssertionFile(PathBuf::from(&settings.federated_token_file))
        } else {
            Credential::Secret(settings.client_secret.clone())
        };
        Ok(Self {
            client: reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            url: format!(
                "{}/{}/oauth2/v2.0/token",
                settings.authority_host.trim_end_matches('/'),
                settings.tenant_id.trim()
            ),
            client_id: settings.client_id.trim().to_string(),
            scope: settings.scope.clone(),
            credential,
            timeout: Duration::from_secs(30),
            current: Mutex::new(None),
        })
    }

    /// The `Authorization` header of the next request.
    pub async fn header(&self) -> Result<HeaderValue, Failure> {
        let mut current = self.current.lock().await;
        let now = Instant::now();
        if let Some(token) = &*current
            && now < token.refresh_at
        {
            return Ok(token.header.clone());
        }
        match self.fetch().await {
            Ok(token) => {
                let header = token.header.clone();
                *current = Some(token);
                Ok(header)
            }
            Err(failure) => match &*current {
                Some(token) if now + Duration::from_secs(5) < token.expires_at => {
                    tracing::warn!(error = %failure,
                        "could not refresh the Entra ID token: the current one is used while it lasts");
                    Ok(token.header.clone())
                }
                _ => Err(failure),
            },
        }
    }

    /// The provider refused the token: the next request fetches a new one.
    pub async fn forget(&self) {
        *self.current.lock().await = None;
    }

    async fn fetch(&self) -> Result<Token, Failure> {
        let assertion = match &self.credential {
            Credential::Secret(_) => None,
            Credential::AssertionFile(path) => {
                Some(tokio::fs::read_to_string(path).await.map_err(|e| {
                    Failure::transient(format!(
                        "the federated token file {} could not be read: {e}",
                        path.display()
                    ))
                })?)
            }
        };
        let body = SecretString::from({
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials")
                .append_pair("client_id", &self.client_id)
                .append_pair("scope", &self.scope);
            match (&self.credential, &assertion) {
                (Credential::Secret(secret), _) => {
                    form.append_pair("client_secret", secret.expose_secret());
                }
                (Credential::AssertionFile(_), assertion) => {
                    form.append_pair(
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    )
                    .append_pair(
                        "client_assertion",
                        assertion.as_deref().unwrap_or("").trim(),
                    );
                }
            }
            form.finish()
        });
        let sent = Instant::now();
        let response = tokio::time::timeout(
            self.timeout,
            self.client
                .post(&self.url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body.expose_secret().to_string())
                .send(),
        )
        .await
        .map_err(|_| Failure::transient("the Entra ID token endpoint did not answer in time"))?
        .map_err(|e| {
            let mut failure = transport_failure(e);
            // Asking for a token costs nothing.
            if let Failure::Retryable {
                possibly_billed, ..
            } = &mut failure
            {
                *possibly_billed = false;
            }
            failure
        })?;
        let status = response.status().as_u16();
        let bytes = tokio::time::timeout(self.timeout, response.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let grant = read_grant(status, &bytes[..bytes.len().min(MAX_ERROR_BODY)])?;
        let lifetime = grant.lifetime;
        let mut header = HeaderValue::from_str(&format!("Bearer {}", grant.access_token))
            .map_err(|_| Failure::transient("the Entra ID token is not a valid header value"))?;
        header.set_sensitive(true);
        tracing::debug!(
            lifetime_secs = lifetime.as_secs(),
            "fetched an Entra ID token"
        );
        Ok(Token {
            header,
            refresh_at: sent + lifetime / 2,
            expires_at: sent + lifetime,
        })
    }
}
