//! A full disk under a real edge: its data directory is a small tmpfs. Writes that
//! cannot be stored get a clear error, nothing acknowledged is lost (also across a
//! kill -9), and writes are accepted again once space returns. Needs root to mount
//! the tmpfs; skips with a message elsewhere.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use outpost_tests::{admin_token, Edge, Ws};
use serde_json::{json, Value};

/// A mounted tmpfs, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Option<Self>> {
        std::fs::create_dir_all(at)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Some(Self(at.to_owned()))),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here ({}); run as root for the disk-full test",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                Ok(None)
            }
            Err(e) => {
                eprintln!("SKIPPED: no mount command ({e})");
                Ok(None)
            }
        }
    }

    fn resize(&self, size: &str) -> Result<()> {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()?;
        ensure!(st.success(), "remount failed");
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Publishes one 16 KiB event as request `n`; returns the reply.
async fn publish_blob(ws: &mut Ws, n: u64, blob: &str) -> Result<Value> {
    ws.request(
        json!({"type": "publish", "channel": "project:disk", "event": "e", "data": {"n": n, "blob": blob}}),
        n,
    )
    .await
}

async fn history_dots(edge: &Edge) -> Result<BTreeSet<String>> {
    let http = reqwest::Client::new();
    let mut dots = BTreeSet::new();
    let mut since: Option<String> = None;
    loop {
        let mut url = edge.url("/v1/channels/project:disk/history?limit=1000");
        if let Some(s) = &since {
            url.push_str(&format!("&since={s}"));
        }
        let v: Value = http
            .get(url)
            .bearer_auth(admin_token())
            .send()
            .await?
            .json()
            .await?;
        for op in v["ops"].as_array().into_iter().flatten() {
            if let Some(d) = op["dot"].as_str() {
                dots.insert(d.to_owned());
            }
        }
        since = v["token"].as_str().map(str::to_owned);
        if v["more"] != true {
            return Ok(dots);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_and_loses_nothing_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(fs) = Tmpfs::mount(&dir.path().join("edge"), "3m")? else {
        return Ok(());
    };
    let mut edge = Edge::start(
        &dir.path().join("edge"),
        "[limits]\nmax_message_bytes = 65536\n",
    )?;
    let t = admin_token();
    let mut ws = Ws::connect(&edge, &t).await?;
    let blob = "x".repeat(16 * 1024);
    let mut acked = BTreeSet::new();
    let mut error = None;
    for n in 1..2_000u64 {
        let r = publish_blob(&mut ws, n, &blob).await?;
        match r["type"].as_str() {
            Some("ack") => {
                acked.insert(r["dot"].as_str().unwrap_or_default().to_owned());
            }
            _ => {
                error = Some(r);
                break;
            }
        }
    }
    let Some(error) = error else {
        bail!("3 MiB took 2,000 writes of 16 KiB");
    };
    eprintln!(
        "disk full after {} acknowledged writes; the next got {error}",
        acked.len()
    );
    ensure!(
        error["type"] == "error" && error["code"] == "storage_unavailable",
        "unclear error: {error}"
    );
    // Everything acknowledged is readable; the edge is up.
    let have = history_dots(&edge).await?;
    ensure!(
        have.is_superset(&acked),
        "lost {} acknowledged ops",
        acked.difference(&have).count()
    );
    // Space returns: writes are accepted again (after the edge reopens its storage).
    fs.resize("64m")?;
    let mut resumed = false;
    for n in 10_000..10_200u64 {
        let r = publish_blob(&mut ws, n, &blob).await?;
        if r["type"] == "ack" {
            acked.insert(r["dot"].as_str().unwrap_or_default().to_owned());
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        resumed,
        "writes were still refused 20 s after space returned"
    );
    // And nothing acknowledged is lost across a crash.
    edge.restart()?;
    let have = history_dots(&edge).await?;
    ensure!(
        have.is_superset(&acked),
        "after kill -9: lost {} of {} acknowledged ops",
        acked.difference(&have).count(),
        acked.len()
    );
    drop(edge);
    drop(fs);
    Ok(())
}
