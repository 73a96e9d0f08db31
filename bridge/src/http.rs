//! The HTTP side: health, readiness, metrics, and the Socket.IO endpoint.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use socketioxide::layer::SocketIoLayer;

use crate::metrics::Metrics;

/// Builds the router: `/healthz`, `/readyz`, `/metrics`, and Socket.IO at `/socket.io/`.
pub fn router(metrics: Arc<Metrics>, socketio: SocketIoLayer) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
        .layer(socketio)
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Readiness: MQTT is connected and every subscription is active.
async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.mqtt_ready() {
        (StatusCode::OK, axum::Json(json!({ "ready": true })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": "MQTT not connected and subscribed" })),
        )
    }
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}
