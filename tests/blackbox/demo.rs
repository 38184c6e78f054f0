//! `reflex demo`, the README's first command, runs to the end and shows what it promises.

use std::process::Command;

#[test]
fn the_demo_runs_and_shows_fresh_and_cold_start_recommendations() {
    let out = Command::new(env!("CARGO_BIN_EXE_reflex"))
        .arg("demo")
        .env("RUST_LOG", "warn")
        .env_remove("REFLEX_CONFIG")
        .output()
        .expect("running reflex demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "of alice's top 5 are shoes now",
        "recommended by the content model before its first event",
        "Done: 1 accepted, 1 duplicate, 1 rejected, 1 filtered",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // Alice's events never touch another user's profile (their answers may drift with
    // what everyone's events teach the shared model and signals).
    let line = stdout
        .lines()
        .find(|l| l.contains("Another user"))
        .unwrap_or_else(|| panic!("no line about another user in:\n{stdout}"));
    let versions: Vec<&str> = line
        .split(": ")
        .nth(1)
        .unwrap_or_default()
        .split(", ")
        .collect();
    let before = versions.first().and_then(|v| v.strip_suffix(" before"));
    let after = versions.get(1).and_then(|v| v.strip_suffix(" after"));
    assert!(
        before.is_some() && before == after,
        "the other user's profile changed: {line}"
    );
}
