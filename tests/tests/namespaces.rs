//! The Socket.IO hub concepts on real sockets: middleware per namespace, emit to everyone,
//! an order announced to its fleet's dispatchers only, rooms a client may not join.

use serde_json::json;
use tests::WAIT;
use tests::sio::SioClient;
use tests::stack::start_bridge;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_on_every_namespace() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let url = bridge.url();
    for ns in ["/dispatch", "/vendor", "/admin"] {
        let missing = SioClient::refused(&url, ns, None).await?;
        assert!(missing.contains("missing token"), "{ns}: {missing}");
        let unknown = SioClient::refused(&url, ns, Some(json!({ "token": "not-a-token" }))).await?;
        assert!(unknown.contains("unknown token"), "{ns}: {unknown}");
    }
    // A valid token of the wrong role is refused with the namespace named.
    let wrong =
        SioClient::refused(&url, "/admin", Some(json!({ "token": "dispatch-demo" }))).await?;
    assert!(wrong.contains("not valid for /admin"), "{wrong}");
    let wrong = SioClient::refused(&url, "/vendor", Some(json!({ "token": "admin-demo" }))).await?;
    assert!(wrong.contains("not valid for /vendor"), "{wrong}");
    // And the right ones get in.
    for (ns, token) in [
        ("/dispatch", "dispatch-demo"),
        ("/vendor", "vendor-demo"),
        ("/admin", "admin-demo"),
    ] {
        SioClient::connect_with_token(&url, ns, token)
            .await?
            .close()
            .await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_reaches_every_socket_of_every_namespace() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let url = bridge.url();
    let mut dispatcher = SioClient::connect_with_token(&url, "/dispatch", "dispatch-demo").await?;
    let mut vendor = SioClient::connect_with_token(&url, "/vendor", "vendor-demo").await?;
    let mut admin = SioClient::connect_with_token(&url, "/admin", "admin-demo").await?;
    let mut other_admin = SioClient::connect_with_token(&url, "/admin", "admin-demo").await?;

    let ack = admin
        .emit_ack("announce", json!([{ "message": "depot closes at 18:00" }]))
        .await?;
    assert_eq!(ack, json!({ "ok": true }));
    for client in [&mut dispatcher, &mut vendor, &mut admin, &mut other_admin] {
        let announce = client.next_event("announce", WAIT).await?;
        assert_eq!(announce["message"], "depot closes at 18:00");
        assert_eq!(announce["from"], "demo-admin");
    }
    let bad = admin
        .emit_ack("announce", json!([{ "message": "" }]))
        .await?;
    assert_eq!(bad["ok"], false);

    let stats = admin.emit_ack("stats", json!([])).await?;
    assert_eq!(stats["ok"], true);
    assert_eq!(stats["clients"]["dispatch"], 1);
    assert_eq!(stats["clients"]["vendor"], 1);
    assert_eq!(stats["clients"]["admin"], 2);
    for c in [dispatcher, vendor, admin, other_admin] {
        c.close().await;
    }
    Ok(())
}

/// The bridge configuration's token `STORE-secret` of a vendor of the fleet `demo` at `store`,
/// located at `[lat, lon]`.
fn vendor_token(store: &str, [lat, lon]: [f64; 2]) -> String {
    format!(
        "[[tokens]]\ntoken = \"{store}-secret\"\nrole = \"vendor\"\nstore = \"{store}\"\n\
         fleet = \"demo\"\nlocation = [{lat}, {lon}]\n\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickup_reaches_the_fleets_dispatchers_only_and_vendors_stay_in_their_room()
-> anyhow::Result<()> {
    let config = tests::stack::write_bridge_config(&format!(
        "{}{}{}",
        vendor_token("store-1", [52.52, 13.405]),
        vendor_token("store-2", [52.51, 13.40]),
        "[[tokens]]\ntoken = \"dispatch-secret\"\nrole = \"dispatcher\"\nfleets = [\"*\"]\n",
    ))?;
    let bridge = start_bridge(&["--config", config.path().to_str().unwrap_or_default()]).await?;
    let url = bridge.url();
    let mut sender = SioClient::connect_with_token(&url, "/vendor", "store-1-secret").await?;
    let mut other = SioClient::connect_with_token(&url, "/vendor", "store-2-secret").await?;
    let mut dispatcher =
        SioClient::connect_with_token(&url, "/dispatch", "dispatch-secret").await?;
    // The demo tokens are gone once tokens are configured.
    let refused =
        SioClient::refused(&url, "/vendor", Some(json!({ "token": "vendor-demo" }))).await?;
    assert!(refused.contains("unknown token"), "{refused}");

    let pickup = json!({ "order": "o-1", "customer": "Ada", "lat": 52.51, "lon": 13.39 });
    let ack = sender.emit_ack("pickup", json!([pickup])).await?;
    // No vehicle is online: the order is stored, unassigned.
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(
        (ack["order"].as_str(), ack["state"].as_str()),
        (Some("o-1"), Some("created"))
    );
    assert!(ack["vehicle"].is_null());
    // Issue 14: an order (with its customer) goes to the dispatchers of the vendor's fleet,
    // no longer to every other vendor.
    let got = dispatcher.next_event("pickup", WAIT).await?;
    assert_eq!(got["order"], "o-1");
    assert_eq!(got["store"], "store-1");
    assert_eq!(got["customer"], "Ada");
    // The sender's ack came after the announcement on the same connection: had it included the
    // sender, its pickup would already be here.
    assert!(
        sender.drain_events("pickup").is_empty(),
        "the sender got its own pickup"
    );
    // Nor the other store: its own order's ack comes after anything sent to it for o-1.
    let theirs = json!({ "order": "o-2", "customer": "Bo", "lat": 52.5, "lon": 13.4 });
    assert_eq!(other.emit_ack("pickup", json!([theirs])).await?["ok"], true);
    assert!(
        other
            .drain_events("pickup")
            .iter()
            .all(|p| p["order"] != "o-1"),
        "another store got o-1"
    );

    let own = sender.join("vendor:store-1").await?;
    assert_eq!(own, json!({ "ok": true }));
    let theirs = sender.join("vendor:store-2").await?;
    assert_eq!(theirs["ok"], false);
    assert!(
        theirs["error"]
            .as_str()
            .is_some_and(|e| e.contains("own room")),
        "{theirs}"
    );

    let bad = sender
        .emit_ack(
            "pickup",
            json!([{ "order": "bad/id", "customer": "x", "lat": 0, "lon": 0 }]),
        )
        .await?;
    assert_eq!(bad["ok"], false);
    for c in [sender, other, dispatcher] {
        c.close().await;
    }
    Ok(())
}
