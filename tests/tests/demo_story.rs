//! The one-command demo tells the delivery story by itself: the real `bridge --simulate`
//! (sped up) runs simulated vehicles and three simulated stores, each store's orders are
//! placed through the HTTP API with its own demo token and delivered, and the demo stops
//! cleanly. A port that another program holds is named, with the flag that chooses another.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tests::WAIT;
use tests::process::Program;
use tests::sio::DISPATCH_TOKEN;
use tests::stack::start_bridge;
use tokio::process::Command;
use tokio::time::Instant;

/// The demo stores and their vendor tokens.
const STORES: [(&str, &str); 3] = [
    ("store-1", "vendor-demo"),
    ("store-2", "vendor-demo-2"),
    ("store-3", "vendor-demo-3"),
];

/// How long the sped-up demo may take until every store has a delivered order: at speed 10
/// a delivery (drive to the store, handover, a drive of 300–900 m, handover) takes well
/// under a minute of real time.
const STORY_WITHIN: Duration = Duration::from_secs(180);

/// The stores whose orders `orders` (a `GET /api/orders` answer) shows delivered.
fn delivered_stores(orders: &Value) -> BTreeSet<String> {
    orders["orders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["state"] == "delivered")
        .filter_map(|o| o["store"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_demo_store_gets_an_order_delivered() -> anyhow::Result<()> {
    let mut bridge = start_bridge(&["--simulate", "30", "--sim-speed", "10"]).await?;

    // Each store places orders with its own token: its vendor view lists them.
    let deadline = Instant::now() + STORY_WITHIN;
    let delivered = loop {
        let (status, orders) = bridge
            .get_json(
                "/api/orders?state=delivered&limit=1000",
                Some(DISPATCH_TOKEN),
            )
            .await?;
        assert_eq!(status, 200, "{orders}");
        let delivered = delivered_stores(&orders);
        if delivered.len() == STORES.len() {
            break delivered;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "within {STORY_WITHIN:?} only {delivered:?} had an order delivered; bridge log:\n{}",
            bridge.program.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        delivered,
        STORES.iter().map(|(s, _)| (*s).to_owned()).collect(),
        "store ids"
    );
    for (store, token) in STORES {
        let (status, mine) = bridge.get_json("/api/orders", Some(token)).await?;
        assert_eq!(status, 200, "{mine}");
        let mine = mine["orders"].as_array().cloned().unwrap_or_default();
        assert!(!mine.is_empty(), "{store} placed no order");
        assert!(
            mine.iter().all(|o| o["store"] == store),
            "{token} sees only {store}'s orders"
        );
        // Each order went through the whole story, in order, on one vehicle.
        let done = mine
            .iter()
            .find(|o| o["state"] == "delivered")
            .and_then(|o| o["order"].as_str())
            .expect("a delivered order");
        let (status, order) = bridge
            .get_json(&format!("/api/orders/{done}"), Some(token))
            .await?;
        assert_eq!(status, 200, "{order}");
        let steps: Vec<&str> = order["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["kind"].as_str())
            .collect();
        for step in ["pickup", "in-transit", "delivered"] {
            assert!(steps.contains(&step), "{done}: {step} missing in {order}");
        }
        let line = bridge
            .program
            .find_line(&format!("simulated store placed an order store={store}"))
            .expect("the store logs what it places");
        assert!(line.contains(" INFO "), "{line}");
    }

    // A clean stop: the stores and vehicles end before the bridge, nothing goes wrong.
    let status = bridge.program.terminate(WAIT).await?;
    let log = bridge.program.log_text();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    for (store, _) in STORES {
        assert!(
            log.contains(&format!("simulated store stopped store={store}")),
            "{store} did not stop cleanly:\n{log}"
        );
    }
    assert!(log.contains("simulated vehicles stopped"), "{log}");
    let stopping = log.find("SIGTERM received").unwrap_or_default();
    let bad: Vec<&str> = log[stopping..]
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect();
    assert!(
        bad.is_empty(),
        "errors or warnings while stopping: {bad:#?}"
    );
    Ok(())
}

/// Runs the bridge with `args` (its own store, a second port on 127.0.0.1:0) and returns its
/// exit status and log.
async fn run_bridge_to_exit(args: &[&str]) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let dir = tests::temp_dir()?;
    let mut cmd = Command::new(tests::bin::path("bridge")?);
    cmd.args(args)
        .arg("--store")
        .arg(dir.path().join("fleetbeat.db"));
    let mut program = Program::spawn("bridge", cmd)?;
    // Its log is whole once it exited (`wait_exit` reads the last lines).
    let status = program.wait_exit(WAIT).await?;
    Ok((status, program.log_text()))
}

/// The one line that says what happened, from `log`.
fn error_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("cannot listen"))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_named_with_the_flag_that_changes_it() -> anyhow::Result<()> {
    // Another program holds a port (as Debian's mosquitto service holds 1883).
    let holder = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = holder.local_addr()?.to_string();

    let (status, log) =
        run_bridge_to_exit(&["--listen", "127.0.0.1:0", "--mqtt-listen", &taken]).await?;
    assert!(!status.success(), "exit {status:?}:\n{log}");
    let line = error_line(&log);
    for needle in [
        &format!("cannot listen for MQTT on {taken}"),
        "in use by another program",
        "--mqtt-listen",
        "FLEETBEAT_MQTT_LISTEN",
    ] {
        assert!(
            line.contains(needle),
            "{needle:?} not in {line:?}; log:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");

    let (status, log) =
        run_bridge_to_exit(&["--listen", &taken, "--mqtt-listen", "127.0.0.1:0"]).await?;
    assert!(!status.success(), "exit {status:?}:\n{log}");
    let line = error_line(&log);
    for needle in [
        &format!("cannot listen for HTTP on {taken}"),
        "in use by another program",
        "--listen",
        "FLEETBEAT_LISTEN",
    ] {
        assert!(
            line.contains(needle),
            "{needle:?} not in {line:?}; log:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
    drop(holder);
    Ok(())
}
