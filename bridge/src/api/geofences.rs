//! The geofence API (`Authorization: Bearer TOKEN`):
//! - `GET /api/geofences?fleet=F`: `{geofences: [Fence...]}`, custom and automatic, within
//!   the caller's scope (a vendor: its store's fence and its orders' drop-offs).
//! - `POST /api/geofences` `{name, fleet, shape}`: 201 Fence (admin, or a dispatcher of that
//!   fleet; vendors 403; a fleet the caller may not see 403).
//! - `PUT /api/geofences/{id}` (same body): 200 Fence; `DELETE /api/geofences/{id}`: 204.
//!   A fence of a fleet the caller may not see is 404, like a missing one; automatic fences
//!   (`store:...`, `dropoff:...`) are read-only: 409.
//!
//! A bad shape is 400 with the reason. Every change is written to the store first, then put
//! in the engine, then announced (`geofences` `{changed: id}` on `/dispatch`).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use shared::{FleetId, VehicleId};
use socketioxide::adapter::Adapter;

use super::state::HttpState;
use crate::clock::now_ms;
use crate::domain::Hub;
use crate::domain::auth::{AuthError, Entrance, Grant, Role};
use crate::geofence::{Fence, FenceKind, Shape};
use crate::metrics::Counter;
use crate::store::{StoreError, StoredFence};
use crate::view::geofence::{FenceView, changed};

/// Who may draw fences: dispatchers and operators.
struct FenceEditors;
/// Who may list fences: everyone, each within its scope.
struct FenceReaders;

impl Entrance for FenceEditors {
    const NAME: &'static str = "/api";
    const ROLES: &'static [Role] = &[Role::Dispatcher, Role::Admin];
}

impl Entrance for FenceReaders {
    const NAME: &'static str = "/api";
    const ROLES: &'static [Role] = &[Role::Vendor, Role::Dispatcher, Role::Admin];
}

/// The geofence routes, merged into the API router (`api::http`).
pub(crate) fn routes<A: Adapter>() -> Router<HttpState<A>> {
    Router::new()
        .route("/api/geofences", get(list::<A>).post(create::<A>))
        .route(
            "/api/geofences/{id}",
            axum::routing::put(update::<A>).delete(delete::<A>),
        )
}

/// An error of the geofence API: `{"error": "..."}` with a status.
#[derive(Debug)]
struct FenceError(StatusCode, String);

impl IntoResponse for FenceError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<AuthError> for FenceError {
    fn from(err: AuthError) -> Self {
        let status = match err {
            AuthError::WrongNamespace(_) => StatusCode::FORBIDDEN,
            AuthError::Missing | AuthError::Unknown => StatusCode::UNAUTHORIZED,
        };
        Self(status, err.to_string())
    }
}

impl From<StoreError> for FenceError {
    fn from(err: StoreError) -> Self {
        tracing::error!(cause = %err, "store error");
        Self(StatusCode::SERVICE_UNAVAILABLE, format!("storage: {err}"))
    }
}

fn bad_request(message: impl Into<String>) -> FenceError {
    FenceError(StatusCode::BAD_REQUEST, message.into())
}

fn not_found() -> FenceError {
    FenceError(StatusCode::NOT_FOUND, "unknown geofence".into())
}

fn grant<E: Entrance>(hub: &Hub, headers: &HeaderMap) -> Result<Grant, FenceError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    Ok(hub.authorize::<E>(token)?)
}

/// Whether `grant` may see `fence`: a vendor its own store's fences, others by fleet.
fn may_see(grant: &Grant, fence: &Fence) -> bool {
    match grant.role {
        Role::Vendor => grant.store.is_some() && fence.store == grant.store,
        Role::Dispatcher | Role::Admin => grant.may_see_fleet(&fence.fleet),
    }
}

/// The query of `GET /api/geofences`.
#[derive(Debug, Deserialize)]
struct ListQuery {
    /// Only this fleet's fences.
    fleet: Option<String>,
}

/// The body of `POST` and `PUT`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceBody {
    name: String,
    fleet: String,
    shape: Shape,
}

/// A checked body: its name, fleet and shape.
fn checked(body: FenceBody) -> Result<(String, FleetId, Shape), FenceError> {
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(bad_request("name: 1 to 100 characters"));
    }
    let fleet = FleetId::new(&body.fleet).map_err(|e| bad_request(format!("fleet: {e}")))?;
    let shape = body
        .shape
        .validate()
        .map_err(|e| bad_request(format!("shape: {e}")))?;
    Ok((name, fleet, shape))
}

/// The body, or 400 with serde's reason.
fn body_of(body: Result<Json<FenceBody>, JsonRejection>) -> Result<FenceBody, FenceError> {
    body.map(|Json(b)| b)
        .map_err(|e| bad_request(e.body_text()))
}

/// The fence of a stored row, if its shape reads back.
pub(crate) fn from_stored(row: &StoredFence) -> Option<Fence> {
    let shape = serde_json::from_str::<Shape>(&row.shape)
        .ok()
        .and_then(|s| s.validate().ok());
    let Some(shape) = shape else {
        tracing::warn!(fence = %row.id, "a stored geofence has an unreadable shape: ignored");
        return None;
    };
    Some(custom_fence(row, shape))
}

/// The custom fence of `row`, with its shape already read and checked.
fn custom_fence(row: &StoredFence, shape: Shape) -> Fence {
    Fence {
        id: row.id.clone(),
        name: row.name.clone(),
        fleet: row.fleet.clone(),
        kind: FenceKind::Custom,
        shape,
        created_ms: row.created_ms,
        store: None,
        order: None,
    }
}

/// 409 if `fleet` has as many custom fences as `[geofences] max_custom_per_fleet` allows
/// (counted in this bridge's engine, in step with the store every 2 s), logged and counted.
fn room_for_one_more(hub: &Hub, fleet: &FleetId) -> Result<(), FenceError> {
    let geofences = hub.geofences();
    let most = geofences.options().max_custom_per_fleet;
    let has = geofences
        .list(|f| f.kind == FenceKind::Custom && f.fleet == *fleet)
        .len();
    if has < most {
        return Ok(());
    }
    hub.metrics().count(Counter::GeofencesRefused);
    tracing::warn!(%fleet, has, most, "a new geofence refused: the fleet has the most allowed");
    Err(FenceError(
        StatusCode::CONFLICT,
        format!(
            "fleet {fleet} has {has} geofences, the most allowed ([geofences] \
             max_custom_per_fleet = {most}): delete one first"
        ),
    ))
}

/// 403 unless `grant` may edit fences of `fleet`.
fn may_edit_in(grant: &Grant, fleet: &FleetId) -> Result<(), FenceError> {
    if grant.may_see_fleet(fleet) {
        Ok(())
    } else {
        Err(FenceError(
            StatusCode::FORBIDDEN,
            format!("fleet {fleet} is not yours"),
        ))
    }
}

fn shape_json(shape: &Shape) -> Result<String, FenceError> {
    serde_json::to_string(shape)
        .map_err(|e| FenceError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Whether `id` names an automatic fence (read-only).
fn is_automatic(id: &str) -> bool {
    id.starts_with("store:") || id.starts_with("dropoff:")
}

/// The stored custom fence `id` if `grant` may see it; 409 for a visible automatic fence.
async fn editable(hub: &Hub, grant: &Grant, id: &str) -> Result<StoredFence, FenceError> {
    if is_automatic(id) {
        let visible = hub
            .geofences()
            .engine()
            .fence(id)
            .is_some_and(|f| may_see(grant, &f));
        return Err(if visible {
            FenceError(
                StatusCode::CONFLICT,
                "automatic fences (stores, drop-offs) are read-only".into(),
            )
        } else {
            not_found()
        });
    }
    hub.storage()
        .geofence(id)
        .await?
        .filter(|f| grant.may_see_fleet(&f.fleet))
        .ok_or_else(not_found)
}

/// `GET /api/geofences?fleet=F`.
async fn list<A: Adapter>(
    State(state): State<HttpState<A>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, FenceError> {
    let grant = grant::<FenceReaders>(&state.hub, &headers)?;
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let fleet = q
        .fleet
        .map(|f| FleetId::new(&f).map_err(|e| bad_request(format!("fleet: {e}"))))
        .transpose()?;
    let fences = state
        .hub
        .geofences()
        .list(|f| may_see(&grant, f) && fleet.as_ref().is_none_or(|want| *want == f.fleet));
    let views: Vec<FenceView<'_>> = fences.iter().map(|f| FenceView::new(f)).collect();
    Ok(Json(json!({ "geofences": views })).into_response())
}

/// `POST /api/geofences`.
async fn create<A: Adapter>(
    State(state): State<HttpState<A>>,
    headers: HeaderMap,
    body: Result<Json<FenceBody>, JsonRejection>,
) -> Result<Response, FenceError> {
    let grant = grant::<FenceEditors>(&state.hub, &headers)?;
    let (name, fleet, shape) = checked(body_of(body)?)?;
    may_edit_in(&grant, &fleet)?;
    room_for_one_more(&state.hub, &fleet)?;
    let row = StoredFence {
        id: format!("gf-{:016x}", fastrand::u64(..)),
        name,
        fleet,
        shape: shape_json(&shape)?,
        created_ms: now_ms(),
    };
    state.hub.storage().insert_geofence(&row).await?;
    let fence = custom_fence(&row, shape);
    state.hub.geofences().engine().upsert(fence.clone());
    tracing::info!(fence = %fence.id, fleet = %fence.fleet, by = %grant.name, "geofence created");
    changed(&state.io, state.hub.metrics(), &fence.fleet, &fence.id).await;
    Ok((StatusCode::CREATED, Json(FenceView::new(&fence))).into_response())
}

/// `PUT /api/geofences/{id}`.
async fn update<A: Adapter>(
    State(state): State<HttpState<A>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<FenceBody>, JsonRejection>,
) -> Result<Response, FenceError> {
    let grant = grant::<FenceEditors>(&state.hub, &headers)?;
    let old = editable(&state.hub, &grant, &id).await?;
    let (name, fleet, shape) = checked(body_of(body)?)?;
    may_edit_in(&grant, &fleet)?;
    let row = StoredFence {
        id: id.clone(),
        name,
        fleet,
        shape: shape_json(&shape)?,
        created_ms: old.created_ms,
    };
    if !state.hub.storage().update_geofence(&row, now_ms()).await? {
        return Err(not_found());
    }
    let fence = custom_fence(&row, shape);
    state.hub.geofences().engine().upsert(fence.clone());
    tracing::info!(fence = %fence.id, fleet = %fence.fleet, by = %grant.name, "geofence changed");
    changed(&state.io, state.hub.metrics(), &fence.fleet, &fence.id).await;
    if old.fleet != fence.fleet {
        changed(&state.io, state.hub.metrics(), &old.fleet, &fence.id).await;
    }
    Ok(Json(FenceView::new(&fence)).into_response())
}

/// `DELETE /api/geofences/{id}`.
async fn delete<A: Adapter>(
    State(state): State<HttpState<A>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, FenceError> {
    let grant = grant::<FenceEditors>(&state.hub, &headers)?;
    let old = editable(&state.hub, &grant, &id).await?;
    if !state.hub.storage().delete_geofence(&id).await? {
        return Err(not_found());
    }
    state.hub.geofences().engine().remove(&id);
    tracing::info!(fence = %id, fleet = %old.fleet, by = %grant.name, "geofence deleted");
    changed(&state.io, state.hub.metrics(), &old.fleet, &id).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Keeps the engine's fences in step with the store (custom fences, open orders' drop-offs):
/// what other bridges changed, orders placed and ended. Returns how many fences changed.
///
/// # Errors
/// [`StoreError`] if the store cannot be read (the fences stay as they were).
pub(crate) async fn sync_from_store(hub: &Arc<Hub>) -> Result<usize, StoreError> {
    let custom: Vec<Fence> = hub
        .storage()
        .geofences()
        .await?
        .iter()
        .filter_map(from_stored)
        .collect();
    let open: Vec<crate::geofence::OpenDropoff> = hub
        .storage()
        .open_dropoffs()
        .await?
        .into_iter()
        .map(|o| crate::geofence::OpenDropoff {
            order: o.order,
            store: o.store,
            fleet: o.fleet,
            lat: f64::from(o.lat_e7) * 1e-7,
            lon: f64::from(o.lon_e7) * 1e-7,
            created_ms: o.created_ms,
            carrier: o.vehicle.and_then(|v| VehicleId::new(&v).ok()),
        })
        .collect();
    let geofences = hub.geofences();
    Ok(geofences.sync_custom(custom) + geofences.sync_dropoffs(&open))
}
