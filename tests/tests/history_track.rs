//! Every heartbeat is stored; the history API returns the track a vehicle drove, in order, as
//! JSON and GeoJSON, and exports it as GPX 1.1 and CSV (downloads with a file name).

use serde_json::{Value, json};
use tests::sio::{DISPATCH_TOKEN, SioClient};
use tests::stack::{BridgeProcess, start_bridge, start_sim};

/// `GET /api/vehicles/hist-0001/track{query}` as a dispatcher: status and body.
async fn get_track(bridge: &BridgeProcess, query: &str) -> anyhow::Result<(u16, Value)> {
    let path = format!("/api/vehicles/hist-0001/track{query}");
    bridge.get_json(&path, Some(DISPATCH_TOKEN)).await
}

/// A track export as the bridge answered it.
struct Export {
    status: u16,
    content_type: String,
    disposition: String,
    body: String,
}

/// `GET /api/vehicles/hist-0001/track{query}` as a dispatcher, as text with its headers.
async fn export(bridge: &BridgeProcess, query: &str) -> anyhow::Result<Export> {
    let response = reqwest::Client::new()
        .get(format!(
            "{}/api/vehicles/hist-0001/track{query}",
            bridge.url()
        ))
        .bearer_auth(DISPATCH_TOKEN)
        .timeout(tests::WAIT)
        .send()
        .await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    Ok(Export {
        status: response.status().as_u16(),
        content_type: header("content-type"),
        disposition: header("content-disposition"),
        body: response.text().await?,
    })
}

/// `time` is `ts_ms` in ISO 8601, UTC, with milliseconds (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
fn assert_iso8601(time: &str, ts_ms: u64) {
    let b = time.as_bytes();
    let shape = b.len() == 24
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
        && b[23] == b'Z';
    assert!(shape, "{time:?}");
    // The clock part is exact (days need a calendar; the date is checked by the bridge's
    // unit test against known dates).
    let day_ms = ts_ms % 86_400_000;
    let expected = format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    );
    assert_eq!(&time[11..], expected, "{time} for {ts_ms}");
}

/// A strict little XML reader: enough to tell that a GPX document is well-formed (one root,
/// every element closed in order, attributes quoted, only the five predefined entities and
/// character references) and to walk its elements.
mod xml {
    /// One element: its name, its path from the root (`gpx/trk/...`), attributes, text.
    pub struct Element {
        pub name: String,
        pub path: String,
        pub attrs: Vec<(String, String)>,
        pub text: String,
    }

    /// A parsed document: the root's name and every element in document order.
    pub struct Document {
        pub root: String,
        pub elements: Vec<Element>,
    }

    fn unescape(text: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('&') {
            out.push_str(&rest[..at]);
            let end = rest[at..].find(';').ok_or("unterminated entity")? + at;
            out.push_str(match &rest[at + 1..end] {
                "amp" => "&",
                "lt" => "<",
                "gt" => ">",
                "quot" => "\"",
                "apos" => "'",
                e if e.starts_with('#') => "?",
                e => return Err(format!("unknown entity &{e};")),
            });
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        if out.contains('<') && !text.contains("&lt;") {
            return Err("a raw < in text".into());
        }
        Ok(out)
    }

    fn is_name(s: &str) -> bool {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    }

    fn attributes(mut s: &str) -> Result<Vec<(String, String)>, String> {
        let mut attrs = Vec::new();
        loop {
            s = s.trim_start();
            if s.is_empty() {
                return Ok(attrs);
            }
            let eq = s
                .find('=')
                .ok_or_else(|| format!("attribute without = in {s:?}"))?;
            let name = s[..eq].trim();
            let quoted = &s[eq + 1..];
            let quote = quoted.chars().next().ok_or("attribute without value")?;
            if quote != '"' && quote != '\'' {
                return Err(format!("unquoted attribute {name}"));
            }
            let end = quoted[1..].find(quote).ok_or("unterminated attribute")? + 1;
            if !is_name(name) || attrs.iter().any(|(n, _)| n == name) {
                return Err(format!("bad or repeated attribute name {name:?}"));
            }
            attrs.push((name.to_owned(), unescape(&quoted[1..end])?));
            s = &quoted[end + 1..];
        }
    }

    /// Parses `doc`, or says what is wrong with it.
    pub fn parse(doc: &str) -> Result<Document, String> {
        let mut rest = doc.trim_start();
        if let Some(prolog) = rest.strip_prefix("<?xml") {
            let end = prolog.find("?>").ok_or("unterminated prolog")?;
            rest = &prolog[end + 2..];
        }
        let mut open: Vec<usize> = Vec::new();
        let mut elements: Vec<Element> = Vec::new();
        let mut root = None;
        loop {
            let text_end = rest.find('<').unwrap_or(rest.len());
            let text = unescape(&rest[..text_end])?;
            match open.last() {
                Some(&i) => elements[i].text.push_str(&text),
                None if !text.trim().is_empty() => return Err("text outside the root".into()),
                None => {}
            }
            rest = &rest[text_end..];
            if rest.is_empty() {
                break;
            }
            let close = rest.find('>').ok_or("unterminated tag")?;
            let tag = &rest[1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let i = open.pop().ok_or("a close tag without an open one")?;
                if elements[i].name != name.trim() {
                    return Err(format!("</{name}> closes <{}>", elements[i].name));
                }
                continue;
            }
            if open.is_empty() && root.is_some() {
                return Err("a second root element".into());
            }
            let (tag, empty) = match tag.strip_suffix('/') {
                Some(tag) => (tag, true),
                None => (tag, false),
            };
            let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
            let name = &tag[..name_end];
            if !is_name(name) {
                return Err(format!("bad element name {name:?}"));
            }
            let path = match open.last() {
                Some(&i) => format!("{}/{name}", elements[i].path),
                None => name.to_owned(),
            };
            root.get_or_insert_with(|| name.to_owned());
            elements.push(Element {
                name: name.to_owned(),
                path,
                attrs: attributes(&tag[name_end..])?,
                text: String::new(),
            });
            if !empty {
                open.push(elements.len() - 1);
            }
        }
        if !open.is_empty() {
            return Err("unclosed elements at the end".into());
        }
        Ok(Document {
            root: root.ok_or("no root element")?,
            elements,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_comes_back_in_order_in_every_format() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let _sim = start_sim(bridge.mqtt, 1, "hist", &["--rate", "10"])?;
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    dispatcher.join("vehicle:hist-0001").await?;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.extend(dispatcher.positions_until(tests::WAIT, |_| true).await?);
    }
    let last_ts = seen
        .iter()
        .filter_map(|p| p["ts_ms"].as_u64())
        .max()
        .unwrap_or_default();

    // The history writer gathers a few seconds of heartbeats per commit, but a track read has
    // it commit what it holds first: the first read already ends where the live view is. (The
    // newest position may be emitted a moment before its row reaches the writer: the one
    // before it must be there.)
    let mut times: Vec<u64> = seen.iter().filter_map(|p| p["ts_ms"].as_u64()).collect();
    times.sort_unstable();
    times.dedup();
    let before_last = times.iter().rev().nth(1).copied().unwrap_or_default();
    let to_last = format!("?to={last_ts}");
    let (status, first) = get_track(&bridge, &to_last).await?;
    assert_eq!(status, 200, "{first}");
    let first_end = first["points"]
        .as_array()
        .and_then(|points| points.last())
        .and_then(|p| p["ts_ms"].as_u64())
        .unwrap_or_default();
    assert!(
        first_end >= before_last,
        "the first read ends at {first_end}, the dispatcher saw {before_last} and {last_ts}"
    );

    // The newest one too, a read or two later.
    let deadline = tokio::time::Instant::now() + tests::WAIT;
    let points = loop {
        let (status, track) = get_track(&bridge, &to_last).await?;
        assert_eq!(status, 200, "{track}");
        let points = track["points"].as_array().cloned().unwrap_or_default();
        if points.last().and_then(|p| p["ts_ms"].as_u64()) == Some(last_ts) {
            break points;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "track never caught up: {track}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(points.len() >= 10, "{} points", points.len());
    let ts: Vec<u64> = points.iter().filter_map(|p| p["ts_ms"].as_u64()).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "in time order: {ts:?}");
    let seqs: Vec<u64> = points.iter().filter_map(|p| p["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The very positions the dispatcher saw live are in the history.
    for p in &seen {
        let stored = points
            .iter()
            .find(|q| q["seq"] == p["seq"])
            .expect("stored");
        assert_eq!((&stored["lat"], &stored["lon"]), (&p["lat"], &p["lon"]));
    }

    let (status, geo) = get_track(&bridge, &format!("{to_last}&format=geojson")).await?;
    assert_eq!(status, 200);
    assert_eq!(geo["type"], "Feature");
    assert_eq!(geo["geometry"]["type"], "LineString");
    let coords = geo["geometry"]["coordinates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(coords.len(), points.len());
    assert_eq!(
        coords[0],
        json!([points[0]["lon"], points[0]["lat"]]),
        "GeoJSON is [lon, lat]"
    );

    // GPX: well-formed XML, one trkpt per point, the same positions and times as CSV.
    let file = export(&bridge, &format!("{to_last}&format=gpx")).await?;
    assert_eq!(file.status, 200, "{}", file.body);
    assert_eq!(file.content_type, "application/gpx+xml");
    let first_ts = ts.first().copied().unwrap_or_default();
    assert_eq!(
        file.disposition,
        format!("attachment; filename=\"hist-0001-{first_ts}-{last_ts}.gpx\"")
    );
    let gpx = xml::parse(&file.body).map_err(|e| anyhow::anyhow!("GPX is not XML: {e}"))?;
    assert_eq!(gpx.root, "gpx");
    assert!(file.body.contains(r#"version="1.1""#));
    assert!(
        file.body
            .contains(r#"xmlns="http://www.topografix.com/GPX/1/1""#)
    );
    let trkpts: Vec<&xml::Element> = gpx.elements.iter().filter(|e| e.name == "trkpt").collect();
    assert_eq!(trkpts.len(), points.len(), "a trkpt per point");
    assert!(
        trkpts.iter().all(|e| e.path == "gpx/trk/trkseg/trkpt"),
        "one trk, one trkseg"
    );
    let times: Vec<&str> = gpx
        .elements
        .iter()
        .filter(|e| e.path == "gpx/trk/trkseg/trkpt/time")
        .map(|e| e.text.as_str())
        .collect();
    assert_eq!(times.len(), points.len());
    for ((trkpt, point), time) in trkpts.iter().zip(&points).zip(&times) {
        let attr = |name: &str| -> f64 {
            trkpt
                .attrs
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let near = |a: f64, b: &Value| (a - b.as_f64().unwrap_or(f64::NAN)).abs() < 1e-7;
        assert!(near(attr("lat"), &point["lat"]) && near(attr("lon"), &point["lon"]));
        assert_iso8601(time, point["ts_ms"].as_u64().unwrap_or_default());
    }

    // CSV: the header, then a row per point with the same values.
    let file = export(&bridge, &format!("{to_last}&format=csv")).await?;
    assert_eq!(file.status, 200, "{}", file.body);
    assert!(
        file.content_type.starts_with("text/csv"),
        "{}",
        file.content_type
    );
    assert_eq!(
        file.disposition,
        format!("attachment; filename=\"hist-0001-{first_ts}-{last_ts}.csv\"")
    );
    let mut lines = file.body.lines();
    assert_eq!(
        lines.next(),
        Some("ts_ms,time,lat,lon,speed_m_s,heading_deg,battery_pct,seq")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), points.len(), "a row per point");
    for ((row, point), time) in rows.iter().zip(&points).zip(&times) {
        assert_eq!(row.len(), 8, "{row:?}");
        assert_eq!(row[0], point["ts_ms"].to_string());
        assert_eq!(row[1], *time, "the same time as the GPX");
        let num = |i: usize| row[i].parse::<f64>().unwrap_or(f64::NAN);
        assert!((num(2) - point["lat"].as_f64().unwrap_or_default()).abs() < 1e-7);
        assert!((num(3) - point["lon"].as_f64().unwrap_or_default()).abs() < 1e-7);
        assert!((num(4) - point["speed_mps"].as_f64().unwrap_or_default()).abs() < 1e-9);
        assert_eq!(row[5], point["heading_deg"].to_string());
        assert_eq!(row[6], point["battery_pct"].to_string());
        assert_eq!(row[7], point["seq"].to_string());
    }
    // A window names its bounds.
    let file = export(&bridge, &format!("?from=5&to={last_ts}&format=csv")).await?;
    assert_eq!(
        file.disposition,
        format!("attachment; filename=\"hist-0001-5-{last_ts}.csv\"")
    );

    // A window, and bad requests.
    let mid = ts[ts.len() / 2];
    let (_, window) = get_track(&bridge, &format!("?from={mid}&to={last_ts}")).await?;
    let window = window["points"].as_array().cloned().unwrap_or_default();
    assert!(window.iter().all(|p| p["ts_ms"].as_u64() >= Some(mid)));
    assert_eq!(window.len(), ts.iter().filter(|t| **t >= mid).count());
    let (status, bad) = get_track(&bridge, "?format=kml").await?;
    assert_eq!(status, 400);
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or_default()
            .contains("gpx or csv"),
        "{bad}"
    );
    let (status, _) = get_track(&bridge, "?from=5&to=1").await?;
    assert_eq!(status, 400);
    let (status, _) = bridge
        .get_json("/api/vehicles/hist-0001/track", None)
        .await?;
    assert_eq!(status, 401);
    dispatcher.close().await;
    Ok(())
}
