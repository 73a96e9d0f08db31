//! The HTTP side: health, readiness, metrics, the JSON API, and the Socket.IO endpoint.
//!
//! API (token in `Authorization: Bearer <token>`, dispatcher or admin):
//! - `GET /api/vehicles`: the current state of every vehicle the token may see.
//! - `GET /api/vehicles/{id}`: one vehicle.
//! - `POST /api/vehicles/{id}/commands` with `{"type": "ping" | "set_rate" | "return_to_depot",
//!   "interval_ms"?}`: sends the command and answers with the vehicle's ack.
//!
//! Errors are JSON `{"error": "..."}` with a fitting status code.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use shared::VehicleId;
use socketioxide::layer::SocketIoLayer;

use crate::auth::{AuthError, Grant, Role};
use crate::command::{CommandError, CommandRequest};
use crate::fleet::VehicleState;
use crate::hub::Hub;
use crate::room::RoomName;

/// Builds the router: `/healthz`, `/readyz`, `/metrics`, `/api/...`, and Socket.IO at
/// `/socket.io/`.
pub fn router(hub: Arc<Hub>, socketio: SocketIoLayer) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/vehicles", get(list_vehicles))
        .route("/api/vehicles/{id}", get(get_vehicle))
        .route("/api/vehicles/{id}/commands", post(post_command))
        .with_state(hub)
        .layer(socketio)
}

/// An API error: a status code and a message, rendered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let status = match err {
            AuthError::WrongNamespace(_) => StatusCode::FORBIDDEN,
            AuthError::Missing | AuthError::Unknown => StatusCode::UNAUTHORIZED,
        };
        Self::new(status, err.to_string())
    }
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        let status = match &err {
            CommandError::UnknownVehicle => StatusCode::NOT_FOUND,
            CommandError::Offline => StatusCode::CONFLICT,
            CommandError::Forbidden => StatusCode::FORBIDDEN,
            CommandError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            CommandError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            CommandError::Publish(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, err.to_string())
    }
}

fn grant(hub: &Hub, headers: &HeaderMap) -> Result<Grant, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    Ok(hub
        .tokens
        .authorize(token, "/api", &[Role::Dispatcher, Role::Admin])?)
}

fn vehicle_id(raw: &str) -> Result<VehicleId, ApiError> {
    VehicleId::new(raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid vehicle id: {e}")))
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Readiness: MQTT is connected and every subscription is active.
async fn readyz(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    if hub.metrics.mqtt_ready() {
        (StatusCode::OK, Json(json!({ "ready": true })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "MQTT not connected and subscribed" })),
        )
    }
}

async fn metrics_text(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
}

async fn list_vehicles(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
) -> Result<Json<Vec<VehicleState>>, ApiError> {
    let grant = grant(&hub, &headers)?;
    let all = hub.fleet().snapshot(&RoomName::All);
    Ok(Json(
        all.into_iter()
            .filter(|v| grant.may_see_fleet(&v.fleet))
            .collect(),
    ))
}

async fn get_vehicle(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<VehicleState>, ApiError> {
    let grant = grant(&hub, &headers)?;
    let id = vehicle_id(&id)?;
    let state = hub
        .fleet()
        .vehicle(&id)
        .filter(|v| grant.may_see_fleet(&v.fleet))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown vehicle"))?;
    Ok(Json(state))
}

async fn post_command(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<CommandRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let grant = grant(&hub, &headers)?;
    let id = vehicle_id(&id)?;
    let Json(request) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let kind = request.to_wire()?;
    let (command_id, result) = hub.command(&grant, &id, kind).await?;
    Ok(Json(
        json!({ "command_id": command_id, "result": result.as_str() }),
    ))
}
