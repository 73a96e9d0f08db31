//! The HTTP side: health, readiness, metrics, the JSON API, and the Socket.IO endpoint.
//!
//! API (token in `Authorization: Bearer <token>`, dispatcher or admin):
//! - `GET /api/vehicles`: the current state of every vehicle the token may see.
//! - `GET /api/vehicles/{id}`: one vehicle.
//! - `POST /api/vehicles/{id}/commands` with `{"type": "ping" | "set_rate" | "return_to_depot",
//!   "interval_ms"?}`: sends the command and answers with the vehicle's ack.
//!
//! - `GET /api/vehicles/{id}/track?from=&to=&format=json|geojson`: stored heartbeats.
//! - `POST /api/orders` (vendor token) and `GET /api/orders/{id}`: orders and their timeline.
//!
//! Errors are JSON `{"error": "..."}` with a fitting status code.

use std::sync::Arc;

use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use shared::OrderId;
use shared::VehicleId;
use socketioxide::SocketIo;
use socketioxide::layer::SocketIoLayer;

use crate::auth::{AuthError, Grant, Role};
use crate::command::{CommandError, CommandRequest};
use crate::fleet::VehicleState;
use crate::hub::Hub;
use crate::orders::{OrderError, OrderRequest, order_json};
use crate::room::RoomName;
use crate::socket::{announce_pickup, placed_json};
use crate::store::StoreError;
use crate::web::WebConfig;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The Socket.IO server, to announce orders placed over HTTP.
    pub io: SocketIo,
    /// The bridge's shared state.
    pub hub: Arc<Hub>,
    /// The embedded broker's counters, appended to `/metrics` (embedded mode only).
    pub broker: Option<broker::BrokerMetrics>,
}

impl FromRef<HttpState> for Arc<Hub> {
    fn from_ref(state: &HttpState) -> Self {
        Arc::clone(&state.hub)
    }
}

/// Builds the router: `/healthz`, `/readyz`, `/metrics`, `/api/...`, and Socket.IO at
/// `/socket.io/`.
pub fn router(state: HttpState, socketio: SocketIoLayer, web: WebConfig) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/vehicles", get(list_vehicles))
        .route("/api/vehicles/{id}", get(get_vehicle))
        .route("/api/vehicles/{id}/commands", post(post_command))
        .route("/api/vehicles/{id}/track", get(get_track))
        .route("/api/orders", post(post_order))
        .route("/api/orders/{id}", get(get_order))
        .with_state(state)
        .merge(crate::web::routes(web))
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
    grant_for(hub, headers, &[Role::Dispatcher, Role::Admin])
}

fn grant_for(hub: &Hub, headers: &HeaderMap, roles: &[Role]) -> Result<Grant, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    Ok(hub.tokens.authorize(token, "/api", roles)?)
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        tracing::error!(cause = %err, "store error");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("storage: {err}"))
    }
}

impl From<OrderError> for ApiError {
    fn from(err: OrderError) -> Self {
        match err {
            OrderError::Invalid(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, err.to_string()),
            OrderError::NotVendor => Self::new(StatusCode::FORBIDDEN, err.to_string()),
            OrderError::Store(StoreError::OrderConflict { .. }) => {
                Self::new(StatusCode::CONFLICT, err.to_string())
            }
            OrderError::Store(e) => e.into(),
        }
    }
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

async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    let mut text = state.hub.metrics.render();
    if let Some(broker) = &state.broker {
        text.push_str(&broker.render());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
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

/// `POST /api/orders` (vendor token): places an order like `pickup` on `/vendor`.
async fn post_order(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Result<Json<OrderRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let grant = grant_for(&state.hub, &headers, &[Role::Vendor])?;
    let Json(request) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let placed = state.hub.place_order(&grant, &request).await?;
    let store = grant.store.clone().unwrap_or_default();
    announce_pickup(&state.io, None, &store, &request, &placed).await;
    let status = if placed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(placed_json(&placed))))
}

/// `GET /api/orders/{id}`: state and timeline. Vendors see their own store's orders,
/// dispatchers those of the fleets they may see.
async fn get_order(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = grant_for(
        &hub,
        &headers,
        &[Role::Vendor, Role::Dispatcher, Role::Admin],
    )?;
    let id = OrderId::new(&id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid order id: {e}")))?;
    let view = hub
        .store
        .order(&id)
        .await?
        .filter(|o| match grant.role {
            Role::Vendor => grant.store.as_deref() == Some(o.store.as_str()),
            _ => grant.may_see_fleet(&o.fleet),
        })
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown order"))?;
    Ok(Json(order_json(&view)))
}

/// The query of `GET /api/vehicles/{id}/track`.
#[derive(Debug, Deserialize)]
struct TrackQuery {
    /// From, ms since the Unix epoch (device clock); default 0.
    from: Option<u64>,
    /// To, ms since the Unix epoch; default now.
    to: Option<u64>,
    /// `json` (default) or `geojson`.
    format: Option<String>,
    /// At most this many points (default and maximum 10 000).
    limit: Option<u32>,
}

/// `GET /api/vehicles/{id}/track?from=&to=&format=json|geojson`: the stored heartbeats of a
/// vehicle in time order.
async fn get_track(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<TrackQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let grant = grant(&hub, &headers)?;
    let id = vehicle_id(&id)?;
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let fleet = hub.fleet().fleet_of(&id).cloned();
    if let Some(fleet) = &fleet
        && !grant.may_see_fleet(fleet)
    {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown vehicle"));
    }
    let (from, to) = (q.from.unwrap_or(0), q.to.unwrap_or(u64::MAX / 2));
    if from > to {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "from is after to"));
    }
    let rows = hub
        .store
        .track(&id, from, to, q.limit.unwrap_or(10_000).min(10_000))
        .await?;
    if rows.iter().any(|r| !grant.may_see_fleet(&r.fleet)) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown vehicle"));
    }
    let point =
        |r: &crate::store::HeartbeatRow| (f64::from(r.lon_e7) / 1e7, f64::from(r.lat_e7) / 1e7);
    match q.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(serde_json::json!({
            "vehicle": id,
            "points": rows.iter().map(|r| {
                let (lon, lat) = point(r);
                serde_json::json!({
                    "seq": r.seq, "ts_ms": r.ts_ms, "lat": lat, "lon": lon,
                    "speed_mps": f64::from(r.speed_cm_s) / 100.0, "heading_deg": r.heading_deg,
                    "battery_pct": r.battery_pct,
                })
            }).collect::<Vec<_>>(),
        }))
        .into_response()),
        "geojson" => Ok((
            [(header::CONTENT_TYPE, "application/geo+json")],
            Json(serde_json::json!({
                "type": "Feature",
                "properties": {
                    "vehicle": id,
                    "timestamps_ms": rows.iter().map(|r| r.ts_ms).collect::<Vec<_>>(),
                },
                "geometry": {
                    "type": "LineString",
                    "coordinates": rows.iter().map(|r| { let (lon, lat) = point(r); [lon, lat] }).collect::<Vec<_>>(),
                },
            })),
        )
            .into_response()),
        other => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("format {other:?}: expected json or geojson"))),
    }
}
