//! The worker's HTTP listener (`http.listen`): health, readiness and metrics.
//!
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 when the worker can work (connected to the broker; its configuration was
//!   validated at start-up), else 503. The JSON body also says whether the worker is paused and
//!   why, but a pause is not a readiness failure: a paused fleet can still be rolled and drained.
//! - `GET /metrics`: Prometheus text format ([`super::metrics`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::info;

/// What the worker tells its HTTP listener.
#[derive(Default)]
pub struct Health {
    broker: AtomicBool,
    pause: Mutex<Option<String>>,
    /// The answer memory, read when the metrics are.
    answer_memory: std::sync::OnceLock<crate::provider::buffers::BufferPool>,
}

impl Health {
    /// Reports this answer memory's use in the metrics.
    pub fn watch_answer_memory(&self, memory: crate::provider::buffers::BufferPool) {
        let _ = self.answer_memory.set(memory);
    }

    pub fn set_broker_connected(&self, connected: bool) {
        self.broker.store(connected, Ordering::Relaxed);
    }

    /// `Some(reason)` while paused.
    pub fn set_paused(&self, reason: Option<&str>) {
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = reason.map(str::to_string);
        super::metrics::paused(reason);
    }

    pub fn broker_connected(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
    }

    pub fn paused(&self) -> Option<String> {
        self.pause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

pub fn router(health: Arc<Health>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, metrics })
}

/// Binds `listen` and serves until the future is dropped; returns the bound address at once.
pub async fn serve(
    listen: &str,
    health: Arc<Health>,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = ()> + Send + use<>,
)> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen {listen} cannot be bound: {e}"))?;
    let addr = listener.local_addr()?;
    info!(%addr, "health and metrics on http://{addr}/ (healthz, readyz, metrics)");
    let app = router(health, super::metrics::install());
    Ok((addr, async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP listener stopped");
        }
    }))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let connected = state.health.broker_connected();
    let pause = state.health.paused();
    let body = json!({
        "ready": connected,
        "broker_connected": connected,
        "paused": pause.is_some(),
        "pause_reason": pause,
    });
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    if let Some(memory) = state.health.answer_memory.get() {
        super::metrics::answer_memory(memory.held(), memory.budget(), memory.waits());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::render(&state.metrics),
    )
}
