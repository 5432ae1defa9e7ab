//! A cloud and two edges as processes on loopback, for the fleet and browser suites.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::{eventually, free_udp_port, metric, Cloud, Edge};

pub const TOKEN_A: &str = "edge-a-uplink-token-0123456789";
pub const TOKEN_B: &str = "edge-b-uplink-token-0123456789";
pub const OPERATOR_KEY: &str = "opk_operator_test_key_0123456789";

#[derive(Debug)]
pub struct Fleet {
    pub cloud: Cloud,
    pub a: Edge,
    pub b: Edge,
    pub _dir: tempfile::TempDir,
}

pub fn fleet() -> Result<Fleet> {
    fleet_with("")
}

/// A cloud and two edges; `extra_a` is added to edge A's configuration.
pub fn fleet_with(extra_a: &str) -> Result<Fleet> {
    let dir = match std::env::var("TEST_KEEP_DIR") {
        Ok(p) => tempfile::Builder::new()
            .disable_cleanup(true)
            .tempdir_in(p)?,
        Err(_) => tempfile::tempdir()?,
    };
    let cloud = Cloud::start(
        &dir.path().join("cloud"),
        free_udp_port()?,
        &[("edge-a", TOKEN_A), ("edge-b", TOKEN_B)],
        &format!(
            "[auth]\noperator_keys = [{{ name = \"ops\", sha256 = \"{}\" }}]\n",
            edge::auth::api_key_hash(OPERATOR_KEY)
        ),
    )?;
    let a = Edge::start(
        &dir.path().join("a"),
        &format!("{}\n{extra_a}", cloud.uplink_toml(TOKEN_A)),
    )?;
    let b = Edge::start(&dir.path().join("b"), &cloud.uplink_toml(TOKEN_B))?;
    Ok(Fleet {
        cloud,
        a,
        b,
        _dir: dir,
    })
}

/// Waits until `n` edges are connected to the cloud.
pub async fn connected(http: &reqwest::Client, cloud: &Cloud, n: f64) -> Result<()> {
    let url = cloud.url("/metrics");
    eventually(Duration::from_secs(20), "edges to connect", || async {
        Ok((metric(http, &url, "outpost_edges_connected").await? == n).then_some(()))
    })
    .await
}

/// Runs a fleet test; on failure, attaches the processes' logs to the error.
pub async fn with_logs<F>(f: &mut Fleet, body: F) -> Result<()>
where
    F: for<'a> FnOnce(
        &'a mut Fleet,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>>,
{
    let r = body(f).await;
    r.map_err(|e| e.context(f.logs()))
}

impl Fleet {
    /// The tail of every log, for a failing test's report.
    pub fn logs(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- cloud log\n{}\n--- edge A log\n{}\n--- edge B log\n{}",
            tail(self.cloud.log()),
            tail(self.a.log()),
            tail(self.b.log())
        )
    }
}

/// Whether the browser tests can run here: Debian's chromium and the npm packages.
/// Off CI they are skipped with a message when missing; `scripts/test` installs them.
pub fn browser_ready() -> Result<bool> {
    let chromium = Path::new("/usr/bin/chromium").exists();
    let modules = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("browser/node_modules/playwright-core")
        .exists();
    if chromium && modules {
        return Ok(true);
    }
    if std::env::var("CI").is_ok() {
        anyhow::bail!("CI must run the browser tests: chromium {chromium}, playwright-core {modules} (scripts/test installs both)");
    }
    eprintln!("skipping the browser test: chromium installed {chromium}, playwright-core installed {modules}; run scripts/test to install them");
    Ok(false)
}
