//! The geofence API (`Authorization: Bearer TOKEN`):
//! - `GET /api/geofences?fleet=F`: `{geofences: [Fence...]}`, custom and automatic, within
//!   the caller's scope (a vendor: its store's fence and its orders' drop-offs).
//! - `POST /api/geofences` `{name, fleet, shape}`: 201 Fence (admin, or a dispatcher of that
//!   fleet; vendors 403; a fleet the caller may not see 403; 409 once the fleet has
//!   `[geofences] max_custom_per_fleet` custom fences, counted in the store's transaction that
//!   writes the fence, so that requests at the same moment, on one bridge or several, cannot
//!   pass it together).
//! - `PUT /api/geofences/{id}` (same body): 200 Fence (409 for a move to a full fleet);
//!   `DELETE /api/geofences/{id}`: 204.
//!   A fence of a fleet the caller may not see is 404, like a missing one; automatic fences
//!   (`store:...`, `dropoff:...`) are read-only: 409.
//!
//! A bad shape is 400 with the reason. Every change is written to the store first, then put
//! in the engine, then announced (`geofences` `{changed: id}` on `/dispatch`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use shared::{FleetId, Position, VehicleId};
use socketioxide::adapter::Adapter;

use super::state::HttpState;
use crate::clock::now_ms;
use crate::domain::Hub;
use crate::domain::auth::{AuthError, Entrance, Grant, Role};
use crate::geofence::{Fence, FenceKind, OpenDropoff, Shape, degrees};
use crate::metrics::Counter;
use crate::store::{FenceWrite, OpenOrderDropoff, OrderView, StoreError, StoredFence};
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

/// 409 for a fence made in or moved to `fleet`, which has `has` custom fences, the most
/// allowed: logged and counted.
fn refused(hub: &Hub, fleet: &FleetId, has: usize) -> FenceError {
    let most = hub.geofences().options().max_custom_per_fleet;
    hub.metrics().count(Counter::GeofencesRefused);
    tracing::warn!(%fleet, has, most, "a geofence refused: its fleet has the most allowed");
    FenceError(
        StatusCode::CONFLICT,
        format!(
            "fleet {fleet} has {has} geofences, the most allowed ([geofences] \
             max_custom_per_fleet = {most}): delete one first"
        ),
    )
}

/// What the store did with a fence: 409 if its fleet was full, 404 if it was gone.
fn written(hub: &Hub, fleet: &FleetId, write: FenceWrite) -> Result<(), FenceError> {
    match write {
        FenceWrite::Written => Ok(()),
        FenceWrite::Full(has) => Err(refused(hub, fleet, has)),
        FenceWrite::Missing => Err(not_found()),
    }
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
    let row = StoredFence {
        id: format!("gf-{:016x}", fastrand::u64(..)),
        name,
        fleet,
        shape: shape_json(&shape)?,
        created_ms: now_ms(),
    };
    let most = state.hub.geofences().options().max_custom_per_fleet;
    let write = state.hub.storage().insert_geofence(&row, most).await?;
    written(&state.hub, &row.fleet, write)?;
    let fence = custom_fence(&row, shape);
    state.hub.geofences().upsert_custom(fence.clone());
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
    // A fence moved to another fleet counts against that fleet's cap, like a new one: the
    // store counts it (`Store::update_geofence`).
    let row = StoredFence {
        id: id.clone(),
        name,
        fleet,
        shape: shape_json(&shape)?,
        created_ms: old.created_ms,
    };
    let most = state.hub.geofences().options().max_custom_per_fleet;
    let write = state
        .hub
        .storage()
        .update_geofence(&row, most, now_ms())
        .await?;
    written(&state.hub, &row.fleet, write)?;
    let fence = custom_fence(&row, shape);
    state.hub.geofences().upsert_custom(fence.clone());
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
    state.hub.geofences().remove_custom(&id);
    tracing::info!(fence = %id, fleet = %old.fleet, by = %grant.name, "geofence deleted");
    changed(&state.io, state.hub.metrics(), &old.fleet, &id).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// How often every open order is read again, whatever the reads of changes between found:
/// what they could miss (a change stamped by a bridge whose clock is more than
/// [`CHANGE_SLACK_MS`] behind, a row changed by hand) is mended then.
const RECONCILE_EVERY: Duration = Duration::from_secs(60);

/// How far before the start of the last read the next read of changes begins, ms: a change is
/// stamped (`updated_ms`) before its transaction commits, and bridges' clocks differ a little.
const CHANGE_SLACK_MS: u64 = 2_000;

/// Keeps the engine's fences in step with the store, for what this bridge did not do itself
/// (other bridges' fences and orders; its own order changes are applied as they are
/// announced: [`order_changed`]). Each step reloads the custom fences, and reads the orders
/// changed since the last step (`Store::dropoffs_changed_since`); every [`RECONCILE_EVERY`],
/// and at the first step, every open order instead. Its cost follows the changes, not the
/// open orders: a bridge with 30,000 open orders and nothing happening reads nothing.
#[derive(Debug, Default)]
pub(crate) struct StoreSync {
    /// When every open order was last read; `None` before the first step.
    reconciled: Option<Instant>,
    /// Where the next read of changes begins, ms since the Unix epoch (this bridge's clock).
    since_ms: u64,
}

impl StoreSync {
    /// One step; returns how many fences changed. A step that fails changes nothing and the
    /// next one reads from where this one would have.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be read (the fences stay as they were).
    pub(crate) async fn step(&mut self, hub: &Arc<Hub>) -> Result<usize, StoreError> {
        let started_ms = now_ms();
        // Before the read: a fence this bridge edits after it is kept as edited, not as read.
        let custom_edits = hub.geofences().custom_edits();
        let custom: Vec<Fence> = hub
            .storage()
            .geofences()
            .await?
            .iter()
            .filter_map(from_stored)
            .collect();
        let geofences = hub.geofences();
        let changed = if self
            .reconciled
            .is_none_or(|at| at.elapsed() >= RECONCILE_EVERY)
        {
            let open: Vec<OpenDropoff> = hub
                .storage()
                .open_dropoffs()
                .await?
                .iter()
                .map(open_dropoff)
                .collect();
            self.reconciled = Some(Instant::now());
            geofences.sync_dropoffs(&open)
        } else {
            let changes = hub.storage().dropoffs_changed_since(self.since_ms).await?;
            changes
                .iter()
                .filter(|change| {
                    if change.open {
                        geofences.order_opened(&open_dropoff(&change.dropoff))
                    } else {
                        geofences.order_closed(&change.dropoff.order)
                    }
                })
                .count()
        };
        self.since_ms = started_ms.saturating_sub(CHANGE_SLACK_MS);
        Ok(changed + geofences.sync_custom(custom, custom_edits))
    }
}

/// Applies an order change this bridge made (`Hub::publish_order_change`) to its drop-off
/// fence at once: added or moved to its new carrier while the order is open, removed once it
/// is delivered or cancelled. Returns whether the fence changed.
pub(crate) fn order_changed(hub: &Hub, order: &OrderView) -> bool {
    let geofences = hub.geofences();
    if order.state.is_final() {
        return geofences.order_closed(order.order.as_str());
    }
    let (lat, lon) = degrees(order.dropoff);
    geofences.order_opened(&OpenDropoff {
        order: order.order.as_str().to_owned(),
        store: order.store.clone(),
        fleet: order.fleet.clone(),
        lat,
        lon,
        created_ms: order.created_ms,
        carrier: order.vehicle.clone(),
    })
}

/// An open order's drop-off as the engine takes it.
fn open_dropoff(o: &OpenOrderDropoff) -> OpenDropoff {
    let (lat, lon) = degrees(Position::new(o.lat_e7, o.lon_e7));
    OpenDropoff {
        order: o.order.clone(),
        store: o.store.clone(),
        fleet: o.fleet.clone(),
        lat,
        lon,
        created_ms: o.created_ms,
        carrier: o.vehicle.as_deref().and_then(|v| VehicleId::new(v).ok()),
    }
}

#[cfg(test)]
mod tests {
    use shared::OrderId;

    use super::*;
    use crate::config::MqttEndpoint;
    use crate::domain::HubParts;
    use crate::domain::auth::Tokens;
    use crate::domain::fleet::Fleet;
    use crate::ingest::mqtt::{self, Session};
    use crate::store::{NewOrder, Store, testing};

    /// A hub on `store` with the default geofences; its MQTT client never connects (nothing
    /// here publishes).
    fn hub(store: Store) -> Arc<Hub> {
        let endpoint = MqttEndpoint {
            host: "127.0.0.1".into(),
            port: 1,
            credentials: None,
            tls: None,
        };
        let (client, _eventloop) = mqtt::connect(
            &endpoint,
            "geofence-test",
            Duration::from_secs(30),
            Session::Events,
        );
        Arc::new(Hub::new(HubParts {
            metrics: Arc::default(),
            tokens: Tokens::new(&Tokens::demo_grants()).expect("tokens"),
            fleet: Fleet::default(),
            store,
            mqtt: client,
            command_timeout: Duration::from_secs(1),
        }))
    }

    /// The drop-off fences, by id, with their carriers.
    fn dropoffs(hub: &Hub) -> Vec<(String, Option<String>)> {
        let fences = hub.geofences().list(|f| f.kind == FenceKind::Dropoff);
        let engine = hub.geofences().engine();
        fences
            .iter()
            .map(|f| {
                let carrier = engine.carrier(&f.id).map(|v| v.as_str().to_owned());
                (f.id.clone(), carrier)
            })
            .collect()
    }

    async fn place(store: &Store, order: &str) {
        store
            .create_order(&NewOrder {
                order: OrderId::new(order).expect("valid"),
                store: "store-1".into(),
                fleet: FleetId::new("demo").expect("valid"),
                customer: "c".into(),
                pickup: Position::new(525_200_000, 134_050_000),
                dropoff: Position::new(525_210_000, 134_060_000),
            })
            .await
            .expect("placed");
    }

    fn fence(order: &str, carrier: Option<&str>) -> (String, Option<String>) {
        (format!("dropoff:{order}"), carrier.map(str::to_owned))
    }

    #[tokio::test]
    async fn own_order_changes_move_the_fence_at_once() {
        let store = testing::sqlite().await;
        let hub = hub(store.clone());
        let id = OrderId::new("o-1").expect("valid");
        let now = async || {
            store
                .order_summary(&id)
                .await
                .expect("read")
                .expect("exists")
        };
        place(&store, "o-1").await;
        assert!(order_changed(&hub, &now().await), "placed: a fence");
        assert!(
            !order_changed(&hub, &now().await),
            "announced twice: as it was"
        );
        assert_eq!(dropoffs(&hub), [fence("o-1", None)]);
        let vehicle = VehicleId::new("demo-0001").expect("valid");
        store.assign(&id, &vehicle).await.expect("assigned");
        assert!(order_changed(&hub, &now().await), "a carrier now");
        assert_eq!(dropoffs(&hub), [fence("o-1", Some("demo-0001"))]);
        store.cancel_order(&id, |_| true).await.expect("cancelled");
        assert!(
            order_changed(&hub, &now().await),
            "cancelled: the fence goes"
        );
        assert!(dropoffs(&hub).is_empty());
    }

    #[tokio::test]
    async fn the_store_sync_reads_what_changed_since_its_last_step() {
        let store = testing::sqlite().await;
        let hub = hub(store.clone());
        let mut sync = StoreSync::default();
        place(&store, "o-1").await;
        assert_eq!(
            sync.step(&hub).await.expect("first step: every open order"),
            1
        );
        assert_eq!(sync.step(&hub).await.expect("step"), 0, "nothing new");
        // Another writer places an order: the next step reads it.
        place(&store, "o-2").await;
        assert_eq!(sync.step(&hub).await.expect("step"), 1);
        assert_eq!(dropoffs(&hub), [fence("o-1", None), fence("o-2", None)]);
        // A change stamped a second before the last step began (a commit that came late, a
        // clock a little behind) is still read.
        let before = now_ms() - 1_000;
        testing::restamp_order(&store, "o-1", "delivered", before).await;
        assert_eq!(sync.step(&hub).await.expect("step"), 1);
        assert_eq!(dropoffs(&hub), [fence("o-2", None)]);
        // One stamped long before is not, until every open order is read again.
        testing::restamp_order(&store, "o-2", "cancelled", 1).await;
        assert_eq!(sync.step(&hub).await.expect("step"), 0);
        assert_eq!(dropoffs(&hub), [fence("o-2", None)]);
        sync.reconciled = Instant::now().checked_sub(RECONCILE_EVERY);
        assert_eq!(sync.step(&hub).await.expect("step"), 1, "read again");
        assert!(dropoffs(&hub).is_empty());
    }
}
