//! `reflex import` and `reflex train` against the real binary: a synthetic history of two
//! user groups with disjoint items is imported (malformed rows reported by line, a second
//! import all duplicates), ALS is trained on the store, and a server started afterwards
//! serves the trained version and recommends each group its own items.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// Runs `reflex <args> --data-dir <dir> --json` and returns its parsed stdout.
fn run_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_reflex"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .arg("--json")
        .env("RUST_LOG", "warn")
        .env_remove("REFLEX_CONFIG")
        .output()
        .expect("running reflex");
    assert!(
        out.status.success(),
        "reflex {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "reflex {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Group A (`a-N`) views and buys `ga-*` items, group B (`b-N`) `gb-*` items. Returns
/// the CSV text, the number of good rows and the line number of each bad row.
fn history() -> (String, u64, Vec<u64>) {
    let mut text = String::from("user_id,item_id,kind,timestamp\n");
    let mut line = 1u64;
    let mut good = 0u64;
    let mut bad = Vec::new();
    // 2021-01-01, in seconds: older than the profile TTL, as real history is.
    let t0 = 1_609_459_200u64;
    for group in ["a", "b"] {
        for u in 0..30u64 {
            for e in 0..12u64 {
                let item = (u * 7 + e * 3) % 20;
                let kind = if e % 6 == 5 { "purchase" } else { "view" };
                text.push_str(&format!(
                    "{group}-{u},g{group}-{item},{kind},{}\n",
                    t0 + u * 3600 + e * 60
                ));
                line += 1;
                good += 1;
            }
        }
        // One malformed row per group.
        text.push_str(&format!("{group}-0,g{group}-1,like,{t0}\n"));
        line += 1;
        bad.push(line);
    }
    (text, good, bad)
}

#[tokio::test]
async fn import_then_train_then_serve_the_trained_version() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("store");
    let file = dir.path().join("history.csv");
    let (text, good, bad_lines) = history();
    std::fs::write(&file, text).unwrap();
    let file_arg = file.to_str().unwrap();

    let first = run_json(&data_dir, &["import", "--data", file_arg]);
    assert_eq!(first["format"], "csv");
    assert_eq!(first["accepted"], good, "{first}");
    assert_eq!(first["duplicate"], 0);
    assert_eq!(first["rejected"], bad_lines.len() as u64);
    let rejections = first["first_rejections"].as_array().unwrap();
    assert_eq!(rejections[0]["line"], bad_lines[0], "{first}");
    assert!(
        rejections[0]["reason"].as_str().unwrap().contains("like"),
        "{first}"
    );

    // Derived event ids: importing again changes nothing.
    let second = run_json(&data_dir, &["import", "--data", file_arg]);
    assert_eq!(second["accepted"], 0, "{second}");
    assert_eq!(second["duplicate"], good, "{second}");

    // The server's default factor count; another one is refused.
    let factors = reflex_models::MfConfig::default().factors.to_string();
    let refused = Command::new(env!("CARGO_BIN_EXE_reflex"))
        .args(["train", "--factors", "7", "--data-dir"])
        .arg(&data_dir)
        .env_remove("REFLEX_CONFIG")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("model.factors"));
    let trained = run_json(&data_dir, &["train", "--factors", &factors]);
    assert_eq!(trained["users"], 60, "{trained}");
    assert_eq!(trained["items"], 40, "{trained}");
    let version = trained["version"]["id"].as_u64().unwrap();
    assert!(
        trained["version"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("train: als k=64"),
        "{trained}"
    );

    let server = Reflex::start(&data_dir);
    let channel = server.channel().await;
    let listed = model_versions(&channel).await;
    assert!(
        listed
            .versions
            .iter()
            .any(|v| v.id == version && v.reason.starts_with("train: ")),
        "{listed:?}"
    );
    assert_eq!(listed.serving, format!("online-mf/v{version}"));
    for (user, own) in [("a-3", "ga-"), ("b-5", "gb-")] {
        let resp = recommend(&channel, user, 5).await;
        assert_eq!(resp.model_version, listed.serving);
        let got = ids(&resp);
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|i| i.starts_with(own)), "{user}: {got:?}");
    }
}
