//! The client example in docs/socketio.md runs, as written, against the real bridge.

use std::process::Stdio;

use tests::WAIT;
use tests::stack::{start_bridge, start_sim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_example_works() -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(tests::workspace().join("docs/socketio.md"))?;
    let example = doc
        .split("## Example")
        .nth(1)
        .and_then(|s| s.split("```js").nth(1))
        .and_then(|s| s.split("```").next())
        .ok_or_else(|| anyhow::anyhow!("no ```js block under ## Example"))?;
    let lines = example.trim().lines().count();
    assert!(lines <= 16, "the example is {lines} lines");

    let bridge = start_bridge(&[]).await?;
    let _sim = start_sim(bridge.mqtt, 2, "demo", &["--rate", "5"])?;
    // The example pings demo-0001: wait until the bridge knows both vehicles.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, list) = bridge
            .get_json("/api/vehicles", Some("dispatch-demo"))
            .await?;
        if list.as_array().is_some_and(|l| l.len() == 2) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "vehicles never appeared: {list}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let node_dir = tests::node::node_dir()?;
    let script = node_dir.join(format!(".doc-example-{}.mjs", std::process::id()));
    std::fs::write(
        &script,
        example.replace("http://127.0.0.1:8080", &bridge.url()),
    )?;
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .current_dir(&node_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, run).await;
    let _ = std::fs::remove_file(&script);
    let output = output??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("snapshot of 2 vehicles"), "{stdout}");
    assert!(
        stdout.contains(r#"ping: {"command_id":"#) && stdout.contains(r#""result":"ok""#),
        "{stdout}"
    );
    assert!(!stdout.contains("refused"), "{stdout}");
    Ok(())
}
