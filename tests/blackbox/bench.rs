//! `reflex bench` against a real server: the load generator reaches a server that
//! requires API keys when given one, and says what is wrong when not.

use std::process::{Command, Output};

use crate::support::*;

const KEY: &str = "bench-admin-key-0123456789";

/// Runs a short `reflex bench --json` against `server` with `extra` flags and `env`.
fn bench(server: &Reflex, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reflex"));
    cmd.args(["bench", "--addr", &server.addr.to_string()])
        .args(["--items", "300", "--users", "50", "--seed-events", "2"])
        .args(["--streams", "1", "--batch", "50", "--sessions", "50"])
        .args(["--recommenders", "1", "--warmup", "0", "--duration", "1"])
        .args(["--noop-duration", "0.5", "--json"])
        .args(extra)
        .env_remove("REFLEX_BENCH_API_KEY")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running reflex bench")
}

/// The errors of a report's phase as `(source, code)` pairs.
fn errors(phase: &serde_json::Value) -> Vec<(String, String)> {
    phase["errors"]
        .as_array()
        .expect("an errors list")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap_or_default().to_owned(),
                e["code"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn bench_drives_a_server_that_requires_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!("[[keys]]\nname = \"bench\"\nkey = \"{KEY}\"\nscopes = [\"admin\"]\n"),
    )
    .unwrap();
    let server = Reflex::start_with(
        &dir.path().join("data"),
        &[
            ("REFLEX_AUTH__ENABLED", "true"),
            ("REFLEX_AUTH__KEYS_FILE", keys.to_str().unwrap()),
            (
                "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
                "0",
            ),
        ],
    );

    // The key as a flag, then from the environment: every call authenticated.
    for (flags, env) in [
        (vec!["--api-key", KEY], vec![]),
        (vec![], vec![("REFLEX_BENCH_API_KEY", KEY)]),
    ] {
        let out = bench(&server, &flags, &env);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "bench failed:\n{stderr}");
        assert!(
            !stdout.contains(KEY) && !stderr.contains(KEY),
            "the key is never printed:\n{stdout}\n{stderr}"
        );
        let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
        let main = &report["main"];
        assert!(
            main["ingest"]["accepted"].as_u64().unwrap_or(0) > 0,
            "accepted events in the main phase: {main}"
        );
        assert!(main["recommend_ms"]["count"].as_u64().unwrap_or(0) > 0);
        assert!(report["setup"]["seed_user_events"].as_u64().unwrap_or(0) > 0);
        for phase in [main, &report["noop"]] {
            let unauthorised: Vec<_> = errors(phase)
                .into_iter()
                .filter(|(_, code)| code == "Unauthenticated" || code == "PermissionDenied")
                .collect();
            assert!(unauthorised.is_empty(), "{unauthorised:?} in {phase}");
        }
    }

    // Without a key the server refuses the run's first call, and the bench says why.
    let out = bench(&server, &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a keyless run cannot succeed");
    assert!(
        stderr.contains("Unauthenticated") || stderr.contains("authentication"),
        "{stderr}"
    );
    assert!(stderr.contains("--api-key"), "{stderr}");

    // A wrong key is not taken for a missing one.
    let out = bench(&server, &["--api-key", "not-the-key-0123456789"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not know this API key"), "{stderr}");
    assert!(!stderr.contains("not-the-key-0123456789"), "{stderr}");
}

/// With the server's metrics endpoint, the report carries the recall of its approximate
/// retrieval over the main phase (the server's own check against the exact scan), so a
/// fast server answering wrongly shows as such.
#[tokio::test]
async fn bench_reports_the_servers_retrieval_recall() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(
        dir.path(),
        &[
            (
                "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
                "0",
            ),
            // The index answers from the first item, and every search is checked.
            ("REFLEX_RETRIEVAL__THRESHOLD_ITEMS", "0"),
            ("REFLEX_RETRIEVAL__RECALL_CHECK_EVERY", "1"),
        ],
    );
    let metrics = server.metrics_addr.expect("metrics endpoint announced");
    let out = bench(&server, &["--metrics-addr", &metrics.to_string()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let recall = &report["recall"];
    let field = |name: &str| recall[name].as_u64().unwrap_or(0);
    let (checks, wanted, found) = (field("checks"), field("wanted"), field("found"));
    assert!(checks > 0, "checks in the main phase: {report}");
    assert!(wanted >= checks && found <= wanted, "{recall}");
    let value = recall["recall"].as_f64().expect("a recall figure");
    assert!(
        (value - found as f64 / wanted as f64).abs() < 1e-9,
        "recall {value} is found / wanted"
    );
    assert!(
        !stderr.contains("could not read the retrieval recall"),
        "{stderr}"
    );
    // The main phase's counts are part of the server's own (the whole run's). How high
    // recall is under load is the retriever suite's business: a debug build on busy
    // cores lags here (0.87 seen in CI, 0.998 on a quiet machine).
    let text = scrape(&server).await;
    let total = |line: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(checks <= total("reflex_retrieval_recall_checks_total "));
    assert!(wanted <= total("reflex_retrieval_recall_items_total{kind=\"wanted\"} "));
    assert!(found <= total("reflex_retrieval_recall_items_total{kind=\"found\"} "));
}
