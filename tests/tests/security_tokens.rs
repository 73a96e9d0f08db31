//! Tokens and secrets at the bridge (issue 14, tokens; secrets out of logs and argv): tokens
//! are stored as their SHA-256 (`bridge add-token` prints the token once); the demo tokens
//! work only in demo mode, which stays on loopback unless told otherwise; `/metrics` wants its
//! token; the MQTT password comes from a file and never shows in the log, nor does the
//! password of an MQTT URL in a start-up error.
//!
//! Real parts: the `bridge` binary (its embedded broker authenticating it), `bridge
//! add-token`, `broker add-device`, a `socket.io-client` under node, HTTP with reqwest.

use anyhow::Context as _;
use tests::provision::provision_in;
use tests::sio::SioClient;
use tests::stack::{bridge_add_token, spawn_bridge, start_bridge, write_bridge_config};
use tests::{WAIT, bin, temp_dir};
use tokio::process::Command;

/// `GET {base}/metrics` with an optional bearer token: the status code.
async fn metrics_status(base: &str, token: Option<&str>) -> anyhow::Result<u16> {
    let client = reqwest::Client::builder().timeout(WAIT).build()?;
    let mut request = client.get(format!("{base}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Ok(request.send().await?.status().as_u16())
}

/// Runs `bridge ARGS` to its end (it must fail to start): its exit success and its stderr.
async fn bridge_fails(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let output = tokio::time::timeout(
        WAIT,
        Command::new(bin::path("bridge")?)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the bridge did not exit")??;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_tokens_and_no_demo_tokens_with_credentials() -> anyhow::Result<()> {
    let creds = provision_in("north", &["north-0001"]).await?;
    let file = creds.broker_file.to_str().context("utf-8 path")?.to_owned();
    let config = write_bridge_config("")?;
    let token =
        bridge_add_token(config.path(), &["--role", "dispatcher", "--fleet", "north"]).await?;
    let scraper = bridge_add_token(config.path(), &["--role", "metrics"]).await?;
    let text = std::fs::read_to_string(config.path())?;
    assert!(text.contains("token_sha256"), "{text}");
    for secret in [&token, &scraper] {
        assert!(!text.contains(secret.as_str()), "a token in plain:\n{text}");
    }
    // The bridge's MQTT password from a file, not the command line.
    let dir = temp_dir()?;
    let password_file = dir.path().join("mqtt-password");
    std::fs::write(&password_file, format!("{}\n", creds.bridge_password))?;
    let config_arg = config.path().to_str().context("utf-8 path")?;
    let password_arg = password_file.to_str().context("utf-8 path")?;
    let bridge = start_bridge(&[
        "--credentials",
        &file,
        "--config",
        config_arg,
        "--mqtt-password-file",
        password_arg,
    ])
    .await?;

    // The new token works; the demo tokens do not (credentials are configured).
    let mut dispatcher = SioClient::connect_with_token(&bridge.url(), "/dispatch", &token).await?;
    dispatcher.join("fleet:north").await?;
    let demo_auth = serde_json::json!({ "token": "dispatch-demo" });
    let refused = SioClient::refused(&bridge.url(), "/dispatch", Some(demo_auth)).await?;
    assert!(refused.contains("unknown token"), "{refused}");
    let (code, _) = bridge.get_json("/api/vehicles", Some(&token)).await?;
    assert_eq!(code, 200);
    let (code, _) = bridge
        .get_json("/api/vehicles", Some("dispatch-demo"))
        .await?;
    assert_eq!(code, 401, "a demo token admitted outside demo mode");
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("token_sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .context("a token_sha256 line")?;
    let (code, _) = bridge.get_json("/api/vehicles", Some(hash)).await?;
    assert_eq!(code, 401, "the stored hash works as a token");

    // /metrics wants the metrics token, from loopback too.
    assert_eq!(metrics_status(&bridge.url(), None).await?, 401);
    assert_eq!(metrics_status(&bridge.url(), Some(&token)).await?, 401);
    assert_eq!(metrics_status(&bridge.url(), Some(&scraper)).await?, 200);

    // No secret in the log.
    let log = bridge.program.log_text();
    for secret in [&token, &scraper, &creds.bridge_password] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret in the log:\n{log}"
        );
    }
    assert!(
        !log.contains("--mqtt-password on the command line"),
        "the file is not the command line"
    );
    dispatcher.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mode_stays_on_loopback_and_metrics_on_loopback_without_a_token() -> anyhow::Result<()>
{
    // Demo mode (no credentials, no tokens) on a public address: refused, with the way out.
    let (ok, stderr) = bridge_fails(&[
        "--listen",
        "0.0.0.0:0",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--store",
        ":memory:",
    ])
    .await?;
    assert!(!ok, "demo mode served on 0.0.0.0");
    assert!(stderr.contains("demo mode"), "{stderr}");
    assert!(stderr.contains("--allow-public-demo"), "{stderr}");

    // Deliberately public: it starts, the demo tokens work.
    let demo = spawn_bridge(&[
        "--listen",
        "0.0.0.0:0",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--allow-public-demo",
    ])
    .await?;
    let base = format!("http://127.0.0.1:{}", demo.http.port());
    let dispatcher = SioClient::dispatcher(&base).await?;
    dispatcher.close().await;
    drop(demo);

    // Not demo mode (a token), no metrics token: /metrics for loopback peers only.
    let config = write_bridge_config("")?;
    let admin = bridge_add_token(config.path(), &["--role", "admin"]).await?;
    let config_arg = config.path().to_str().context("utf-8 path")?;
    let bridge = spawn_bridge(&[
        "--listen",
        "0.0.0.0:0",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--config",
        config_arg,
    ])
    .await?;
    let port = bridge.http.port();
    assert_eq!(
        metrics_status(&format!("http://127.0.0.1:{port}"), None).await?,
        200
    );
    let (code, _) = bridge
        .get_json("/api/vehicles", Some("dispatch-demo"))
        .await?;
    assert_eq!(code, 401, "a demo token admitted with tokens configured");
    let (code, _) = bridge.get_json("/api/vehicles", Some(&admin)).await?;
    assert_eq!(code, 200);
    // From this host's own non-loopback address, when it has one: refused.
    match non_loopback_ip() {
        Some(ip) => {
            let base = format!("http://{}", std::net::SocketAddr::new(ip, port));
            assert_eq!(metrics_status(&base, None).await?, 403);
        }
        None => eprintln!("no non-loopback address here: that part is covered by the unit test"),
    }
    Ok(())
}

/// This host's address on the interface of its default route, if it has one (a UDP
/// `connect` sends nothing).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_url_passwords_never_show() -> anyhow::Result<()> {
    // A URL that does not parse: the start-up error quotes it without its password.
    let (ok, stderr) = bridge_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--mqtt-url",
        "mqtt://bridge:s3cret-pw@127.0.0.1:99999",
        "--store",
        ":memory:",
    ])
    .await?;
    assert!(!ok, "an invalid URL was accepted");
    assert!(stderr.contains("bridge:***@"), "{stderr}");
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password in an error:\n{stderr}"
    );
    let (ok, stderr) = bridge_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--mqtt-url",
        "http://bridge:s3cret-pw@127.0.0.1:1883",
        "--store",
        ":memory:",
    ])
    .await?;
    assert!(!ok, "an http:// URL was accepted");
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password in an error:\n{stderr}"
    );

    // A broker that is not there: the bridge starts, logs its connection errors, and the
    // password (given on the command line, which it warns about) never shows.
    let dead = tests::stack::free_port()?;
    let url = format!("mqtt://bridge:s3cret-pw@{dead}");
    let mut cmd = Command::new(bin::path("bridge")?);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--mqtt-url",
        &url,
        "--store",
        ":memory:",
    ]);
    let mut bridge = tests::process::Program::spawn("bridge", cmd)?;
    bridge.wait_for_line("bridge started", WAIT).await?;
    bridge.wait_for_line("MQTT connection error", WAIT).await?;
    bridge.wait_for_line("visible to every user", WAIT).await?;
    let log = bridge.log_text();
    assert!(
        !log.contains("s3cret-pw"),
        "the password in the log:\n{log}"
    );
    Ok(())
}
