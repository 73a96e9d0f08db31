//! Geofences (issue #16): CRUD over HTTP within each token's scope, and `geofence` events
//! raised from real sealed heartbeats (published with `mosquitto_pub` to the bridge's
//! embedded broker), received by real node socket.io-clients: one `enter` and one `exit` per
//! crossing, none for GPS jitter at the edge (hysteresis), and a store's fence events reach
//! that store's vendor socket and no other store's; an order's drop-off fence is entered by the
//! vehicle holding the order only (a vehicle that answers `AssignOrder` over MQTT), never by
//! another passing by.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use shared::{AckResult, Command, CommandAck, Heartbeat, Position, StatusFlags, Topic, VehicleId};
use tests::WAIT;
use tests::sio::SioClient;
use tests::stack::{BridgeProcess, start_bridge, write_bridge_config};

/// Two stores of fleet `north` at different places, dispatchers of `north` and `south`, an
/// operator.
const TOKENS: &str = r#"
[[tokens]]
token = "store-n-secret"
role = "vendor"
store = "store-n"
fleet = "north"
name = "store-n"
location = [52.52, 13.405]

[[tokens]]
token = "store-m-secret"
role = "vendor"
store = "store-m"
fleet = "north"
name = "store-m"
location = [52.53, 13.42]

[[tokens]]
token = "north-secret"
role = "dispatcher"
fleets = ["north"]
name = "north-desk"

[[tokens]]
token = "south-secret"
role = "dispatcher"
fleets = ["south"]
name = "south-desk"

[[tokens]]
token = "admin-secret"
role = "admin"
name = "ops"
"#;

/// The custom fence of the crossing test: a 100 m circle here (default hysteresis 15 m).
const CENTRE: (f64, f64) = (52.50, 13.40);
/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_195.0;

/// A bridge with the test's tokens and `extra` arguments, and its config file (kept while
/// the bridge runs).
async fn scoped_bridge(extra: &[&str]) -> anyhow::Result<(BridgeProcess, tempfile::NamedTempFile)> {
    let config = write_bridge_config(TOKENS)?;
    let path = config.path().to_str().context("utf-8 path")?.to_owned();
    let args: Vec<&str> = ["--config", path.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let bridge = start_bridge(&args).await?;
    Ok((bridge, config))
}

/// `method path` with a JSON body (or none) as `token`: status and JSON body (`null` if none).
async fn call(
    bridge: &BridgeProcess,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut request = reqwest::Client::new()
        .request(method.clone(), format!("{}{path}", bridge.url()))
        .bearer_auth(token)
        .timeout(WAIT);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text}"))?
    };
    Ok((status, body))
}

fn circle(lat: f64, lon: f64, radius_m: f64) -> Value {
    json!({ "type": "circle", "lat": lat, "lon": lon, "radius_m": radius_m })
}

/// The ids of the fences `token` lists (`query` appended to the path).
async fn listed(bridge: &BridgeProcess, token: &str, query: &str) -> anyhow::Result<Vec<String>> {
    let (status, body) = call(
        bridge,
        reqwest::Method::GET,
        &format!("/api/geofences{query}"),
        token,
        None,
    )
    .await?;
    anyhow::ensure!(status == 200, "list: {status} {body}");
    Ok(body["geofences"]
        .as_array()
        .context("geofences")?
        .iter()
        .filter_map(|f| f["id"].as_str().map(str::to_owned))
        .collect())
}

/// How many custom fences (`gf-...`) of fleet `north` the admin sees listed.
async fn north_custom_count(bridge: &BridgeProcess) -> anyhow::Result<usize> {
    Ok(listed(bridge, "admin-secret", "?fleet=north")
        .await?
        .into_iter()
        .filter(|id| id.starts_with("gf-"))
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_are_managed_over_http_within_each_scope() -> anyhow::Result<()> {
    use reqwest::Method;
    let (bridge, _config) = scoped_bridge(&[]).await?;
    let mut north_page =
        SioClient::connect_with_token(&bridge.url(), "/dispatch", "north-secret").await?;

    let body = json!({ "name": "depot", "fleet": "north", "shape": circle(52.5, 13.4, 80.0) });
    let (status, created) = call(
        &bridge,
        Method::POST,
        "/api/geofences",
        "north-secret",
        Some(&body),
    )
    .await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().context("id")?.to_owned();
    assert_eq!(created["kind"], "custom");
    assert_eq!(created["fleet"], "north");
    assert_eq!(created["shape"], circle(52.5, 13.4, 80.0));
    let changed = north_page.next_event("geofences", WAIT).await?;
    assert_eq!(changed, json!({ "changed": id }));

    // Listed with the automatic fences of the fleet's stores; nothing of it for `south`.
    let mut north = listed(&bridge, "north-secret", "?fleet=north").await?;
    north.sort();
    assert_eq!(
        north,
        vec![id.clone(), "store:store-m".into(), "store:store-n".into()]
    );
    assert!(listed(&bridge, "south-secret", "").await?.is_empty());
    assert!(
        listed(&bridge, "south-secret", "?fleet=north")
            .await?
            .is_empty()
    );
    assert_eq!(
        listed(&bridge, "store-n-secret", "").await?,
        vec!["store:store-n".to_owned()],
        "a vendor sees its own store's fence"
    );
    let (_, all) = call(&bridge, Method::GET, "/api/geofences", "admin-secret", None).await?;
    let store_n = all["geofences"]
        .as_array()
        .context("list")?
        .iter()
        .find(|f| f["id"] == "store:store-n")
        .context("store fence")?
        .clone();
    assert_eq!(store_n["kind"], "store");
    assert_eq!(
        store_n["shape"],
        circle(52.52, 13.405, 60.0),
        "the default store radius"
    );

    // Other fleets' dispatchers: 404 on the fence (like a missing one), 403 on the fleet.
    let path = format!("/api/geofences/{id}");
    assert_eq!(
        call(&bridge, Method::PUT, &path, "south-secret", Some(&body))
            .await?
            .0,
        404
    );
    assert_eq!(
        call(&bridge, Method::DELETE, &path, "south-secret", None)
            .await?
            .0,
        404
    );
    let south_made = json!({ "name": "x", "fleet": "north", "shape": circle(52.5, 13.4, 50.0) });
    assert_eq!(
        call(
            &bridge,
            Method::POST,
            "/api/geofences",
            "south-secret",
            Some(&south_made)
        )
        .await?
        .0,
        403
    );
    // Vendors may not draw fences.
    assert_eq!(
        call(
            &bridge,
            Method::POST,
            "/api/geofences",
            "store-n-secret",
            Some(&body)
        )
        .await?
        .0,
        403
    );
    assert_eq!(
        call(&bridge, Method::DELETE, &path, "store-n-secret", None)
            .await?
            .0,
        403
    );
    assert_eq!(
        call(
            &bridge,
            Method::POST,
            "/api/geofences",
            "no-such-token",
            Some(&body)
        )
        .await?
        .0,
        401
    );

    // Bad shapes: 400 with the reason.
    for (shape, reason) in [
        (
            json!({ "type": "polygon", "points": [[52.5, 13.4], [52.501, 13.401], [52.5, 13.401], [52.501, 13.4]] }),
            "crosses itself",
        ),
        (
            json!({ "type": "polygon", "points": [[52.5, 13.4], [52.501, 13.401]] }),
            "3 ..= 256 points",
        ),
        (circle(95.0, 13.4, 50.0), "bad coordinates"),
        (circle(52.5, 13.4, -1.0), "radius_m"),
        (json!({ "type": "hexagon" }), "unknown variant"),
    ] {
        let bad = json!({ "name": "bad", "fleet": "north", "shape": shape });
        let (status, answer) = call(
            &bridge,
            Method::POST,
            "/api/geofences",
            "north-secret",
            Some(&bad),
        )
        .await?;
        assert_eq!(status, 400, "{bad}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{bad}: {error}");
    }

    // Automatic fences are read-only.
    let (status, answer) = call(
        &bridge,
        Method::PUT,
        "/api/geofences/store:store-n",
        "north-secret",
        Some(&body),
    )
    .await?;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(
        call(
            &bridge,
            Method::DELETE,
            "/api/geofences/store:store-n",
            "admin-secret",
            None
        )
        .await?
        .0,
        409
    );

    // Changed, then deleted, by its fleet's dispatcher.
    let polygon = json!({ "type": "polygon", "points": [[52.5, 13.4], [52.5, 13.402], [52.501, 13.402], [52.501, 13.4]] });
    let renamed = json!({ "name": "yard", "fleet": "north", "shape": polygon });
    let (status, updated) =
        call(&bridge, Method::PUT, &path, "north-secret", Some(&renamed)).await?;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        (&updated["name"], &updated["shape"], &updated["created_ms"]),
        (&json!("yard"), &polygon, &created["created_ms"])
    );
    assert_eq!(
        north_page.next_event("geofences", WAIT).await?,
        json!({ "changed": id })
    );
    let (status, _) = call(&bridge, Method::DELETE, &path, "north-secret", None).await?;
    assert_eq!(status, 204);
    assert_eq!(
        north_page.next_event("geofences", WAIT).await?,
        json!({ "changed": id })
    );
    assert!(!listed(&bridge, "admin-secret", "").await?.contains(&id));
    assert_eq!(
        call(&bridge, Method::DELETE, &path, "north-secret", None)
            .await?
            .0,
        404
    );
    north_page.close().await;
    Ok(())
}

/// Publishes heartbeats of vehicle `id` of fleet `north`, sealed with its open-mode key.
struct Vehicle {
    mqtt: std::net::SocketAddr,
    id: &'static str,
    seq: u32,
}

impl Vehicle {
    /// Reports `(lat, lon)`, then leaves the bridge time to evaluate it (its geofence task
    /// runs every 100 ms and evaluates each vehicle's latest position): every position is
    /// seen, so jitter is really tested.
    async fn at(&mut self, (lat, lon): (f64, f64)) -> anyhow::Result<()> {
        self.seq += 1;
        let now = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
        let hb = Heartbeat {
            seq: self.seq,
            ts_ms: now,
            pos: Position::new((lat * 1e7).round() as i32, (lon * 1e7).round() as i32),
            speed_cm_s: 500,
            heading_deg: 0,
            battery_pct: 80,
            flags: StatusFlags(StatusFlags::GPS_FIX),
        };
        let topic = format!("fleet/north/{}/hb", self.id);
        let parsed = Topic::parse(&topic).map_err(anyhow::Error::msg)?;
        let key = shared::open_mode_key(&VehicleId::new(self.id).map_err(anyhow::Error::msg)?);
        let mut buf = [0u8; shared::MAX_PAYLOAD];
        let sealed = shared::seal(
            &hb,
            &parsed.name(),
            now + u64::from(self.seq),
            &key,
            &mut buf,
        )
        .map_err(anyhow::Error::msg)?;
        tests::mosquitto::publish(self.mqtt, &topic, sealed, 0).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        Ok(())
    }

    /// Reports a point `north_m` metres north of [`CENTRE`].
    async fn north_of_centre(&mut self, north_m: f64) -> anyhow::Result<()> {
        self.at((CENTRE.0 + north_m / M_PER_DEG, CENTRE.1)).await
    }
}

/// Seals `msg` for `topic` with the open-mode key of `vehicle`.
fn sealed(vehicle: &str, topic: &str, msg: &CommandAck) -> anyhow::Result<Vec<u8>> {
    let parsed = Topic::parse(topic).map_err(anyhow::Error::msg)?;
    let key = shared::open_mode_key(&VehicleId::new(vehicle).map_err(anyhow::Error::msg)?);
    let counter = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros())?;
    let mut buf = [0u8; shared::MAX_PAYLOAD];
    let out =
        shared::seal(msg, &parsed.name(), counter, &key, &mut buf).map_err(anyhow::Error::msg)?;
    Ok(out.to_vec())
}

/// A device of fleet `north` that answers every command sent to `vehicle` with `ok` over its
/// own MQTT connection (it accepts any order), until the task is aborted.
async fn accept_commands(
    mqtt: std::net::SocketAddr,
    vehicle: &'static str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut options = MqttOptions::new(vehicle, mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let cmd = format!("fleet/north/{vehicle}/cmd");
    client.subscribe(&cmd, QoS::AtLeastOnce).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .context("no SUBACK for the command topic")??;
        if matches!(event, Event::Incoming(Packet::SubAck(_))) {
            break;
        }
    }
    let ack_topic = format!("fleet/north/{vehicle}/ack");
    Ok(tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // Commands travel unsealed (the bridge is not a device); acks sealed.
                    let command = match shared::decode::<Command>(&p.payload) {
                        Ok(command) => command,
                        Err(err) => {
                            eprintln!("{vehicle}: a command that does not decode: {err:?}");
                            continue;
                        }
                    };
                    let ack = CommandAck {
                        id: command.id,
                        result: AckResult::Ok,
                    };
                    let sent = sealed(vehicle, &ack_topic, &ack).and_then(|payload| {
                        Ok(client.try_publish(&ack_topic, QoS::AtLeastOnce, false, payload)?)
                    });
                    if let Err(err) = sent {
                        eprintln!("{vehicle}: cannot answer command {}: {err:#}", ack.id);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }))
}

/// The next `geofence` event of `client`: `(fence, transition)`.
async fn next_crossing(client: &mut SioClient) -> anyhow::Result<(String, String, Value)> {
    let event = client.next_event("geofence", WAIT).await?;
    Ok((
        event["fence"].as_str().unwrap_or_default().to_owned(),
        event["transition"].as_str().unwrap_or_default().to_owned(),
        event,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossings_raise_one_event_each_and_jitter_none() -> anyhow::Result<()> {
    let (bridge, _config) = scoped_bridge(&[]).await?;
    let mut desk =
        SioClient::connect_with_token(&bridge.url(), "/dispatch", "north-secret").await?;
    let mut south =
        SioClient::connect_with_token(&bridge.url(), "/dispatch", "south-secret").await?;
    let mut store_n =
        SioClient::connect_with_token(&bridge.url(), "/vendor", "store-n-secret").await?;
    let mut store_m =
        SioClient::connect_with_token(&bridge.url(), "/vendor", "store-m-secret").await?;
    let body =
        json!({ "name": "yard", "fleet": "north", "shape": circle(CENTRE.0, CENTRE.1, 100.0) });
    let (status, fence) = call(
        &bridge,
        reqwest::Method::POST,
        "/api/geofences",
        "admin-secret",
        Some(&body),
    )
    .await?;
    assert_eq!(status, 201, "{fence}");
    let yard = fence["id"].as_str().context("id")?.to_owned();
    let mut vehicle = Vehicle {
        mqtt: bridge.mqtt,
        id: "north-g1",
        seq: 0,
    };

    // Approaching from 300 m north: nothing until 15 m inside the rim (at 85 m).
    for north_m in [300.0, 150.0, 110.0, 100.0, 90.0] {
        vehicle.north_of_centre(north_m).await?;
    }
    vehicle.north_of_centre(70.0).await?;
    let (fence_id, transition, event) = next_crossing(&mut desk).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        (yard.as_str(), "enter"),
        "{event}"
    );
    assert_eq!(
        (
            &event["vehicle"],
            &event["fleet"],
            &event["kind"],
            &event["name"]
        ),
        (
            &json!("north-g1"),
            &json!("north"),
            &json!("custom"),
            &json!("yard")
        )
    );
    let lat = event["lat"].as_f64().context("lat")?;
    assert!(
        (lat - (CENTRE.0 + 70.0 / M_PER_DEG)).abs() < 1e-6,
        "{event}"
    );
    assert!(
        event["ts_ms"].as_u64().is_some() && event.get("store").is_none(),
        "{event}"
    );

    // GPS jitter across the rim, never 15 m beyond it: no event. Then out for real: one exit.
    for north_m in [95.0, 108.0, 92.0, 112.0, 99.0, 105.0, 88.0, 113.0] {
        vehicle.north_of_centre(north_m).await?;
    }
    vehicle.north_of_centre(130.0).await?;
    let (fence_id, transition, event) = next_crossing(&mut desk).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        (yard.as_str(), "exit"),
        "jitter raised an event: {event}"
    );
    // Jitter outside: nothing; back in: one enter (what came before it is on the same socket).
    for north_m in [110.0, 90.0, 112.0] {
        vehicle.north_of_centre(north_m).await?;
    }
    vehicle.north_of_centre(0.0).await?;
    let (fence_id, transition, event) = next_crossing(&mut desk).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        (yard.as_str(), "enter"),
        "{event}"
    );

    // To store-n: its enter reaches store-n's vendor socket (and the desk), with the store;
    // then to store-m: store-n gets the exit, store-m its own enter and nothing of store-n.
    vehicle.at((52.52, 13.405)).await?;
    let (fence_id, transition, _) = next_crossing(&mut desk).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        (yard.as_str(), "exit")
    );
    let (fence_id, transition, _) = next_crossing(&mut desk).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("store:store-n", "enter")
    );
    let (fence_id, transition, event) = next_crossing(&mut store_n).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("store:store-n", "enter"),
        "{event}"
    );
    assert_eq!(
        (&event["kind"], &event["store"], &event["vehicle"]),
        (&json!("store"), &json!("store-n"), &json!("north-g1"))
    );
    vehicle.at((52.53, 13.42)).await?;
    let (fence_id, transition, event) = next_crossing(&mut store_m).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("store:store-m", "enter"),
        "store-m got another store's event first: {event}"
    );
    let (fence_id, transition, _) = next_crossing(&mut store_n).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("store:store-n", "exit")
    );
    // Back to store-n: its next event is its own enter, so store-m's never reached it.
    vehicle.at((52.52, 13.405)).await?;
    let (fence_id, transition, event) = next_crossing(&mut store_n).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("store:store-n", "enter"),
        "store-n got another store's event: {event}"
    );
    let (fence_id, transition, _) = next_crossing(&mut store_m).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("store:store-m", "exit")
    );

    // The dispatcher of another fleet saw none of it (by the time the desk has the last
    // event, the south socket, served by the same broadcast, has whatever was sent to it).
    let mut last = next_crossing(&mut desk).await?;
    while last.0 != "store:store-n" || last.1 != "enter" {
        last = next_crossing(&mut desk).await?;
    }
    assert!(
        south.drain_events("geofence").is_empty(),
        "a south dispatcher got north's geofence events"
    );
    // Every transition is counted once, whoever received it.
    assert!(
        bridge
            .metric("fleetbeat_bridge_geofence_transitions_total")
            .await?
            >= 6.0,
        "geofence transitions counted"
    );
    for client in [desk, south, store_n, store_m] {
        client.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_has_at_most_max_custom_per_fleet_fences() -> anyhow::Result<()> {
    use reqwest::Method;
    let (bridge, config) = scoped_bridge(&["--geofences-max-custom-per-fleet", "2"]).await?;
    let fence = |fleet: &str, k: f64| json!({ "name": format!("f{k}"), "fleet": fleet, "shape": circle(52.5 + k / 100.0, 13.4, 50.0) });
    let create = |token: &'static str, body: Value| {
        let bridge = &bridge;
        async move { call(bridge, Method::POST, "/api/geofences", token, Some(&body)).await }
    };
    let (status, first) = create("north-secret", fence("north", 1.0)).await?;
    assert_eq!(status, 201, "{first}");
    assert_eq!(create("admin-secret", fence("north", 2.0)).await?.0, 201);
    // The third of fleet north is refused with the reason, counted; nothing is stored.
    let (status, refused) = create("admin-secret", fence("north", 3.0)).await?;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_custom_per_fleet = 2")),
        "{refused}"
    );
    assert_eq!(
        bridge
            .metric("fleetbeat_bridge_geofences_refused_total")
            .await?,
        1.0
    );
    assert_eq!(
        north_custom_count(&bridge).await?,
        2,
        "the refused fence is not stored"
    );
    // The bound is per fleet; the automatic store fences do not count.
    let (status, south) = create("south-secret", fence("south", 1.0)).await?;
    assert_eq!(status, 201, "{south}");
    // Deleting one makes room again.
    let first_id = first["id"].as_str().context("id")?;
    let (status, _) = call(
        &bridge,
        Method::DELETE,
        &format!("/api/geofences/{first_id}"),
        "north-secret",
        None,
    )
    .await?;
    assert_eq!(status, 204);
    assert_eq!(create("north-secret", fence("north", 4.0)).await?.0, 201);
    // A fence moved into the full fleet counts there like a new one: refused, and it stays
    // where it was.
    let south_id = south["id"].as_str().context("id")?;
    let put = |body: Value| {
        let path = format!("/api/geofences/{south_id}");
        let bridge = &bridge;
        async move { call(bridge, Method::PUT, &path, "admin-secret", Some(&body)).await }
    };
    let (status, moved) = put(fence("north", 5.0)).await?;
    assert_eq!(status, 409, "{moved}");
    assert_eq!(
        bridge
            .metric("fleetbeat_bridge_geofences_refused_total")
            .await?,
        2.0
    );
    let in_south = listed(&bridge, "admin-secret", "?fleet=south").await?;
    assert!(in_south.iter().any(|id| id == south_id), "{in_south:?}");
    // Changed in place, in its own (not full) fleet: fine.
    let (status, changed) = put(fence("south", 6.0)).await?;
    assert_eq!(status, 200, "{changed}");
    drop(config);
    Ok(())
}

/// Creates sent at the same moment cannot pass the cap together: of 8 at once with room for
/// 2, exactly 2 are made and the others refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_at_the_same_moment_do_not_pass_the_cap() -> anyhow::Result<()> {
    let (bridge, config) = scoped_bridge(&["--geofences-max-custom-per-fleet", "2"]).await?;
    let url = format!("{}/api/geofences", bridge.url());
    let mut creates = tokio::task::JoinSet::new();
    for k in 0..8u32 {
        let url = url.clone();
        let body = json!({
            "name": format!("f{k}"),
            "fleet": "north",
            "shape": circle(52.5 + f64::from(k) / 100.0, 13.4, 50.0),
        });
        creates.spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth("admin-secret")
                .json(&body)
                .timeout(WAIT)
                .send()
                .await
                .map(|response| response.status().as_u16())
        });
    }
    let mut statuses = Vec::new();
    while let Some(done) = creates.join_next().await {
        statuses.push(done??);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 201, 409, 409, 409, 409, 409, 409]);
    assert_eq!(north_custom_count(&bridge).await?, 2, "two stored");
    drop(config);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_orders_dropoff_is_a_fence_that_reaches_its_store() -> anyhow::Result<()> {
    let (bridge, _config) = scoped_bridge(&[]).await?;
    let mut store_n =
        SioClient::connect_with_token(&bridge.url(), "/vendor", "store-n-secret").await?;
    let mut store_m =
        SioClient::connect_with_token(&bridge.url(), "/vendor", "store-m-secret").await?;
    let dropoff = (52.51, 13.41);
    // north-g2 is online (far from everything) and accepts orders: the order is its.
    let acks = accept_commands(bridge.mqtt, "north-g2").await?;
    let mut vehicle = Vehicle {
        mqtt: bridge.mqtt,
        id: "north-g2",
        seq: 0,
    };
    vehicle.at((52.49, 13.39)).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, list) = bridge
            .get_json("/api/vehicles", Some("north-secret"))
            .await?;
        if status == 200 && list.to_string().contains("north-g2") {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "north-g2 never listed: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order =
        json!({ "order": "o-geo-1", "customer": "Ada", "lat": dropoff.0, "lon": dropoff.1 });
    let (status, placed) = bridge
        .post_json("/api/orders", "store-n-secret", &order)
        .await?;
    assert!(status == 201 || status == 200, "{status} {placed}");
    assert_eq!(placed["vehicle"], json!("north-g2"), "{placed}");

    // The drop-off fence appears as the order is announced (`geofences::order_changed`).
    let deadline = tokio::time::Instant::now() + WAIT;
    while !listed(&bridge, "north-secret", "")
        .await?
        .contains(&"dropoff:o-geo-1".to_owned())
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no drop-off fence for o-geo-1"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        listed(&bridge, "store-n-secret", "")
            .await?
            .contains(&"dropoff:o-geo-1".to_owned()),
        "the store sees its order's fence"
    );
    assert!(
        !listed(&bridge, "store-m-secret", "")
            .await?
            .contains(&"dropoff:o-geo-1".to_owned()),
        "another store does not"
    );

    // Another vehicle of the fleet drives through the customer's door first: not the
    // carrier, so nothing; then the carrier arrives and the store that placed the order is
    // told, with it.
    let mut passer_by = Vehicle {
        mqtt: bridge.mqtt,
        id: "north-g3",
        seq: 0,
    };
    passer_by
        .at((dropoff.0 + 300.0 / M_PER_DEG, dropoff.1))
        .await?;
    passer_by.at(dropoff).await?;
    passer_by
        .at((dropoff.0 - 300.0 / M_PER_DEG, dropoff.1))
        .await?;
    vehicle
        .at((dropoff.0 + 300.0 / M_PER_DEG, dropoff.1))
        .await?;
    vehicle.at(dropoff).await?;
    let (fence_id, transition, event) = next_crossing(&mut store_n).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("dropoff:o-geo-1", "enter"),
        "{event}"
    );
    assert_eq!(
        (
            &event["kind"],
            &event["order"],
            &event["store"],
            &event["vehicle"]
        ),
        (
            &json!("dropoff"),
            &json!("o-geo-1"),
            &json!("store-n"),
            &json!("north-g2")
        )
    );
    // The other store's first event is its own fence's, not store-n's drop-off.
    vehicle.at((52.53, 13.42)).await?;
    let (fence_id, transition, event) = next_crossing(&mut store_m).await?;
    assert_eq!(
        (fence_id.as_str(), transition.as_str()),
        ("store:store-m", "enter"),
        "{event}"
    );
    acks.abort();
    store_n.close().await;
    store_m.close().await;
    Ok(())
}
