//! The HTTP side: health, readiness, metrics, the JSON API, and the Socket.IO endpoint.
//!
//! API (token in `Authorization: Bearer <token>`, dispatcher or admin):
//! - `GET /api/vehicles`: the current state of every vehicle the token may see.
//! - `GET /api/vehicles/{id}`: one vehicle.
//! - `POST /api/vehicles/{id}/commands` with `{"type": "ping" | "set_rate" | "return_to_depot",
//!   "interval_ms"?}`: sends the command and answers with the vehicle's ack.
//! - `GET /api/vehicles/{id}/track?from=&to=&format=json|geojson|gpx|csv`: stored heartbeats.
//! - `POST /api/orders` (a vendor token; a dispatcher or admin token with `"store"`, on the
//!   store's behalf), `GET /api/orders?state=a,b&vehicle=&store=&limit=` (newest first) and
//!   `GET /api/orders/{id}` (with its timeline): orders, within the token's scope.
//! - `POST /api/orders/{id}/cancel`, `POST /api/orders/{id}/assign` `{vehicle}` (dispatcher
//!   or admin): cancel (vendors too, before pickup), reassign before pickup.
//! - `GET /api/stores`: the configured vendor stores within the token's scope.
//!
//! Errors are JSON `{"error": "..."}` with a fitting status code.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::{OrderId, VehicleId};
use socketioxide::adapter::Adapter;
use socketioxide::layer::SocketIoLayer;

use super::limits::{Limit, SocketGuard};
use super::socket::place_and_announce;
use super::state::HttpState;
use super::web::{self, WebConfig};
use crate::domain::Hub;
use crate::domain::auth::{AuthError, Entrance, Grant, MetricsRefusal, Role};
use crate::domain::command::{CommandError, CommandRequest};
use crate::domain::delivery::{OrderError, OrderRequest};
use crate::domain::order::OrderState;
use crate::store::{HeartbeatRow, OrderFilter, StoreError};
use crate::view::order;
use crate::view::vehicle::{VehicleView, command_answer, track, track_geojson};

/// Builds the router: `/healthz`, `/readyz`, `/metrics`, `/api/...`, the page, and Socket.IO
/// at `/socket.io/` (behind the Origin check).
pub(crate) fn router<A: Adapter>(
    state: HttpState<A>,
    socketio: SocketIoLayer<A>,
    page: WebConfig,
) -> Router {
    let guard = Arc::clone(&state.guard);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text::<A>))
        .route("/api/vehicles", get(list_vehicles))
        .route("/api/vehicles/{id}", get(get_vehicle))
        .route("/api/vehicles/{id}/commands", post(post_command))
        .route("/api/vehicles/{id}/track", get(get_track))
        .route("/api/orders", get(list_orders).post(post_order::<A>))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/orders/{id}/cancel", post(cancel_order))
        .route("/api/orders/{id}/assign", post(assign_order))
        .route("/api/stores", get(list_stores))
        .merge(super::geofences::routes())
        .with_state(state)
        .merge(web::routes(page))
        .layer(socketio)
        .layer(middleware::from_fn_with_state(guard, check_origin))
}

/// Refuses a Socket.IO request (polling or the WebSocket upgrade) whose `Origin` is not
/// allowed (`allowed_origins`; by default the page's own origin, the `Host` it was sent to):
/// 403, counted and logged. A request without `Origin` is not a browser's and passes; every
/// other route passes.
async fn check_origin(
    State(guard): State<Arc<SocketGuard>>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path().starts_with("/socket.io")
        && let Some(origin) = request.headers().get(header::ORIGIN)
    {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let allowed = origin
            .to_str()
            .is_ok_and(|origin| guard.origin_allowed(origin, host));
        if !allowed {
            guard.refused(Limit::Origin);
            tracing::warn!(origin = ?origin, host = ?host, "Socket.IO request from a foreign origin refused");
            return ApiError::new(StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    next.run(request).await
}

/// An API error: a status code and a message, rendered as JSON.
#[derive(Debug)]
pub(crate) struct ApiError {
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

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("unknown {what}"))
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
            CommandError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            CommandError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            CommandError::Publish(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, err.to_string())
    }
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
            OrderError::UnknownOrder | OrderError::UnknownStore | OrderError::UnknownVehicle => {
                Self::new(StatusCode::NOT_FOUND, err.to_string())
            }
            OrderError::Conflict(_) => Self::new(StatusCode::CONFLICT, err.to_string()),
            OrderError::Store(StoreError::OrderConflict { .. }) => {
                Self::new(StatusCode::CONFLICT, err.to_string())
            }
            OrderError::Store(e) => e.into(),
        }
    }
}

/// The API for dispatchers and operators: vehicles and their commands.
struct Watchers;
/// The API for every client: reading an order.
struct Clients;

impl Entrance for Watchers {
    const NAME: &'static str = "/api";
    const ROLES: &'static [Role] = &[Role::Dispatcher, Role::Admin];
}

impl Entrance for Clients {
    const NAME: &'static str = "/api";
    const ROLES: &'static [Role] = &[Role::Vendor, Role::Dispatcher, Role::Admin];
}

/// The grant of the bearer token in `headers`, if entrance `E` admits it.
fn grant<E: Entrance>(hub: &Hub, headers: &HeaderMap) -> Result<Grant, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    Ok(hub.authorize::<E>(token)?)
}

fn vehicle_id(raw: &str) -> Result<VehicleId, ApiError> {
    VehicleId::new(raw).map_err(|e| ApiError::bad_request(format!("invalid vehicle id: {e}")))
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Readiness: both MQTT sessions are connected with every subscription active, and the store
/// writes. Otherwise 503 with the reasons; while the store cannot write, also `store`: its
/// latest error, for how long, how many writes failed, and how many messages wait for their
/// PUBACK.
async fn readyz(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    let metrics = hub.metrics();
    let mut reasons = Vec::new();
    if !metrics.mqtt_ready() {
        reasons.push("MQTT not connected and subscribed".to_owned());
    }
    let mut body = json!({ "ready": true });
    if let Some(outage) = metrics.store().report() {
        let waiting = metrics.acks_waiting();
        reasons.push(format!(
            "the store cannot write (for {} s, {} failed writes; {waiting} messages wait for \
             their PUBACK): {}",
            outage.for_secs, outage.failures, outage.cause
        ));
        body["store"] = json!({
            "writable": false,
            "error": outage.cause,
            "for_secs": outage.for_secs,
            "failed_writes": outage.failures,
            "acks_waiting": waiting,
        });
    }
    if reasons.is_empty() {
        return (StatusCode::OK, Json(body));
    }
    body["ready"] = json!(false);
    body["reason"] = json!(reasons.join("; "));
    (StatusCode::SERVICE_UNAVAILABLE, Json(body))
}

/// The counters, to whoever `Hub::metrics_access` admits (a metrics token, loopback, or
/// anyone); 401 or 403 otherwise.
async fn metrics_text<A: Adapter>(
    State(state): State<HttpState<A>>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
) -> Response {
    let peer = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Err(refusal) = state.hub.metrics_access().check(peer, bearer) {
        let status = match refusal {
            MetricsRefusal::Token => StatusCode::UNAUTHORIZED,
            MetricsRefusal::NotLoopback => StatusCode::FORBIDDEN,
        };
        return ApiError::new(status, refusal.to_string()).into_response();
    }
    let mut text = state.hub.metrics_text();
    text.push_str(&state.guard.render());
    if let Some(broker) = &state.broker {
        text.push_str(&broker.render());
    }
    if let Some(cluster) = &state.cluster {
        cluster.render_into(&mut text);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn list_vehicles(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = grant::<Watchers>(&hub, &headers)?;
    let visible = hub.snapshot(|fleet, _| grant.may_see_fleet(fleet));
    Ok(Json(VehicleView::all(&visible)).into_response())
}

async fn get_vehicle(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let grant = grant::<Watchers>(&hub, &headers)?;
    let id = vehicle_id(&id)?;
    let state = hub
        .vehicle(&id)
        .filter(|v| grant.may_see_fleet(&v.status.fleet))
        .ok_or_else(|| ApiError::not_found("vehicle"))?;
    Ok(Json(VehicleView::new(&state)).into_response())
}

async fn post_command(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<CommandRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let grant = grant::<Watchers>(&hub, &headers)?;
    let id = vehicle_id(&id)?;
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let kind = request.to_wire()?;
    let (command_id, result) = hub.command(&grant, &id, kind).await?;
    Ok(Json(command_answer(command_id, result)))
}

/// `POST /api/orders`: places an order like `pickup` on `/vendor`: a vendor for its store, a
/// dispatcher or an admin for the store it names (`"store"`, of a fleet it may see).
async fn post_order<A: Adapter>(
    State(state): State<HttpState<A>>,
    headers: HeaderMap,
    body: Result<Json<OrderRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let grant = grant::<Clients>(&state.hub, &headers)?;
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let placed = place_and_announce(&state.hub, &state.io, None, &grant, &request).await?;
    let status = if placed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(order::placed(&placed))))
}

/// `GET /api/orders/{id}`: state and timeline. Vendors see their own store's orders,
/// dispatchers those of the fleets they may see.
async fn get_order(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let grant = grant::<Clients>(&hub, &headers)?;
    let id =
        OrderId::new(&id).map_err(|e| ApiError::bad_request(format!("invalid order id: {e}")))?;
    let view = hub
        .order_for(&grant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))?;
    Ok(Json(order::order(&view)))
}

/// The most orders `GET /api/orders` answers with at once, and its default.
const ORDERS_MAX: u32 = 1000;
const ORDERS_DEFAULT: u32 = 200;

/// The query of `GET /api/orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersQuery {
    /// Comma-separated state names.
    state: Option<String>,
    /// A vehicle id.
    vehicle: Option<String>,
    /// A store id.
    store: Option<String>,
    /// At most this many (default 200, at most 1000).
    limit: Option<u32>,
}

/// `GET /api/orders?state=a,b&vehicle=V&store=S&limit=N`: `{orders: [...]}`, newest first,
/// within the caller's scope (a vendor: its store's; a dispatcher: its fleets').
async fn list_orders(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    query: Result<Query<OrdersQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let grant = grant::<Clients>(&hub, &headers)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let states = q
        .state
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse::<OrderState>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::bad_request)?;
    let vehicle = q.vehicle.as_deref().map(vehicle_id).transpose()?;
    let filter = OrderFilter {
        fleets: None,
        store: q.store,
        states,
        vehicle,
        limit: q.limit.unwrap_or(ORDERS_DEFAULT).min(ORDERS_MAX),
    };
    let orders = hub.list_orders(&grant, filter).await?;
    Ok(Json(
        json!({ "orders": orders.iter().map(order::summary).collect::<Vec<_>>() }),
    ))
}

fn order_id(raw: &str) -> Result<OrderId, ApiError> {
    OrderId::new(raw).map_err(|e| ApiError::bad_request(format!("invalid order id: {e}")))
}

/// `POST /api/orders/{id}/cancel`: the order, cancelled, with `vehicle_ack` (what the vehicle
/// that held it answered to `CancelOrder`; null if none held it).
async fn cancel_order(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let grant = grant::<Clients>(&hub, &headers)?;
    let id = order_id(&id)?;
    let outcome = hub.cancel_order(&grant, &id).await?;
    let mut body = order::summary(&outcome.order);
    body["vehicle_ack"] = json!(outcome.vehicle_ack);
    Ok(Json(body))
}

/// The body of `POST /api/orders/{id}/assign`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignRequest {
    /// The vehicle to give the order to.
    vehicle: String,
}

/// `POST /api/orders/{id}/assign` `{vehicle}` (dispatcher or admin): gives the order, not yet
/// picked up, to that vehicle; 409 if it cannot (the order then waits for a vehicle).
async fn assign_order(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<AssignRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let grant = grant::<Watchers>(&hub, &headers)?;
    let id = order_id(&id)?;
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let vehicle = vehicle_id(&request.vehicle)?;
    let view = hub.reassign(&grant, &id, &vehicle).await?;
    Ok(Json(order::summary(&view)))
}

/// `GET /api/stores`: `{stores: [{store, fleet, lat, lon}]}`, the configured vendor stores
/// the caller may see (a vendor: its own).
async fn list_stores(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let grant = grant::<Clients>(&hub, &headers)?;
    let stores = hub.stores(&grant);
    Ok(Json(
        json!({ "stores": stores.iter().map(order::store).collect::<Vec<_>>() }),
    ))
}

/// The query of `GET /api/vehicles/{id}/track`.
#[derive(Debug, Deserialize)]
struct TrackQuery {
    /// From, ms since the Unix epoch (device clock); default 0.
    from: Option<u64>,
    /// To, ms since the Unix epoch; default now.
    to: Option<u64>,
    /// `json` (default), `geojson`, `gpx` or `csv`.
    format: Option<String>,
    /// At most this many points (default and maximum 10 000).
    limit: Option<u32>,
}

/// `GET /api/vehicles/{id}/track?from=&to=&format=json|geojson|gpx|csv`: the stored
/// heartbeats of a vehicle in time order; GPX and CSV as a download (`Content-Disposition`).
async fn get_track(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<TrackQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let grant = grant::<Watchers>(&hub, &headers)?;
    let id = vehicle_id(&id)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if !hub.may_see_vehicle(&grant, &id) {
        return Err(ApiError::not_found("vehicle"));
    }
    let (from, to) = (q.from.unwrap_or(0), q.to.unwrap_or(u64::MAX / 2));
    if from > to {
        return Err(ApiError::bad_request("from is after to"));
    }
    let limit = q.limit.unwrap_or(10_000).min(10_000);
    let rows = hub
        .track(&grant, &id, (from, to), limit)
        .await?
        .ok_or_else(|| ApiError::not_found("vehicle"))?;
    match q.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(track(&id, &rows)).into_response()),
        "geojson" => Ok((
            [(header::CONTENT_TYPE, "application/geo+json")],
            Json(track_geojson(&id, &rows)),
        )
            .into_response()),
        "gpx" => Ok(track_download(
            "application/gpx+xml",
            &track_file_name(&id, &q, &rows, "gpx"),
            HeartbeatRow::gpx(&id, &rows),
        )),
        "csv" => Ok(track_download(
            "text/csv; charset=utf-8",
            &track_file_name(&id, &q, &rows, "csv"),
            HeartbeatRow::csv(&rows),
        )),
        other => Err(ApiError::bad_request(format!(
            "format {other:?}: expected json, geojson, gpx or csv"
        ))),
    }
}

/// `{vehicle}-{from}-{to}.{ext}`: the window asked for, or where the track starts and ends
/// when a bound was left out (vehicle ids are `[A-Za-z0-9_.-]`: safe in a header).
fn track_file_name(
    vehicle: &VehicleId,
    q: &TrackQuery,
    rows: &[HeartbeatRow],
    ext: &str,
) -> String {
    let from = q
        .from
        .or_else(|| rows.first().map(|r| r.ts_ms))
        .unwrap_or(0);
    let to =
        q.to.or_else(|| rows.last().map(|r| r.ts_ms))
            .unwrap_or(from);
    format!("{vehicle}-{from}-{to}.{ext}")
}

/// A track export: `body` as `content_type`, to be saved as `file_name`.
fn track_download(content_type: &'static str, file_name: &str, body: String) -> Response {
    let disposition = format!("attachment; filename=\"{file_name}\"");
    (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response()
}
