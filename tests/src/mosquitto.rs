//! The real Debian `mosquitto_sub` and `mosquitto_pub` clients.

use std::net::SocketAddr;
use std::process::Stdio;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::WAIT;

/// Runs `mosquitto_sub -v` on `filter` until it has received `count` messages and returns
/// the lines it printed (`topic payload`: for text payloads).
///
/// # Errors
/// If it fails or does not receive `count` messages within the bound.
pub async fn sub(broker: SocketAddr, filter: &str, count: u32) -> anyhow::Result<Vec<String>> {
    sub_formatted(broker, filter, count, "%t %p").await
}

/// Runs `mosquitto_sub` on `filter` until it has received `count` messages and returns their
/// topics, one per message.
///
/// # Errors
/// If it fails or does not receive `count` messages within the bound.
pub async fn sub_topics(
    broker: SocketAddr,
    filter: &str,
    count: u32,
) -> anyhow::Result<Vec<String>> {
    sub_formatted(broker, filter, count, "%t").await
}

async fn sub_formatted(
    broker: SocketAddr,
    filter: &str,
    count: u32,
    format: &str,
) -> anyhow::Result<Vec<String>> {
    let output = Command::new("mosquitto_sub")
        .args([
            "-h",
            &broker.ip().to_string(),
            "-p",
            &broker.port().to_string(),
        ])
        .args(["-t", filter, "-F", format, "-C", &count.to_string()])
        .args(["-W", &WAIT.as_secs().to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running mosquitto_sub (apt-get install mosquitto-clients)")?;
    if !output.status.success() {
        bail!(
            "mosquitto_sub failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Publishes `payload` on `topic` with `mosquitto_pub` at `qos`.
///
/// # Errors
/// If `mosquitto_pub` fails.
pub async fn publish(
    broker: SocketAddr,
    topic: &str,
    payload: &[u8],
    qos: u8,
) -> anyhow::Result<()> {
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            &broker.ip().to_string(),
            "-p",
            &broker.port().to_string(),
        ])
        .args(["-t", topic, "-q", &qos.to_string(), "-s"])
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running mosquitto_pub (apt-get install mosquitto-clients)")?;
    let mut stdin = child.stdin.take().context("mosquitto_pub stdin")?;
    stdin.write_all(payload).await?;
    drop(stdin);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .context("mosquitto_pub timed out")??;
    if !status.success() {
        bail!("mosquitto_pub failed: {status}");
    }
    Ok(())
}

/// Runs `mosquitto_sub` on `filter` until `count` messages arrived and returns their raw
/// payloads (read with `-F %x`, so binary postcard payloads survive).
///
/// # Errors
/// If it fails or does not receive `count` messages within the bound.
pub async fn sub_payloads(
    broker: SocketAddr,
    filter: &str,
    count: u32,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let output = Command::new("mosquitto_sub")
        .args([
            "-h",
            &broker.ip().to_string(),
            "-p",
            &broker.port().to_string(),
        ])
        .args(["-t", filter, "-F", "%x", "-C", &count.to_string()])
        .args(["-W", &WAIT.as_secs().to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running mosquitto_sub")?;
    if !output.status.success() {
        bail!(
            "mosquitto_sub failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|hex| {
            (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|b| u8::from_str_radix(b, 16).ok())
                        .with_context(|| format!("bad hex from mosquitto_sub: {hex}"))
                })
                .collect()
        })
        .collect()
}
