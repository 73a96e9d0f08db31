//! Every `mosquitto_sub` / `mosquitto_pub` recipe of `docs/debugging.md`, run as written
//! (only the host, ports, passwords and file paths replaced) with the real Debian clients
//! against the standalone broker and device-sim, and checked for what the document says it
//! shows. A recipe added to the document without a test here fails
//! `every_recipe_in_the_document_is_exercised`.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use device_sim::route::{GridConfig, Node, StreetGrid};
use device_sim::runner::SimConfig;
use serde_json::Value;
use shared::{Command, CommandKind, FleetId, Heartbeat, OrderId, VehicleId};
use tests::mosquitto::{Finished, Watch, finish};
use tests::stack::{
    BrokerProcess, broker_credentials_command, provision_fleet, start_broker_standalone, start_sim,
};
use tests::{WAIT, mosquitto};

/// The recipes run by `recipes_work_on_the_demo_broker`, as written in the document.
const DEMO_RECIPES: [&str; 9] = [
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'json/fleet/+/demo-0001/#' -v",
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'json/fleet/+/+/status' -v",
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'json/#' -v                # everything",
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'json/fleet/north/#' -v     # one fleet",
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'json/fleet/+/+/event' -v   # delivery events only",
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'fleet/+/demo-0001/hb' -F '%t %x'",
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'json/fleet/demo/demo-0001/+' -v &",
    r"printf '\x01\x07\x00' | mosquitto_pub -h 127.0.0.1 -p 1883 -t fleet/demo/demo-0001/cmd -q 1 -s          # Ping, id 7",
    r"printf '\x01\x08\x01\xf4\x03' | mosquitto_pub -h 127.0.0.1 -p 1883 -t fleet/demo/demo-0001/cmd -q 1 -s  # SetRate 500 ms, id 8",
];

/// The recipes run by `recipes_work_when_the_broker_requires_credentials`.
const CREDENTIAL_RECIPES: [&str; 4] = [
    "broker add-client alice --role observer --credentials /etc/fleetbeat/credentials.toml",
    "broker add-client ops   --role bridge   --credentials /etc/fleetbeat/credentials.toml",
    "mosquitto_sub -h HOST -p 1883 -u alice -P 'PASSWORD' -t 'json/#' -v",
    r"printf '\x01\x07\x00' | mosquitto_pub -h HOST -p 1883 -u ops -P 'PASSWORD' -t fleet/demo/demo-0001/cmd -q 1 -s",
];

/// Shell words of a recipe line: single quotes kept together, a trailing `# comment` and `&`
/// dropped.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '#' if !quoted && !in_word => break,
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if words.last().is_some_and(|w| w == "&") {
        words.pop();
    }
    words
}

/// The recipes in `docs/debugging.md`: the client and `broker` lines of its `sh` blocks.
fn document_recipes() -> anyhow::Result<BTreeSet<Vec<String>>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/debugging.md");
    let text = std::fs::read_to_string(&path)?;
    let mut recipes = BTreeSet::new();
    let mut in_sh = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if in_sh && (line.contains("mosquitto_") || line.starts_with("broker ")) {
            recipes.insert(words(line));
        }
    }
    Ok(recipes)
}

#[test]
fn every_recipe_in_the_document_is_exercised() -> anyhow::Result<()> {
    let documented = document_recipes()?;
    let tested: BTreeSet<Vec<String>> = DEMO_RECIPES
        .iter()
        .chain(&CREDENTIAL_RECIPES)
        .map(|r| words(r))
        .collect();
    assert_eq!(
        documented, tested,
        "docs/debugging.md and this test disagree on the recipes"
    );
    Ok(())
}

/// What replaces the document's placeholders.
struct Target {
    broker: SocketAddr,
    passwords: HashMap<String, String>,
    credentials: Option<String>,
}

impl Target {
    fn new(broker: SocketAddr) -> Target {
        Target {
            broker,
            passwords: HashMap::new(),
            credentials: None,
        }
    }

    /// A client recipe's command line (its `printf` input apart) with this target's host,
    /// port, passwords and credentials file.
    fn args(&self, recipe: &str) -> anyhow::Result<(Vec<String>, Option<Vec<u8>>)> {
        let words = words(recipe);
        let (input, words) = match words.iter().position(|w| w == "|") {
            Some(bar) => {
                anyhow::ensure!(words[0] == "printf" && bar == 2, "{recipe}");
                (Some(printf(&words[1])?), words[bar + 1..].to_vec())
            }
            None => (None, words),
        };
        assert!(
            DEMO_RECIPES
                .iter()
                .chain(&CREDENTIAL_RECIPES)
                .any(|r| *r == recipe),
            "not a listed recipe: {recipe}"
        );
        let mut out = Vec::new();
        let mut user = None;
        for (i, word) in words.iter().enumerate() {
            let flag = i.checked_sub(1).map(|p| words[p].as_str());
            let word = match flag {
                Some("-h") => self.broker.ip().to_string(),
                Some("-p") => self.broker.port().to_string(),
                Some("-u") => {
                    user = Some(word.clone());
                    word.clone()
                }
                Some("-P") => user
                    .as_ref()
                    .and_then(|u| self.passwords.get(u))
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no password for {user:?}"))?,
                Some("--credentials") => self
                    .credentials
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("no credentials file"))?,
                _ => word.clone(),
            };
            out.push(word);
        }
        Ok((out, input))
    }

    /// The client of `recipe`, as a command (under `stdbuf -oL`, see `mosquitto::client`).
    fn command(&self, recipe: &str) -> anyhow::Result<(tokio::process::Command, Option<Vec<u8>>)> {
        let (args, input) = self.args(recipe)?;
        let mut cmd = tokio::process::Command::new("stdbuf");
        cmd.arg("-oL")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        Ok((cmd, input))
    }

    /// Starts a `mosquitto_sub` recipe and waits until it is subscribed.
    async fn watch(&self, recipe: &str) -> anyhow::Result<Watch> {
        Watch::start(self.command(recipe)?.0).await
    }

    /// Runs a `printf ... | mosquitto_pub` recipe to its end.
    async fn run(&self, recipe: &str) -> anyhow::Result<Finished> {
        let (cmd, input) = self.command(recipe)?;
        let done = finish(cmd, input.as_deref()).await?;
        anyhow::ensure!(done.status.success(), "{recipe}: {done:?}");
        Ok(done)
    }
}

/// The bytes `printf FORMAT` prints, for the `\xNN` escapes the recipes use.
fn printf(format: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = format;
    while !rest.is_empty() {
        if let Some(hex) = rest.strip_prefix("\\x") {
            let byte = hex
                .get(..2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| anyhow::anyhow!("bad escape in {format}"))?;
            out.push(byte);
            rest = &hex[2..];
        } else {
            let c = rest.chars().next().unwrap_or_default();
            anyhow::ensure!(c != '\\' && c != '%', "unsupported printf format {format}");
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            rest = &rest[c.len_utf8()..];
        }
    }
    Ok(out)
}

/// Asserts that every line `watch` saw starts with `prefix`, then stops it.
async fn stop_all_under(mut watch: Watch, prefix: &str) {
    assert!(
        watch.seen().iter().all(|l| l.starts_with(prefix)),
        "{:?}",
        watch.seen()
    );
    watch.stop().await;
}

/// A `topic {json}` line of `mosquitto_sub -v`.
fn json_line(line: &str) -> (String, Value) {
    let (topic, payload) = line.split_once(' ').unwrap_or((line, ""));
    (
        topic.to_owned(),
        serde_json::from_str(payload).unwrap_or(Value::Null),
    )
}

fn is_doc(line: &str, topic: &str, check: impl Fn(&Value) -> bool) -> bool {
    let (t, doc) = json_line(line);
    t == topic && check(&doc)
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An order for demo-0001 (seed 1, the first of 2 vehicles of fleet demo) that starts next
/// to where it starts.
fn assign_order() -> anyhow::Result<Vec<u8>> {
    let grid = StreetGrid::new(GridConfig::default())?;
    let config = SimConfig {
        vehicles: 2,
        fleets: vec![FleetId::new("demo").map_err(anyhow::Error::msg)?],
        seed: 1,
        ..SimConfig::default()
    };
    let start = config.devices()?[0].position();
    let near = grid
        .nearest_node(start)
        .ok_or_else(|| anyhow::anyhow!("off the grid"))?;
    let pickup = grid.clamp(Node::new(near.east + 1, near.north));
    let dropoff = grid.clamp(Node::new(near.east - 1, near.north + 1));
    let command = Command {
        id: 21,
        kind: CommandKind::AssignOrder {
            order: OrderId::new("ord-debug").map_err(anyhow::Error::msg)?,
            pickup: grid.position(pickup),
            dropoff: grid.position(dropoff),
        },
    };
    let mut buf = [0u8; shared::MAX_PAYLOAD];
    Ok(shared::encode(&command, &mut buf)
        .map_err(anyhow::Error::msg)?
        .to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_work_on_the_demo_broker() -> anyhow::Result<()> {
    let broker: BrokerProcess = start_broker_standalone(&[]).await?;
    let target = Target::new(broker.mqtt);
    let _demo = start_sim(
        broker.mqtt,
        2,
        "demo",
        &["--rate", "5", "--time-scale", "100"],
    )?;
    let mut north = start_sim(broker.mqtt, 1, "north", &["--rate", "5"])?;

    // Watch one vehicle: its retained status, then its heartbeats (open mode: the tag checks with the public key); nobody else's.
    let mut one = target.watch(DEMO_RECIPES[0]).await?;
    one.next_matching(WAIT, |l| {
        is_doc(l, "json/fleet/demo/demo-0001/status", |d| {
            d["status"] == "online" && d["origin"] == "open mode: public key, not proof"
        })
    })
    .await?;
    for _ in 0..3 {
        let line = one
            .next_matching(WAIT, |l| l.starts_with("json/fleet/demo/demo-0001/hb "))
            .await?;
        let (_, doc) = json_line(&line);
        assert_eq!(doc["origin"], "open mode: public key, not proof", "{line}");
        assert!(doc["lat"].is_f64() && doc["flags"].is_array(), "{line}");
    }
    stop_all_under(one, "json/fleet/demo/demo-0001/").await;

    // Watch status changes: first every vehicle's current status (retained).
    let mut statuses = target.watch(DEMO_RECIPES[1]).await?;
    let mut online = BTreeSet::new();
    while online.len() < 3 {
        let line = statuses.next(WAIT).await?;
        let (topic, doc) = json_line(&line);
        assert_eq!(doc["status"], "online", "{line}");
        online.insert(topic);
    }

    // Everything, one fleet.
    let mut everything = target.watch(DEMO_RECIPES[2]).await?;
    everything
        .next_matching(WAIT, |l| l.starts_with("json/fleet/demo/"))
        .await?;
    everything
        .next_matching(WAIT, |l| l.starts_with("json/fleet/north/"))
        .await?;
    everything.stop().await;
    let mut one_fleet = target.watch(DEMO_RECIPES[3]).await?;
    for _ in 0..5 {
        one_fleet.next(WAIT).await?;
    }
    stop_all_under(one_fleet, "json/fleet/north/").await;

    // Delivery events only: give demo-0001 an order next door (its clock runs 100× faster).
    let mut events = target.watch(DEMO_RECIPES[4]).await?;
    mosquitto::publish(broker.mqtt, "fleet/demo/demo-0001/cmd", &assign_order()?, 1).await?;
    let line = events.next(WAIT).await?;
    let (topic, doc) = json_line(&line);
    assert_eq!(topic, "json/fleet/demo/demo-0001/event", "{line}");
    assert_eq!(doc["kind"], "pickup", "{line}");
    assert_eq!(doc["order"], "ord-debug", "{line}");
    assert_eq!(doc["origin"], "open mode: public key, not proof", "{line}");
    events.stop().await;

    // The raw bytes: version byte 1, a sealed heartbeat.
    let mut raw = target.watch(DEMO_RECIPES[5]).await?;
    let line = raw.next(WAIT).await?;
    let (topic, hex) = line.split_once(' ').unwrap_or((&line, ""));
    assert_eq!(topic, "fleet/demo/demo-0001/hb");
    assert!(hex.starts_with("01"), "{line}");
    let key = shared::open_mode_key(&VehicleId::new("demo-0001").map_err(anyhow::Error::msg)?);
    shared::open::<Heartbeat>(&unhex(hex), topic, &key)
        .map_err(|e| anyhow::anyhow!("{e}: {line}"))?;
    raw.stop().await;

    // Send a command, watch the answer on the mirror.
    let mut answers = target.watch(DEMO_RECIPES[6]).await?;
    target.run(DEMO_RECIPES[7]).await?;
    answers
        .next_matching(WAIT, |l| {
            is_doc(l, "json/fleet/demo/demo-0001/cmd", |d| {
                d["command"] == "ping" && d["id"] == 7
            })
        })
        .await?;
    answers
        .next_matching(WAIT, |l| {
            is_doc(l, "json/fleet/demo/demo-0001/ack", |d| {
                d["id"] == 7
                    && d["result"] == "ok"
                    && d["origin"] == "open mode: public key, not proof"
            })
        })
        .await?;
    target.run(DEMO_RECIPES[8]).await?;
    answers
        .next_matching(WAIT, |l| {
            is_doc(l, "json/fleet/demo/demo-0001/cmd", |d| {
                d["command"] == "set-rate" && d["id"] == 8 && d["interval_ms"] == 500
            })
        })
        .await?;
    answers
        .next_matching(WAIT, |l| {
            is_doc(l, "json/fleet/demo/demo-0001/ack", |d| {
                d["id"] == 8 && d["result"] == "ok"
            })
        })
        .await?;
    answers.stop().await;

    // ... and then each change as it happens: north-0001 says goodbye.
    north.terminate(Duration::from_secs(10)).await?;
    statuses
        .next_matching(WAIT, |l| {
            is_doc(l, "json/fleet/north/north-0001/status", |d| {
                d["status"] == "offline" && d["reason"] == "shutdown"
            })
        })
        .await?;
    statuses.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_work_when_the_broker_requires_credentials() -> anyhow::Result<()> {
    let fleet = provision_fleet(1, "demo").await?;
    let mut target = Target::new("127.0.0.1:1883".parse()?);
    target.credentials = Some(fleet.broker_arg());
    for recipe in &CREDENTIAL_RECIPES[..2] {
        let (args, _) = target.args(recipe)?;
        let args: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
        let (password, _) = broker_credentials_command(&args).await?;
        target.passwords.insert(args[1].to_owned(), password);
    }
    let broker = start_broker_standalone(&["--credentials", &fleet.broker_arg()]).await?;
    target.broker = broker.mqtt;
    let _sim = start_sim(
        broker.mqtt,
        1,
        "demo",
        &["--rate", "5", "--credentials", &fleet.sim_arg()],
    )?;

    let mut watch = target.watch(CREDENTIAL_RECIPES[2]).await?;
    watch
        .next_matching(WAIT, |l| {
            is_doc(l, "json/fleet/demo/demo-0001/hb", |d| {
                d["origin"] == "verified"
            })
        })
        .await?;
    target.run(CREDENTIAL_RECIPES[3]).await?;
    watch
        .next_matching(WAIT, |l| {
            is_doc(l, "json/fleet/demo/demo-0001/ack", |d| {
                d["id"] == 7 && d["result"] == "ok" && d["origin"] == "verified"
            })
        })
        .await?;

    // "A refused login shows as `Connection Refused: bad user name or password`".
    target
        .passwords
        .insert("alice".to_owned(), "not-her-password".to_owned());
    let (cmd, _) = target.command(CREDENTIAL_RECIPES[2])?;
    let refused = finish(cmd, None).await?;
    assert!(!refused.status.success());
    assert!(
        refused
            .stderr
            .contains("Connection Refused: bad user name or password"),
        "{refused:?}"
    );
    assert_eq!(
        broker
            .metric("fleetbeat_broker_auth_refused_total{reason=\"bad_password\"}")
            .await?,
        1.0
    );
    watch.stop().await;
    Ok(())
}
