//! The Microsoft Entra ID token endpoint in front of the fake resource: the client-credentials
//! grant, with a client secret or a client assertion (a federated token), for Azure OpenAI's
//! scope. Refusals are Entra's: `{"error", "error_description": "AADSTS...", "error_codes"}`.

use std::collections::HashMap;
use std::time::Instant;

use axum::Form;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AzureFake, SCOPE};
use crate::rules::lock;

impl AzureFake {
    /// The client-credentials grant.
    fn grant(&self, tenant: &str, form: &HashMap<String, String>) -> Response {
        let opts = lock(&self.inner.opts).clone();
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let refuse = |status: StatusCode, error: &str, code: u32, description: &str| {
            lock(&self.inner.token_stats).refused_grants += 1;
            (
                status,
                Json(json!({
                    "error": error,
                    "error_description": format!("AADSTS{code}: {description}\r\nTrace ID: 0\r\nCorrelation ID: 0\r\nTimestamp: 2026-01-01 00:00:00Z"),
                    "error_codes": [code],
                    "trace_id": "0",
                    "correlation_id": "0"
                })),
            )
                .into_response()
        };
        if tenant != opts.tenant {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                90002,
                &format!("Tenant '{tenant}' not found."),
            );
        }
        if field("grant_type") != "client_credentials" {
            return refuse(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            );
        }
        if field("client_id") != opts.client_id {
            return refuse(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                700016,
                "Application with identifier was not found in the directory.",
            );
        }
        if field("scope") != SCOPE {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid.",
            );
        }
        let proven = match (form.get("client_secret"), form.get("client_assertion")) {
            (Some(secret), None) => opts.client_secret.as_deref() == Some(secret.as_str()),
            (None, Some(assertion)) => {
                field("client_assertion_type")
                    == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                    && opts.assertion.as_deref() == Some(assertion.as_str())
            }
            _ => false,
        };
        if !proven {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            );
        }
        let token = format!("eyJ0eXAiOiJKV1Qi.{:032x}", fastrand::u128(..));
        lock(&self.inner.tokens).insert(token.clone(), Instant::now() + opts.token_lifetime);
        lock(&self.inner.token_stats).issued += 1;
        let secs = opts.token_lifetime.as_secs();
        Json(json!({"token_type": "Bearer", "expires_in": secs, "ext_expires_in": secs, "access_token": token}))
            .into_response()
    }
}

pub(super) async fn token(
    State(fake): State<AzureFake>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.grant(&tenant, &form)
}
