//! The bridge rides out a broker crash: it reconnects, resubscribes and traffic resumes
//! without restarting the bridge.

use tests::WAIT;
use tests::sio::SioClient;
use tests::stack::{free_port, start_bridge_external, start_broker_process, start_sim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_resumes_after_the_broker_restarts() -> anyhow::Result<()> {
    let addr = free_port()?;
    let mut broker = start_broker_process(addr, &[]).await?;
    let mut bridge = start_bridge_external(addr, &[]).await?;
    let _sim = start_sim(addr, 2, "phoenix", &["--rate", "5"])?;
    let mut dispatcher = SioClient::dispatcher_in(&bridge.url(), "fleet:phoenix").await?;
    dispatcher
        .positions_until(WAIT, |p| p["fleet"] == "phoenix")
        .await?;

    broker.kill().await?;
    // The bridge notices: not ready while the broker is gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    while bridge.get("/readyz").await?.0 == 200 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still ready without a broker"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let _broker = start_broker_process(addr, &[]).await?;
    bridge.wait_ready().await?;
    dispatcher.drain_events("position");
    let resumed = dispatcher
        .positions_until(WAIT, |p| p["fleet"] == "phoenix")
        .await?;
    assert!(!resumed.is_empty());
    assert!(bridge.program.is_running(), "the bridge was not restarted");
    assert!(
        bridge
            .metric("fleetbeat_bridge_mqtt_connects_total")
            .await?
            >= 2.0
    );
    dispatcher.close().await;
    Ok(())
}
