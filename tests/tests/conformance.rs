//! WebSocket conformance: the Autobahn TestSuite cases, driven by the `kosoku` runner
//! (PyPI), against the edge's test-only echo endpoint, which runs on the same
//! WebSocket stack and limits as `/v1/ws`.
//!
//! `scripts/test` installs kosoku into `target/tools/venv` and sets `KOSOKU`. Without
//! it the test says so and skips, except under CI (`CI` set), where it fails.
//! `AUTOBAHN_CASES` narrows the run (a comma-separated list of ids or globs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use outpost_tests::Edge;
use serde_json::Value;

fn kosoku() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KOSOKU") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/kosoku");
    venv.exists().then_some(venv)
}

#[test]
fn autobahn_cases_pass_against_the_websocket_stack() -> Result<()> {
    let Some(runner) = kosoku() else {
        if std::env::var("CI").is_ok() {
            bail!("kosoku is not installed (scripts/test installs it into target/tools/venv)");
        }
        eprintln!(
            "SKIPPED: kosoku not installed; run scripts/test, or pip install kosoku and set KOSOKU"
        );
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // Messages up to 16 MiB (Autobahn's section 9) must get through.
    let edge = Edge::start(
        &dir.path().join("edge"),
        "[testing]\nwebsocket_echo = true\n\n[limits]\nmax_message_bytes = 16777216\n",
    )?;
    let reports = dir.path().join("reports");
    let mut cmd = Command::new(&runner);
    cmd.arg(format!("ws://{}/v1/test/echo", edge.addr))
        .args(["--parallelism", "2", "--outdir"])
        .arg(&reports);
    match std::env::var("AUTOBAHN_CASES") {
        Ok(list) => {
            for c in list.split(',') {
                cmd.args(["--include", c.trim()]);
            }
        }
        // 12.* and 13.* need permessage-deflate, which Outpost does not offer.
        Err(_) => {
            cmd.args(["--exclude", "12.*", "--exclude", "13.*"]);
        }
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", runner.display()))?;
    let index: Value =
        serde_json::from_slice(&std::fs::read(reports.join("index.json")).with_context(|| {
            format!(
                "kosoku wrote no report; its output:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?)?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for cases in index.as_object().into_iter().flat_map(|m| m.values()) {
        for (id, r) in cases.as_object().into_iter().flatten() {
            let b = r["behavior"].as_str().unwrap_or("?").to_owned();
            let c = r["behaviorClose"].as_str().unwrap_or("?").to_owned();
            *counts.entry(b.clone()).or_default() += 1;
            if !matches!(b.as_str(), "OK" | "NON-STRICT" | "INFORMATIONAL")
                || !matches!(c.as_str(), "OK" | "INFORMATIONAL")
            {
                bad.push(format!("{id}: {b} / close {c}"));
            }
        }
    }
    let total: usize = counts.values().sum();
    eprintln!("Autobahn cases run against /v1/test/echo: {total}; by verdict: {counts:?}");
    ensure!(total > 0, "no case ran");
    ensure!(
        bad.is_empty(),
        "{} cases failed (reports in {}):\n{}",
        bad.len(),
        reports.display(),
        bad.join("\n")
    );
    drop(edge);
    Ok(())
}
