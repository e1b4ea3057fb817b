//! A fake of Azure OpenAI's Images API and of the Microsoft Entra ID token endpoint in front of
//! it.
//!
//! Written from Azure's documentation:
//! - Classic surface: `POST /openai/deployments/{deployment}/images/generations?api-version=V`.
//!   Without an `api-version` the service answers 404 `Resource not found`. The deployment fixes
//!   the model; an unknown one is 404 `DeploymentNotFound`.
//! - v1 surface: `POST /openai/v1/images/generations`, the deployment as the body's `model`.
//! - `GET /openai/models?api-version=V` and `GET /openai/v1/models` list the models.
//! - Credentials: the `api-key` header, or `Authorization: Bearer` with a token from
//!   `POST /{tenant}/oauth2/v2.0/token` (client credentials: `client_secret`, or a
//!   `client_assertion` of type `jwt-bearer`, for the scope
//!   `https://cognitiveservices.azure.com/.default`). Tokens expire after `token_lifetime`; an
//!   expired or unknown token is a 401.
//! - gpt-image deployments answer base64 only and make no WebP (400).
//! - Content filtering, both of Azure's shapes: a prompt refused before generation (400
//!   `contentFilter`, not billed) and a generated image refused (400 `content_policy_violation`
//!   with an inner `ResponsibleAIPolicyViolation` and its `content_filter_results`, billed).
//! - 429 with `retry-after` and `retry-after-ms`, Azure's wording.
//!
//! Past those checks the request is answered by the OpenAI fake ([`crate::openai`]), whose
//! answers are the same protocol. Admin endpoints: `GET /_fake/stats`, `GET /_fake/tokens`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::net::ResetHandle;
use crate::openai::{FakeApi, FakeOptions};
use crate::rules::{Ledger, Rules, Stats, lock};

/// The scope of tokens for Azure OpenAI.
pub const SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// A fault injected into the next matching requests.
pub type Rule = crate::rules::Rule<Fault>;

/// What a matching request gets instead of an image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 400 `contentFilter`: the prompt was refused before anything was made (not billed).
    PromptFiltered,
    /// 400 `content_policy_violation` / `ResponsibleAIPolicyViolation`: the image was made and
    /// refused (billed).
    OutputFiltered,
    /// 429, with `retry-after` and `retry-after-ms`.
    RateLimited { retry_after_ms: u64 },
    /// A 5xx.
    ServerError { status: u16 },
}

/// The resource, its deployments and its directory.
#[derive(Clone, Debug)]
pub struct AzureOptions {
    /// The resource's key (`api-key`).
    pub api_key: String,
    /// The directory the token endpoint serves.
    pub tenant: String,
    pub client_id: String,
    /// The application's secret, when it has one.
    pub client_secret: Option<String>,
    /// The federated token accepted as a client assertion, when one is.
    pub assertion: Option<String>,
    /// How long an issued token lives.
    pub token_lifetime: Duration,
    /// Deployment name -> the model it serves.
    pub deployments: Vec<(String, String)>,
    /// Approximate size in bytes of each image.
    pub image_bytes: usize,
}

impl Default for AzureOptions {
    fn default() -> Self {
        Self {
            api_key: "azure-test-key".into(),
            tenant: "00000000-0000-0000-0000-0000000000aa".into(),
            client_id: "11111111-2222-3333-4444-555555555555".into(),
            client_secret: Some("azure-client-secret".into()),
            assertion: None,
            token_lifetime: Duration::from_secs(3599),
            deployments: vec![("gpt-image-1".into(), "gpt-image-1".into())],
            image_bytes: 2048,
        }
    }
}

/// What the token endpoint did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TokenStats {
    /// Tokens issued.
    pub issued: u64,
    /// Grants refused (wrong secret or assertion, unknown tenant or client, wrong scope).
    pub refused_grants: u64,
    /// Requests to the API refused for their credentials (missing, wrong key, unknown or
    /// expired token).
    pub refused_requests: u64,
}

#[derive(Clone)]
pub struct AzureFake {
    inner: Arc<Inner>,
}

struct Inner {
    opts: Mutex<AzureOptions>,
    openai: FakeApi,
    rules: Rules<Fault>,
    ledger: Ledger,
    /// Issued token -> when it expires.
    tokens: Mutex<HashMap<String, Instant>>,
    token_stats: Mutex<TokenStats>,
    seq: AtomicU64,
}

/// A running in-process fake; the server task is aborted on drop.
pub type AzureServer = crate::Running<AzureFake>;

impl crate::Running<AzureFake> {
    /// The resource's endpoint (`https://RESOURCE.openai.azure.com` in real life), which is
    /// also the authority host of the token endpoint here.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves the fake on `listener` (connections can be reset, as the OpenAI fake's).
pub async fn serve(listener: TcpListener, api: AzureFake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

impl AzureFake {
    pub fn new(opts: AzureOptions) -> Self {
        let openai = FakeApi::new(FakeOptions {
            image_bytes: opts.image_bytes,
            ..FakeOptions::default()
        });
        Self {
            inner: Arc::new(Inner {
                opts: Mutex::new(opts),
                openai,
                rules: Rules::default(),
                ledger: Ledger::default(),
                tokens: Mutex::default(),
                token_stats: Mutex::default(),
                seq: AtomicU64::new(0),
            }),
        }
    }

    pub async fn start(self) -> std::io::Result<AzureServer> {
        let router = self.router();
        crate::Running::start(self, router, "fake Azure OpenAI").await
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/openai/deployments/{deployment}/images/generations",
                post(classic),
            )
            .route("/openai/v1/images/generations", post(v1))
            .route("/openai/models", get(models_classic))
            .route("/openai/v1/models", get(models_v1))
            .route("/{tenant}/oauth2/v2.0/token", post(entra::token))
            .route(
                "/_fake/stats",
                get(|State(f): State<AzureFake>| async move { Json(f.stats()) }),
            )
            .route(
                "/_fake/tokens",
                get(|State(f): State<AzureFake>| async move { Json(f.token_stats()) }),
            )
            .fallback(|| async { azure_error(StatusCode::NOT_FOUND, "404", "Resource not found") })
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    /// The OpenAI fake behind the checks, for its own faults (a reset, a hang).
    pub fn openai(&self) -> &FakeApi {
        &self.inner.openai
    }

    /// The federated token accepted from now on (the kubelet rotated the file).
    pub fn set_assertion(&self, assertion: &str) {
        lock(&self.inner.opts).assertion = Some(assertion.to_owned());
    }

    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    pub fn token_stats(&self) -> TokenStats {
        lock(&self.inner.token_stats).clone()
    }

    /// Image requests whose prompt contains `needle` (refused ones included).
    pub fn calls_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).0
    }

    /// Of those, the ones the resource charged for.
    pub fn billed_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }

    /// The 401 of a request without valid credentials; `None`: they are valid.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let refuse = |message: &str| {
            lock(&self.inner.token_stats).refused_requests += 1;
            Some(azure_error(StatusCode::UNAUTHORIZED, "401", message))
        };
        if let Some(key) = headers.get("api-key") {
            if key.as_bytes() == lock(&self.inner.opts).api_key.as_bytes() {
                return None;
            }
            return refuse(
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure \
                 to provide a valid key for an active subscription and use a correct regional API \
                 endpoint for your resource.",
            );
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let valid = bearer.is_some_and(|t| {
            lock(&self.inner.tokens)
                .get(t)
                .is_some_and(|expires| Instant::now() < *expires)
        });
        if valid {
            None
        } else {
            refuse(
                "Unauthorized. Access token is missing, invalid, audience is incorrect \
                 (https://cognitiveservices.azure.com), or have expired.",
            )
        }
    }

    /// The checks of both surfaces, then the fault or the OpenAI fake's answer.
    async fn generate(
        &self,
        conn: Option<Extension<ConnectInfo<ResetHandle>>>,
        headers: HeaderMap,
        deployment: Option<String>,
        body: Bytes,
    ) -> Response {
        if let Some(refused) = self.refusal(&headers) {
            return refused;
        }
        let Ok(mut request) = serde_json::from_slice::<Value>(&body) else {
            return invalid("We could not parse the JSON body of your request.");
        };
        let deployment = deployment.or_else(|| request["model"].as_str().map(str::to_owned));
        let model = deployment.as_deref().and_then(|d| {
            lock(&self.inner.opts)
                .deployments
                .iter()
                .find(|(name, _)| name == d)
                .map(|(_, model)| model.clone())
        });
        let Some(model) = model else {
            return azure_error(
                StatusCode::NOT_FOUND,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the \
                 deployment within the last 5 minutes, please wait a moment and try again.",
            );
        };
        let prompt = request["prompt"].as_str().unwrap_or("").to_owned();
        self.inner.ledger.request(Some(&prompt));
        if request["output_format"].as_str() == Some("webp") {
            self.inner.ledger.error(400);
            return invalid("Invalid value: 'webp'. Supported values are: 'png' and 'jpeg'.");
        }
        if let Some(fault) = self.inner.rules.take(Some(&prompt)) {
            return self.fault(fault, &prompt);
        }
        request["model"] = model.into();
        let mut headers = headers;
        headers.remove("api-key");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer azure-deployment"),
        );
        let n = request["n"].as_u64().unwrap_or(1);
        let response = self
            .inner
            .openai
            .generations(conn, headers, Bytes::from(request.to_string()))
            .await;
        if response.status() == StatusCode::OK {
            self.inner.ledger.billed(&prompt, n);
        } else {
            self.inner.ledger.error(response.status().as_u16());
        }
        response
    }

    fn fault(&self, fault: Fault, prompt: &str) -> Response {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let response = match fault {
            Fault::PromptFiltered => azure_error(
                StatusCode::BAD_REQUEST,
                "contentFilter",
                "Your task failed as a result of our safety system.",
            ),
            Fault::OutputFiltered => {
                self.inner.ledger.billed(prompt, 0);
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": {
                        "code": "content_policy_violation",
                        "message": "Your request was rejected as a result of our safety system. \
                            The generated image may contain content that is not allowed by our \
                            safety system.",
                        "type": "invalid_request_error",
                        "param": null,
                        "inner_error": {
                            "code": "ResponsibleAIPolicyViolation",
                            "content_filter_results": {
                                "hate": {"filtered": false, "severity": "safe"},
                                "self_harm": {"filtered": false, "severity": "safe"},
                                "sexual": {"filtered": false, "severity": "safe"},
                                "violence": {"filtered": true, "severity": "high"}
                            },
                            "revised_prompt": prompt
                        }
                    }})),
                )
                    .into_response()
            }
            Fault::RateLimited { retry_after_ms } => {
                let mut r = azure_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "429",
                    &format!(
                        "Requests to the Images_Generations Operation under Azure OpenAI API \
                         version 2025-04-01-preview have exceeded call rate limit of your current \
                         AIServices S0 pricing tier. Please retry after {} seconds.",
                        retry_after_ms.div_ceil(1000)
                    ),
                );
                let h = r.headers_mut();
                h.insert(
                    "retry-after-ms",
                    retry_after_ms.to_string().parse().unwrap(),
                );
                h.insert(
                    "retry-after",
                    retry_after_ms.div_ceil(1000).to_string().parse().unwrap(),
                );
                r
            }
            Fault::ServerError { status } => azure_error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "InternalServerError",
                &format!("The service is temporarily unable to process your request (ref {seq})."),
            ),
        };
        self.inner.ledger.error(response.status().as_u16());
        response
    }

    fn models(&self) -> Response {
        let data: Vec<Value> = lock(&self.inner.opts)
            .deployments
            .iter()
            .map(|(_, model)| json!({"id": model, "object": "model", "capabilities": {"image_generation": true}}))
            .collect();
        Json(json!({"object": "list", "data": data})).into_response()
    }
}

/// Azure's own error shape: `{"error": {"code", "message"}}`.
fn azure_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn invalid(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(
            json!({"error": {"code": "invalid_request_error", "message": message,
            "type": "invalid_request_error", "param": null}}),
        ),
    )
        .into_response()
}

fn has_version(query: &HashMap<String, String>) -> bool {
    query.get("api-version").is_some_and(|v| !v.is_empty())
}

async fn classic(
    State(fake): State<AzureFake>,
    Path(deployment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !has_version(&query) {
        return azure_error(StatusCode::NOT_FOUND, "404", "Resource not found");
    }
    fake.generate(conn, headers, Some(deployment), body).await
}

async fn v1(
    State(fake): State<AzureFake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.generate(conn, headers, None, body).await
}

async fn models_classic(
    State(fake): State<AzureFake>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !has_version(&query) {
        return azure_error(StatusCode::NOT_FOUND, "404", "Resource not found");
    }
    fake.refusal(&headers).unwrap_or_else(|| fake.models())
}

async fn models_v1(State(fake): State<AzureFake>, headers: HeaderMap) -> Response {
    fake.refusal(&headers).unwrap_or_else(|| fake.models())
}

mod entra;
#[cfg(test)]
mod tests;
