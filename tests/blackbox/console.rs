//! The web console: its JSON API against the real binary (pages, users, items, live
//! figures, the model, rollback and its admin key, refusals of bad input), and its
//! pages in a real headless Chromium driven through chromedriver (WebDriver), which must
//! show a user's recommendations change as their events arrive. Screenshots of every
//! page land in `<target dir>/console-screenshots/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reflex_server::proto;
use reflex_server::proto::EventKind::{Purchase, View};
use reflex_server::proto::event_service_client::EventServiceClient;
use reflex_server::proto::model_service_client::ModelServiceClient;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::support::*;

const ADMIN_KEY: &str = "console-admin-key-0123456789";
const RECOMMEND_KEY: &str = "console-recommend-key-0123456789";

/// One HTTP/1.1 exchange: the status, the lower-cased headers and the body, read by its
/// `content-length` (chromedriver keeps the connection open), de-chunked when chunked,
/// else to the end.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    if method != "GET" {
        request.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    // Read until the answer is complete: by its length, its last chunk, or the close.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer within 60 s"))
            .unwrap();
        raw.extend_from_slice(&buf[..n]);
        if n == 0 || complete(&raw) {
            break;
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    (
        status,
        headers,
        String::from_utf8(body).expect("a UTF-8 body"),
    )
}

/// Whether `raw` holds a whole answer (known only with a length or chunked encoding).
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= length;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&raw[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .expect("a chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

/// A JSON API answer: status and parsed body (every answer is JSON, refusals too).
async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, headers, body) = http(addr, "GET", path, &[], None).await;
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/json")),
        "{path} answered {status} without JSON: {headers:?} {body}"
    );
    (status, serde_json::from_str(&body).expect("a JSON body"))
}

async fn post_rollback(addr: SocketAddr, version: u64, key: Option<&str>) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = key {
        headers.push(("x-api-key", key));
    }
    let body = json!({ "version": version }).to_string();
    let (status, _, body) =
        http(addr, "POST", "/console/api/rollback", &headers, Some(&body)).await;
    (status, serde_json::from_str(&body).expect("a JSON body"))
}

fn keyed<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("x-api-key", key.parse().unwrap());
    }
    request
}

/// Ingests `events` in one unary call, all accepted.
async fn ingest(channel: &Channel, events: Vec<proto::Event>, key: Option<&str>) {
    let n = events.len() as u32;
    let ack = EventServiceClient::new(channel.clone())
        .ingest(keyed(
            proto::IngestRequest {
                sequence: 1,
                events,
            },
            key,
        ))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(ack.accepted, n, "{ack:?}");
}

/// Shoppers who view shoes in turn and books in turn, so the model learns two clusters.
fn shoppers(prefix: &str) -> Vec<proto::Event> {
    let mut events = Vec::new();
    for u in 0..12 {
        let category = if u % 2 == 0 { "shoes" } else { "books" };
        for n in 0..6 {
            events.push(event(
                &format!("{prefix}-{u}-{n}"),
                &format!("shopper-{u}"),
                &format!("{category}-{}", (u + n) % 8),
                View,
            ));
        }
    }
    events
}

/// Now less `secs` seconds, so events of a test have distinct, ordered times.
fn seconds_ago(secs: i64) -> prost_types::Timestamp {
    let mut ts = now();
    ts.seconds -= secs;
    ts
}

fn ids_of(items: &Value) -> Vec<String> {
    items
        .as_array()
        .expect("an array of items")
        .iter()
        .map(|i| i["item_id"].as_str().expect("an item id").to_owned())
        .collect()
}

#[tokio::test]
async fn the_console_api_shows_users_items_live_figures_and_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(dir.path(), &[("REFLEX_CONSOLE__ENABLED", "true")]);
    let http_addr = server.metrics_addr.expect("the HTTP listener");
    let channel = server.channel().await;

    // The page and its assets come from the binary, with a policy that forbids any other
    // origin.
    let (status, headers, page) = http(http_addr, "GET", "/console/", &[], None).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("console.js") && page.contains("console.css"),
        "{page}"
    );
    let csp = headers
        .iter()
        .find(|(k, _)| k == "content-security-policy")
        .map(|(_, v)| v.as_str());
    assert!(
        csp.is_some_and(|v| v.contains("default-src 'self'")),
        "{headers:?}"
    );
    assert!(
        !page.contains("http"),
        "the page loads nothing from elsewhere"
    );
    for asset in ["/console/console.js", "/console/console.css"] {
        let (status, _, body) = http(http_addr, "GET", asset, &[], None).await;
        assert_eq!(status, 200, "{asset}");
        assert!(
            !body.contains("https://"),
            "{asset} loads nothing from elsewhere"
        );
    }
    let (status, _, _) = http(http_addr, "GET", "/console", &[], None).await;
    assert_eq!(status, 308, "/console redirects to /console/");

    upsert_catalog(&channel, &["shoes", "books"], 8).await;
    ingest(&channel, shoppers("warm"), None).await;
    ingest(
        &channel,
        vec![
            event_at("a1", "alice", "shoes-1", View, seconds_ago(2)),
            event_at("a2", "alice", "shoes-2", Purchase, seconds_ago(1)),
        ],
        None,
    )
    .await;

    // The user: profile, recent interactions newest first, and the recommendations
    // Recommend gives.
    let (status, user) = get_json(http_addr, "/console/api/users/alice?count=5").await;
    assert_eq!(status, 200, "{user}");
    let profile = &user["profile"];
    assert_eq!(profile["counts"]["view"], 1, "{user}");
    assert_eq!(profile["counts"]["purchase"], 1, "{user}");
    assert_eq!(ids_of(&profile["recent"]), ["shoes-2", "shoes-1"], "{user}");
    assert_eq!(profile["purchased"], json!(["shoes-2"]), "{user}");
    let items = &user["recommendations"]["items"];
    let grpc = ids(&recommend(&channel, "alice", 5).await);
    assert_eq!(
        ids_of(items),
        grpc,
        "the console shows what Recommend answers"
    );
    for item in items.as_array().unwrap() {
        assert!(item["score"].is_number(), "{item}");
        assert!(
            ["mf", "content", "popular", "similar", "repeat", "sequence"]
                .contains(&item["source"].as_str().unwrap()),
            "{item}"
        );
        assert!(
            item["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{item}"
        );
    }
    // A user without events: no profile, the newcomer's recommendations.
    let (status, nobody) = get_json(http_addr, "/console/api/users/nobody").await;
    assert_eq!(status, 200, "{nobody}");
    assert!(nobody["profile"].is_null(), "{nobody}");
    assert!(!ids_of(&nobody["recommendations"]["items"]).is_empty());

    // The item: its catalog entry and nearest items; an unknown one is 404.
    let (status, item) = get_json(http_addr, "/console/api/items/shoes-1").await;
    assert_eq!(status, 200, "{item}");
    assert_eq!(item["catalog"]["title"], "shoes 1", "{item}");
    assert_eq!(item["catalog"]["categories"], json!(["shoes"]), "{item}");
    assert!(!ids_of(&item["similar"]).is_empty(), "{item}");
    assert!(!ids_of(&item["similar"]).contains(&"shoes-1".to_owned()));
    let (status, missing) = get_json(http_addr, "/console/api/items/no-such-item").await;
    assert_eq!(status, 404, "{missing}");
    assert!(missing["error"].as_str().unwrap().contains("no-such-item"));

    // Bad input is a 400 that says what is wrong, never a crash.
    let long = "x".repeat(5000);
    for (path, says) in [
        (format!("/console/api/users/{long}"), "user_id"),
        ("/console/api/users/a%01b".to_owned(), "control"),
        ("/console/api/items/a%ffb".to_owned(), "UTF-8"),
        ("/console/api/users/alice?count=ten".to_owned(), "count"),
        ("/console/api/users/alice?count=100000".to_owned(), "count"),
        ("/console/api/items/shoes-1?count=0".to_owned(), "count"),
    ] {
        let (status, refusal) = get_json(http_addr, &path).await;
        assert_eq!(status, 400, "{path}: {refusal}");
        let error = refusal["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{path}: {refusal}");
        assert_eq!(refusal["status"], 400);
    }
    let (status, refusal) = get_json(http_addr, "/console/api/nothing-here").await;
    assert_eq!(status, 404, "{refusal}");

    // Live: the totals, and a point per second in which the accepted events show.
    let expected = (shoppers("x").len() + 2) as u64;
    eventually(Duration::from_secs(15), || async {
        let (status, live) = get_json(http_addr, "/console/api/live").await;
        if status != 200 {
            return Err(format!("{status}: {live}"));
        }
        if live["totals"]["accepted"] != expected {
            return Err(format!("totals: {live}"));
        }
        let points = live["points"].as_array().cloned().unwrap_or_default();
        let accepted: f64 = points
            .iter()
            .map(|p| p["events"][0].as_f64().unwrap_or_default())
            .sum();
        let recommend_calls = points
            .iter()
            .any(|p| p["recommend"]["per_sec"].as_f64() > Some(0.0));
        if accepted <= 0.0 || !recommend_calls {
            return Err(format!(
                "no accepted events or calls in the points yet: {live}"
            ));
        }
        Ok(())
    })
    .await;

    // The model: versions with their figures, and a rollback (API keys are off here).
    let taken = ModelServiceClient::new(channel.clone())
        .snapshot(proto::SnapshotRequest {
            reason: "console test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (status, model) = get_json(http_addr, "/console/api/model").await;
    assert_eq!(status, 200, "{model}");
    assert_eq!(model["rollback_needs_key"], false);
    let versions = model["versions"].as_array().unwrap();
    let listed = versions
        .iter()
        .find(|v| v["id"] == taken.id)
        .unwrap_or_else(|| panic!("version {} missing: {model}", taken.id));
    assert_eq!(listed["reason"], "console test");
    assert!(listed["events"].as_u64() > Some(0), "{listed}");
    assert!(
        model["quality"]["all"]["decayed"]["hr10"].is_number(),
        "{model}"
    );
    assert!(!model["history"].as_array().unwrap().is_empty(), "{model}");

    let (status, _, body) = http(
        http_addr,
        "POST",
        "/console/api/rollback",
        &[],
        Some(&json!({ "version": taken.id }).to_string()),
    )
    .await;
    assert_eq!(status, 415, "only JSON bodies: {body}");
    let (status, refusal) = post_rollback(http_addr, 999_999, None).await;
    assert_eq!(status, 404, "{refusal}");
    let (status, rolled) = post_rollback(http_addr, taken.id, None).await;
    assert_eq!(status, 200, "{rolled}");
    // A rollback is recorded as a new version holding the old one's state.
    assert_eq!(
        rolled["version"]["reason"],
        format!("rollback to {}", taken.id)
    );
    let installed = rolled["version"]["id"].as_u64().unwrap();
    assert!(installed > taken.id, "{rolled}");
    assert_eq!(
        rolled["serving"],
        format!("online-mf/v{installed}"),
        "{rolled}"
    );
    assert!(
        scrape(&server)
            .await
            .contains("reflex_model_rollbacks_total{trigger=\"manual\"} 1")
    );
}

#[tokio::test]
async fn rollback_from_the_console_needs_an_admin_key_when_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nname = \"ops\"\nkey = \"{ADMIN_KEY}\"\nscopes = [\"admin\"]\n\n\
             [[keys]]\nname = \"storefront\"\nkey = \"{RECOMMEND_KEY}\"\nscopes = [\"recommend\"]\n"
        ),
    )
    .unwrap();
    let server = Reflex::start_with(
        &dir.path().join("data"),
        &[
            ("REFLEX_CONSOLE__ENABLED", "true"),
            ("REFLEX_AUTH__ENABLED", "true"),
            ("REFLEX_AUTH__KEYS_FILE", keys.to_str().unwrap()),
        ],
    );
    let http_addr = server.metrics_addr.expect("the HTTP listener");
    let channel = server.channel().await;
    ingest(&channel, shoppers("k"), Some(ADMIN_KEY)).await;
    let taken = ModelServiceClient::new(channel.clone())
        .snapshot(keyed(
            proto::SnapshotRequest {
                reason: "before".into(),
            },
            Some(ADMIN_KEY),
        ))
        .await
        .unwrap()
        .into_inner();

    // Reading needs no key.
    let (status, model) = get_json(http_addr, "/console/api/model").await;
    assert_eq!(status, 200, "{model}");
    assert_eq!(model["rollback_needs_key"], true);
    let (status, user) = get_json(http_addr, "/console/api/users/shopper-0").await;
    assert_eq!(status, 200, "{user}");

    // Acting does: no key or an unknown one is 401, a key without admin 403.
    let serving = model["serving"].clone();
    let (status, refusal) = post_rollback(http_addr, taken.id, None).await;
    assert_eq!(status, 401, "{refusal}");
    let (status, refusal) = post_rollback(http_addr, taken.id, Some("not-a-key-0123456789")).await;
    assert_eq!(status, 401, "{refusal}");
    let (status, refusal) = post_rollback(http_addr, taken.id, Some(RECOMMEND_KEY)).await;
    assert_eq!(status, 403, "{refusal}");
    assert!(
        refusal["error"].as_str().unwrap().contains("Admin"),
        "{refusal}"
    );
    assert!(
        !refusal.to_string().contains(RECOMMEND_KEY),
        "the key is never echoed"
    );
    let (_, model) = get_json(http_addr, "/console/api/model").await;
    assert_eq!(
        model["serving"], serving,
        "a refused rollback changes nothing"
    );

    let (status, rolled) = post_rollback(http_addr, taken.id, Some(ADMIN_KEY)).await;
    assert_eq!(status, 200, "{rolled}");
    let (_, model) = get_json(http_addr, "/console/api/model").await;
    assert_eq!(model["serving"], rolled["serving"]);
}

#[test]
fn a_console_without_its_listener_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_reflex"))
        .arg("config")
        .env("REFLEX_CONSOLE__ENABLED", "true")
        .env("REFLEX_METRICS__ENABLED", "false")
        .env_remove("REFLEX_CONFIG")
        .output()
        .expect("running reflex config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("console.enabled needs metrics.enabled"),
        "{stderr}"
    );
}

// ---- the browser test -------------------------------------------------------------

/// The first of `names` found on `PATH`.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A chromedriver process, killed when dropped.
struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts chromedriver on a free port and opens a headless Chromium session.
    async fn start(chromedriver: &Path, chromium: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut driver = Driver {
            child,
            addr,
            session: String::new(),
        };
        eventually(Duration::from_secs(30), || async {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => Ok(()),
                Err(err) => Err(format!("chromedriver not listening: {err}")),
            }
        })
        .await;
        let session = driver
            .call(
                "POST",
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium.to_str().unwrap(),
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--window-size=1280,1000"],
                    },
                }}})),
            )
            .await;
        driver.session = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"))
            .to_owned();
        driver
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let (status, _, text) = http(
            self.addr,
            method,
            path,
            &[("content-type", "application/json")],
            body.as_deref(),
        )
        .await;
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
        assert_eq!(status, 200, "{method} {path}: {answer}");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call("POST", &path, Some(json!({ "url": url }))).await;
    }

    /// Runs `script` in the page; what it returns.
    async fn run(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call("POST", &path, Some(json!({ "script": script, "args": [] })))
            .await
    }

    /// Waits until the page has refreshed from the API at least `times` times since it
    /// was opened (so what it shows came from the server).
    async fn refreshed(&self, times: u64) {
        eventually(Duration::from_secs(20), || async {
            let n = self
                .run("return Number(document.body.dataset.refreshed || 0)")
                .await;
            if n.as_u64() >= Some(times) {
                Ok(())
            } else {
                let status = self
                    .run("return document.getElementById('status').textContent")
                    .await;
                Err(format!("refreshed {n} times; status line: {status}"))
            }
        })
        .await;
    }

    /// Saves a PNG of the window as `dir/name.png`.
    async fn screenshot(&self, dir: &Path, name: &str) {
        let path = format!("/session/{}/screenshot", self.session);
        let png = self.call("GET", &path, None).await;
        let png = base64(png.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn quit(mut self) {
        let path = format!("/session/{}", self.session);
        self.call("DELETE", &path, None).await;
        self.session.clear();
    }
}

/// Standard base64 (with padding) to bytes.
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let data: Vec<u8> = chunk
            .iter()
            .copied()
            .filter(|&c| c != b'=')
            .map(value)
            .collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &v)| n | (u32::from(v) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..data.len()]);
    }
    out
}

/// The item ids of the user page's recommendations table, top first.
const RECS_SCRIPT: &str =
    "return Array.from(document.querySelectorAll('#recs tr[data-item]')).map(r => r.dataset.item)";

/// Where the screenshots go: `<target dir>/console-screenshots/`.
fn screenshot_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_user_page_shows_the_recommendations_change_in_a_real_browser() {
    let (Some(chromium), Some(chromedriver)) = (
        on_path(&["chromium", "chromium-browser", "google-chrome"]),
        on_path(&["chromedriver"]),
    ) else {
        eprintln!(
            "SKIPPED: the console's browser test needs chromium and chromedriver on PATH \
             (Debian: apt-get install chromium chromium-driver); CI installs them"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(dir.path(), &[("REFLEX_CONSOLE__ENABLED", "true")]);
    let http_addr = server.metrics_addr.expect("the HTTP listener");
    let channel = server.channel().await;
    upsert_catalog(&channel, &["shoes", "books"], 8).await;
    ingest(&channel, shoppers("warm"), None).await;
    let shots = screenshot_dir();
    let base = format!("http://{http_addr}/console/");

    let driver = Driver::start(&chromedriver, &chromium).await;
    driver.open(&format!("{base}#user/bob")).await;
    driver.refreshed(1).await;
    let before: Vec<String> = serde_json::from_value(driver.run(RECS_SCRIPT).await).unwrap();
    assert!(!before.is_empty(), "the page shows bob's recommendations");
    assert_eq!(before, ids(&recommend(&channel, "bob", 10).await));
    let profile = driver
        .run("return document.getElementById('user-version').textContent")
        .await;
    assert!(
        profile.as_str().unwrap().contains("no profile yet"),
        "{profile}"
    );
    driver.screenshot(&shots, "user-before").await;

    // bob's events arrive while the page is open: it shows his new recommendations
    // without being reloaded.
    ingest(
        &channel,
        (0..4)
            .map(|n| {
                let id = format!("bob-{n}");
                event_at(&id, "bob", &format!("books-{n}"), View, seconds_ago(4 - n))
            })
            .collect(),
        None,
    )
    .await;
    let after = ids(&recommend(&channel, "bob", 10).await);
    assert_ne!(before, after, "bob's events change what Recommend answers");
    eventually(Duration::from_secs(20), || async {
        let shown: Vec<String> =
            serde_json::from_value(driver.run(RECS_SCRIPT).await).unwrap_or_default();
        if shown == after {
            Ok(())
        } else {
            Err(format!(
                "the page shows {shown:?}, Recommend answers {after:?}"
            ))
        }
    })
    .await;
    let recent = driver
        .run("return Array.from(document.querySelectorAll('#recent [data-item-link]')).map(a => a.textContent)")
        .await;
    assert_eq!(recent, json!(["books-3", "books-2", "books-1", "books-0"]));
    driver.screenshot(&shots, "user-after").await;

    // Every other page renders from the API; a screenshot of each (the model page with
    // a stored version to roll back to).
    snapshot(&channel, "console screenshot").await;
    for (hash, name, ready) in [
        (
            "live",
            "live",
            "document.querySelectorAll('.chart polyline').length > 0",
        ),
        (
            "model",
            "model",
            "document.querySelectorAll('#versions tr[data-version] button.rollback').length > 0",
        ),
        (
            "item/books-1",
            "item",
            "document.querySelectorAll('#similar tr[data-item]').length > 0",
        ),
    ] {
        driver.open(&format!("{base}#{hash}")).await;
        // Opening a new hash on the same page does not reload it: wait for the new
        // page's own answers.
        eventually(Duration::from_secs(20), || async {
            let shown = driver
                .run(&format!(
                    "return document.body.dataset.page === '{}' && ({ready})",
                    hash.split('/').next().unwrap()
                ))
                .await;
            if shown == json!(true) {
                Ok(())
            } else {
                let status = driver
                    .run("return document.getElementById('status').textContent")
                    .await;
                Err(format!("{name} not rendered; status line: {status}"))
            }
        })
        .await;
        driver.screenshot(&shots, name).await;
    }
    let title = driver
        .run("return document.querySelector('#catalog dd').textContent")
        .await;
    assert_eq!(title, "books 1");
    driver.quit().await;
    eprintln!("console screenshots in {}", shots.display());
}
