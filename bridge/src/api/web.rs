//! The pages: the dispatcher page `GET /`, the store page `GET /vendor`, their assets under
//! `/assets/`, and `GET /config.json`.
//!
//! Everything is embedded in the binary: the pages work on a machine without internet and
//! `cargo build` needs no node. The sources live in `bridge/web/src` and are bundled (Leaflet and
//! socket.io-client included) by `bridge/web/build.sh` into `bridge/web/dist`, one JS and one
//! CSS file per page (`app.*`, `vendor.*`), which is committed; a test below fails while `dist/`
//! is older than the sources. `index.html` and `vendor.html` are embedded from `src/` itself,
//! their assets' URLs filled in once at start.
//!
//! Caching: the pages and `/config.json` are revalidated on every load (`no-cache` with an
//! `ETag`); a page links its assets as `/assets/app.js?v={content hash}`, and such versioned URLs
//! are cached for a year (`immutable`). JS and CSS go out gzipped (precompressed at build time)
//! to clients that accept it. Both pages get the same Content-Security-Policy.
//!
//! The base map is a grid drawn by the page itself; an online tile server is an option
//! ([`WebConfig::tile_url`]), off by default.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::debug;

/// What the page is told at `/config.json`: how to draw the base map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// URL template of an online raster tile server (`https://tile.example/{z}/{x}/{y}.png`,
    /// `{s}` allowed), or `None` (the default) for the offline grid. The grid stays under the
    /// tiles, so a tile server that cannot be reached still leaves a usable map.
    pub tile_url: Option<String>,
    /// Attribution shown with the tiles (HTML, as the tile provider asks for it).
    pub tile_attribution: Option<String>,
    /// The deepest zoom level the map allows (and asks the tile server for).
    pub tile_max_zoom: u8,
    /// Where the map starts, `[lat, lon]` in degrees; `None` fits the map to the vehicles once
    /// the first ones arrive.
    pub centre: Option<[f64; 2]>,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            tile_url: None,
            tile_attribution: None,
            tile_max_zoom: 19,
            centre: None,
        }
    }
}

/// Why a [`WebConfig`] is not usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum WebConfigError {
    /// The tile URL is not an `http(s)://` template with `{z}`, `{x}` and `{y}`.
    #[error("tile_url {0:?} must be an http:// or https:// template with {{z}}, {{x}} and {{y}}")]
    TileUrl(String),
    /// The maximum zoom is outside 1 ..= 22.
    #[error("tile_max_zoom {0} is outside 1 ..= 22")]
    MaxZoom(u8),
    /// The start position is not a latitude and longitude.
    #[error("centre [{0}, {1}] is not a [lat, lon] pair in degrees")]
    Centre(String, String),
}

impl WebConfig {
    /// Checks every setting.
    ///
    /// # Errors
    /// [`WebConfigError`] names the first invalid setting.
    pub(crate) fn validate(&self) -> Result<(), WebConfigError> {
        if let Some(url) = &self.tile_url {
            let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
            let has_xyz = ["{z}", "{x}", "{y}"].iter().all(|p| url.contains(p));
            if !scheme_ok || !has_xyz || tile_origin(url).is_none() {
                return Err(WebConfigError::TileUrl(url.clone()));
            }
        }
        if !(1..=22).contains(&self.tile_max_zoom) {
            return Err(WebConfigError::MaxZoom(self.tile_max_zoom));
        }
        if let Some([lat, lon]) = self.centre
            && (!(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon))
        {
            return Err(WebConfigError::Centre(lat.to_string(), lon.to_string()));
        }
        Ok(())
    }
}

/// A built file of the page.
struct Asset {
    /// Its name under `/assets/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// The same, gzipped at build time (for text that compresses well).
    gzip: Option<&'static [u8]>,
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

const ASSETS: [Asset; 5] = [
    Asset {
        name: "app.js",
        content_type: JS,
        body: include_bytes!("../../web/dist/app.js"),
        gzip: Some(include_bytes!("../../web/dist/app.js.gz")),
    },
    Asset {
        name: "app.css",
        content_type: CSS,
        body: include_bytes!("../../web/dist/app.css"),
        gzip: Some(include_bytes!("../../web/dist/app.css.gz")),
    },
    Asset {
        name: "vendor.js",
        content_type: JS,
        body: include_bytes!("../../web/dist/vendor.js"),
        gzip: Some(include_bytes!("../../web/dist/vendor.js.gz")),
    },
    Asset {
        name: "vendor.css",
        content_type: CSS,
        body: include_bytes!("../../web/dist/vendor.css"),
        gzip: Some(include_bytes!("../../web/dist/vendor.css.gz")),
    },
    Asset {
        name: "LICENSES.txt",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../../web/dist/LICENSES.txt"),
        gzip: None,
    },
];

/// The dispatcher page as `bridge/web/src/index.html` has it: `__APP_JS__` and `__APP_CSS__`
/// stand where the assets' URLs go.
const INDEX_TEMPLATE: &str = include_str!("../../web/src/index.html");

/// The store page as `bridge/web/src/vendor.html` has it: `__VENDOR_JS__` and `__VENDOR_CSS__`
/// stand where the assets' URLs go.
const VENDOR_TEMPLATE: &str = include_str!("../../web/src/vendor.html");

/// `template` with `{PREFIX}_JS__`/`{PREFIX}_CSS__` replaced by the versioned URLs
/// (`/assets/app.js?v={content hash}`) of the assets `{name}.js` and `{name}.css`.
fn render_page(template: &str, prefix: &str, name: &str) -> Bytes {
    let url = |file: String| {
        ASSETS.iter().find(|a| a.name == file).map_or_else(
            || format!("/assets/{file}"),
            |a| format!("/assets/{}?v={:016x}", a.name, fnv1a64(a.body)),
        )
    };
    Bytes::from(
        template
            .replace(&format!("{prefix}_JS__"), &url(format!("{name}.js")))
            .replace(&format!("{prefix}_CSS__"), &url(format!("{name}.css"))),
    )
}

/// The dispatcher page, linking each asset by a URL with its content hash.
static INDEX_HTML: LazyLock<Bytes> = LazyLock::new(|| render_page(INDEX_TEMPLATE, "__APP", "app"));

/// The store page, linking each asset by a URL with its content hash.
static VENDOR_HTML: LazyLock<Bytes> =
    LazyLock::new(|| render_page(VENDOR_TEMPLATE, "__VENDOR", "vendor"));

/// Strong ETags of the pages and of each asset (plain, gzipped), computed once.
struct Etags {
    index: HeaderValue,
    vendor: HeaderValue,
    assets: Vec<(HeaderValue, HeaderValue)>,
}

static ETAGS: LazyLock<Etags> = LazyLock::new(|| Etags {
    index: etag(&INDEX_HTML, ""),
    vendor: etag(&VENDOR_HTML, ""),
    assets: ASSETS
        .iter()
        .map(|a| (etag(a.body, ""), etag(a.gzip.unwrap_or_default(), "-gz")))
        .collect(),
});

fn etag(body: &[u8], suffix: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{:016x}{suffix}\"", fnv1a64(body)))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// FNV-1a, 64 bit: cheap content fingerprints for ETags (and the build check in the tests).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    fnv1a64_feed(&mut h, bytes);
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a64_feed(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Cached answers that depend on the configuration.
struct WebState {
    config_json: Bytes,
    config_etag: HeaderValue,
    csp: HeaderValue,
}

/// The pages' routes: `/`, `/vendor`, `/assets/{file}` and `/config.json`. Merge them into the
/// bridge's router; they need no state of their own from it.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>(config: WebConfig) -> Router<S> {
    let config_json = serde_json::to_vec(&config).unwrap_or_else(|_| b"{}".to_vec());
    let state = WebState {
        config_etag: etag(&config_json, ""),
        config_json: Bytes::from(config_json),
        csp: HeaderValue::from_str(&content_security_policy(&config)).unwrap_or_else(|_| {
            HeaderValue::from_static(
                "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:",
            )
        }),
    };
    Router::new()
        .route("/", get(index))
        .route("/vendor", get(vendor))
        .route("/assets/{file}", get(asset))
        .route("/config.json", get(page_config))
        .with_state(Arc::new(state))
}

/// The page may load nothing from anywhere but the bridge, except tiles from the configured
/// tile server.
fn content_security_policy(config: &WebConfig) -> String {
    let tiles = config
        .tile_url
        .as_deref()
        .and_then(tile_origin)
        .map(|origin| format!(" {origin}"))
        .unwrap_or_default();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:{tiles}; \
         connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'"
    )
}

/// The CSP source for a tile URL template: `https://{s}.tile.example/{z}/{x}/{y}.png` gives
/// `https://*.tile.example`. `None` if the host cannot be expressed.
fn tile_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next()?;
    let host = match host.strip_prefix("{s}.") {
        Some(domain) => format!("*.{domain}"),
        None => host.to_owned(),
    };
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '*' | '[' | ']'));
    valid.then(|| format!("{scheme}://{host}"))
}

/// Whether `If-None-Match` names `tag`.
fn not_modified(headers: &HeaderMap, tag: &HeaderValue) -> bool {
    let Some(tag) = tag.to_str().ok() else {
        return false;
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().trim_start_matches("W/"))
        .any(|v| v == tag || v == "*")
}

/// Whether `Accept-Encoding` accepts gzip (and does not refuse it with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let q = parts
                .find_map(|p| p.strip_prefix("q="))
                .and_then(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            (name.eq_ignore_ascii_case("gzip") || name == "*") && q > 0.0
        })
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    cache: &'static str,
    tag: &HeaderValue,
    body: Body,
) -> Response {
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::ETAG, tag.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn not_modified_response(tag: &HeaderValue, cache: &'static str) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    response.headers_mut().insert(header::ETAG, tag.clone());
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

/// `GET /`: the dispatcher page.
async fn index(State(state): State<Arc<WebState>>, headers: HeaderMap) -> Response {
    page(&state, &headers, &INDEX_HTML, &ETAGS.index)
}

/// `GET /vendor`: the store page.
async fn vendor(State(state): State<Arc<WebState>>, headers: HeaderMap) -> Response {
    page(&state, &headers, &VENDOR_HTML, &ETAGS.vendor)
}

/// A page: revalidated on every load, with the Content-Security-Policy.
fn page(state: &WebState, headers: &HeaderMap, html: &Bytes, tag: &HeaderValue) -> Response {
    const CACHE: &str = "no-cache";
    let mut response = if not_modified(headers, tag) {
        not_modified_response(tag, CACHE)
    } else {
        response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            CACHE,
            tag,
            Body::from(html.clone()),
        )
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, state.csp.clone());
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `GET /assets/{file}`: a built asset, gzipped when the client accepts it.
async fn asset(
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == file) else {
        debug!(file = %file.chars().take(64).collect::<String>(), "no such asset");
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let asset = &ASSETS[index];
    let (plain_tag, gzip_tag) = &ETAGS.assets[index];
    // index.html links `?v={content hash}`: such a URL never changes its content.
    let versioned = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("v=")));
    let cache = if versioned {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let gzip = asset.gzip.filter(|_| accepts_gzip(&headers));
    let tag = if gzip.is_some() { gzip_tag } else { plain_tag };
    let mut response = if not_modified(&headers, tag) {
        not_modified_response(tag, cache)
    } else {
        response(
            StatusCode::OK,
            asset.content_type,
            cache,
            tag,
            Body::from(gzip.unwrap_or(asset.body)),
        )
    };
    let h = response.headers_mut();
    if gzip.is_some() {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if asset.gzip.is_some() {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    response
}

/// `GET /config.json`: the [`WebConfig`] for the page.
async fn page_config(State(state): State<Arc<WebState>>, headers: HeaderMap) -> Response {
    const CACHE: &str = "no-cache";
    if not_modified(&headers, &state.config_etag) {
        return not_modified_response(&state.config_etag, CACHE);
    }
    response(
        StatusCode::OK,
        "application/json",
        CACHE,
        &state.config_etag,
        Body::from(state.config_json.clone()),
    )
}

#[cfg(test)]
mod tests {
    use std::path::{Path as FsPath, PathBuf};

    use serde_json::Value;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// The files whose content decides `dist/`: keep in sync with `SOURCE_ROOTS` in
    /// `bridge/web/build.mjs`.
    const SOURCE_ROOTS: [&str; 5] = [
        "build.sh",
        "build.mjs",
        "package.json",
        "package-lock.json",
        "src",
    ];

    fn web_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web")
    }

    fn walk(root: &FsPath, rel: &str, out: &mut Vec<String>) {
        let path = root.join(rel);
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).expect("readable source directory");
            for entry in entries {
                let name = entry.expect("directory entry").file_name();
                let name = name.to_str().expect("UTF-8 file name");
                walk(root, &format!("{rel}/{name}"), out);
            }
        } else {
            out.push(rel.to_owned());
        }
    }

    /// The same hash as `sourceHash()` in `bridge/web/build.mjs`.
    fn source_hash() -> String {
        let root = web_dir();
        let mut files = Vec::new();
        for r in SOURCE_ROOTS {
            walk(&root, r, &mut files);
        }
        files.sort();
        let mut h = FNV_OFFSET;
        for file in &files {
            let content = std::fs::read(root.join(file)).expect("readable source file");
            fnv1a64_feed(&mut h, file.as_bytes());
            fnv1a64_feed(&mut h, &[0]);
            fnv1a64_feed(&mut h, &(content.len() as u64).to_le_bytes());
            fnv1a64_feed(&mut h, &content);
        }
        format!("fnv1a64:{h:016x}")
    }

    fn manifest() -> Value {
        let text = std::fs::read_to_string(web_dir().join("dist/manifest.json"))
            .expect("bridge/web/dist/manifest.json exists: run bridge/web/build.sh");
        serde_json::from_str(&text).expect("manifest is JSON")
    }

    #[test]
    fn dist_is_built_from_the_current_sources() {
        let manifest = manifest();
        assert_eq!(
            manifest["source_hash"].as_str(),
            Some(source_hash().as_str()),
            "bridge/web/dist is stale: the page's sources changed since it was built. \
             Run bridge/web/build.sh and commit bridge/web/dist."
        );
        // Nobody edited the built files by hand either.
        let files = manifest["files"].as_object().expect("files map");
        for (name, meta) in files {
            let bytes = std::fs::read(web_dir().join("dist").join(name)).expect("built file");
            assert_eq!(
                meta["fnv1a64"].as_str(),
                Some(format!("{:016x}", fnv1a64(&bytes)).as_str()),
                "bridge/web/dist/{name} differs from what build.sh wrote: rebuild it"
            );
        }
        for asset in &ASSETS {
            assert!(files.contains_key(asset.name), "{} not built", asset.name);
        }
    }

    #[test]
    fn pages_link_only_embedded_assets() {
        for (page, html, name) in [
            ("index.html", &*INDEX_HTML, "app"),
            ("vendor.html", &*VENDOR_HTML, "vendor"),
        ] {
            let html = std::str::from_utf8(html).expect("UTF-8");
            for asset in [format!("{name}.js"), format!("{name}.css")] {
                let embedded = ASSETS.iter().find(|a| a.name == asset).expect("embedded");
                let url = format!("/assets/{asset}?v={:016x}", fnv1a64(embedded.body));
                assert!(html.contains(&url), "{page} links {asset} as {url}");
            }
            assert!(
                !html.contains("http://") && !html.contains("https://"),
                "{page} links outside the bridge"
            );
            assert!(!html.contains("__APP_"), "placeholders left in {page}");
            assert!(!html.contains("__VENDOR_"), "placeholders left in {page}");
            // No inline script: the CSP (script-src 'self') would block it.
            assert_eq!(html.matches("<script").count(), 1, "{page}");
        }
        assert!(!String::from_utf8_lossy(&INDEX_HTML).contains("vendor.js"));
    }

    #[test]
    fn tile_origins_for_the_csp() {
        assert_eq!(
            tile_origin("https://{s}.tile.openstreetmap.org/{z}/{x}/{y}.png").as_deref(),
            Some("https://*.tile.openstreetmap.org")
        );
        assert_eq!(
            tile_origin("http://127.0.0.1:8081/tiles/{z}/{x}/{y}.png").as_deref(),
            Some("http://127.0.0.1:8081")
        );
        assert_eq!(tile_origin("https://a;b/{z}/{x}/{y}"), None);
        assert_eq!(tile_origin("no scheme"), None);
    }

    #[test]
    fn validates_the_config() {
        assert_eq!(WebConfig::default().validate(), Ok(()));
        let tiles = |url: &str| WebConfig {
            tile_url: Some(url.to_owned()),
            ..WebConfig::default()
        };
        assert_eq!(
            tiles("https://{s}.tile.example/{z}/{x}/{y}.png").validate(),
            Ok(())
        );
        assert!(tiles("ftp://x/{z}/{x}/{y}").validate().is_err());
        assert!(tiles("https://x/{z}/{x}.png").validate().is_err());
        let far = WebConfig {
            centre: Some([95.0, 0.0]),
            ..WebConfig::default()
        };
        assert!(far.validate().is_err());
        let deep = WebConfig {
            tile_max_zoom: 30,
            ..WebConfig::default()
        };
        assert_eq!(deep.validate(), Err(WebConfigError::MaxZoom(30)));
    }

    #[test]
    fn gzip_negotiation() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            accepts_gzip(&h)
        };
        assert!(with("gzip, deflate, br"));
        assert!(with("br;q=1.0, gzip;q=0.8"));
        assert!(with("*"));
        assert!(!with("gzip;q=0"));
        assert!(!with("br"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    /// A response read off the wire: status, lower-case headers, body.
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    async fn serve(config: WebConfig) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, routes::<()>(config)).await });
        addr
    }

    /// One HTTP/1.1 request over a fresh connection, as a browser would send it.
    async fn get(addr: std::net::SocketAddr, path: &str, extra: &[(&str, &str)]) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in extra {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_to_end(&mut raw),
        )
        .await
        .expect("response within 5 s")
        .expect("read");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of headers");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    #[tokio::test]
    async fn serves_the_page_with_its_headers() {
        let addr = serve(WebConfig::default()).await;

        let page = get(addr, "/", &[]).await;
        assert_eq!(page.status, 200);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("cache-control"), Some("no-cache"));
        assert_eq!(page.body, *INDEX_HTML);
        let csp = page.header("content-security-policy").expect("CSP");
        assert!(csp.contains("default-src 'self'") && csp.contains("img-src 'self' data:;"));
        let tag = page.header("etag").expect("ETag").to_owned();
        let again = get(addr, "/", &[("If-None-Match", &tag)]).await;
        assert_eq!((again.status, again.body.len()), (304, 0));

        // The versioned URL index.html uses: gzipped, cached for good.
        let html = String::from_utf8_lossy(&INDEX_HTML);
        let js_url = html
            .split('"')
            .find(|s| s.starts_with("/assets/app.js?v="))
            .expect("script URL");
        let js = get(addr, js_url, &[("Accept-Encoding", "gzip, deflate, br")]).await;
        assert_eq!(js.status, 200);
        assert_eq!(
            js.header("content-type"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(js.header("content-encoding"), Some("gzip"));
        assert_eq!(js.header("vary"), Some("accept-encoding"));
        assert_eq!(
            js.header("cache-control"),
            Some("public, max-age=31536000, immutable")
        );
        assert_eq!(js.body, ASSETS[0].gzip.expect("gzipped"));
        // Without gzip, and without a version: the plain file, revalidated.
        let plain = get(addr, "/assets/app.js", &[]).await;
        assert_eq!(plain.header("content-encoding"), None);
        assert_eq!(plain.header("cache-control"), Some("no-cache"));
        assert_eq!(plain.body, ASSETS[0].body);
        assert_ne!(plain.header("etag"), js.header("etag"));

        let css = get(addr, "/assets/app.css?v=1", &[]).await;
        assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
        let licences = get(addr, "/assets/LICENSES.txt", &[]).await;
        assert_eq!(licences.status, 200);
        let text = String::from_utf8_lossy(&licences.body);
        assert!(text.contains("leaflet") && text.contains("socket.io-client"));

        assert_eq!(get(addr, "/assets/nope.js", &[]).await.status, 404);
        assert_eq!(get(addr, "/assets/..%2Fapp.js", &[]).await.status, 404);
    }

    #[tokio::test]
    async fn serves_the_store_page_like_the_dispatcher_page() {
        let online = WebConfig {
            tile_url: Some("https://{s}.tile.example/{z}/{x}/{y}.png".to_owned()),
            ..WebConfig::default()
        };
        let addr = serve(online).await;
        let page = get(addr, "/vendor", &[]).await;
        assert_eq!(page.status, 200);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("cache-control"), Some("no-cache"));
        assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
        assert_eq!(page.body, *VENDOR_HTML);
        let html = String::from_utf8_lossy(&page.body);
        assert!(html.contains("id=\"login\"") && html.contains("id=\"place\""));
        // The same policy as `/`, tile host included.
        let csp = page.header("content-security-policy").expect("CSP");
        let index = get(addr, "/", &[]).await;
        assert_eq!(Some(csp), index.header("content-security-policy"));
        assert!(csp.contains("script-src 'self';") && csp.contains("https://*.tile.example"));
        // Revalidation with its own ETag.
        let tag = page.header("etag").expect("ETag").to_owned();
        assert_ne!(Some(tag.as_str()), index.header("etag"));
        let again = get(addr, "/vendor", &[("If-None-Match", &tag)]).await;
        assert_eq!((again.status, again.body.len()), (304, 0));
        assert!(again.header("content-security-policy").is_some());

        // Every asset it links is served, versioned (immutable) and gzipped.
        for (prefix, kind) in [("/assets/vendor.js?v=", JS), ("/assets/vendor.css?v=", CSS)] {
            let url = html
                .split('"')
                .find(|s| s.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} linked"));
            let asset = get(addr, url, &[("Accept-Encoding", "gzip")]).await;
            assert_eq!(asset.status, 200, "{url}");
            assert_eq!(asset.header("content-type"), Some(kind));
            assert_eq!(asset.header("content-encoding"), Some("gzip"));
            assert_eq!(
                asset.header("cache-control"),
                Some("public, max-age=31536000, immutable")
            );
        }
        // The bundle is the store's: it speaks to `/vendor` and sets its own hooks.
        let js = get(addr, "/assets/vendor.js", &[]).await;
        let js = String::from_utf8_lossy(&js.body);
        assert!(js.contains("__fleetbeatVendor") && js.contains("/vendor"));
        assert_eq!(get(addr, "/vendor/", &[]).await.status, 404);
    }

    #[tokio::test]
    async fn config_json_tells_the_page_about_tiles() {
        let addr = serve(WebConfig::default()).await;
        let reply = get(addr, "/config.json", &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let config: Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(config["tile_url"], Value::Null, "offline by default");
        assert_eq!(config["tile_max_zoom"], 19);

        let online = WebConfig {
            tile_url: Some("https://{s}.tile.example/{z}/{x}/{y}.png".to_owned()),
            tile_attribution: Some("© Example".to_owned()),
            centre: Some([52.52, 13.405]),
            ..WebConfig::default()
        };
        let addr = serve(online).await;
        let reply = get(addr, "/config.json", &[]).await;
        let config: Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(
            config["tile_url"],
            "https://{s}.tile.example/{z}/{x}/{y}.png"
        );
        assert_eq!(config["centre"], serde_json::json!([52.52, 13.405]));
        let page = get(addr, "/", &[]).await;
        let csp = page.header("content-security-policy").expect("CSP");
        assert!(
            csp.contains("img-src 'self' data: https://*.tile.example;"),
            "{csp}"
        );
    }
}
