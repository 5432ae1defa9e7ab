//! The browser SDK and the flowboard demo in headless Chromium, against a cloud and
//! two edges as processes: cross-edge edits and cursors, a browser-to-browser data
//! channel, the WebRTC transport to the edge (and its first flight), the SSE fallback
//! with WebSocket blocked, job activity, screenshots, and an edge killed mid-edit.
//! The script is tests/browser/flowboard.mjs; the SDK's unit tests run from here too.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use edge::auth::Action;
use outpost_tests::fleet::{browser_ready, connected, fleet};
use outpost_tests::token;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flowboard_works_across_edges_transports_and_an_edge_failure() -> Result<()> {
    if !browser_ready()? {
        return Ok(());
    }
    let f = fleet()?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tok = token(
        "demo-user",
        "project:*",
        &[
            Action::Subscribe,
            Action::Publish,
            Action::State,
            Action::Presence,
        ],
        3600,
    );
    let cfg = json!({
        "cloud": f.cloud.url("").trim_end_matches('/'),
        "a": f.a.url("").trim_end_matches('/'),
        "b": f.b.url("").trim_end_matches('/'),
        "token": tok,
        "pidA": f.a.pid().context("edge A pid")?,
        "pidB": f.b.pid().context("edge B pid")?,
        "pidCloud": f.cloud.pid().context("cloud pid")?,
        "docs": root.join("docs"),
        "demoJobs": root.join("scripts/demo-jobs"),
    });
    let out = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/flowboard.mjs"))
        .arg(cfg.to_string())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    ensure!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "browser test failed: {stdout}\n{}",
        f.logs()
    );
    Ok(())
}

/// The SDK's unit tests (node's test runner): reconnect, resume, de-duplication.
#[test]
fn the_sdk_unit_tests_pass() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js");
    let out = std::process::Command::new("node")
        .args(["--test", "--test-timeout=20000", "test/"])
        .current_dir(&dir)
        .output()
        .context("node (the SDK's unit tests need node 18 or later)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "SDK unit tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
