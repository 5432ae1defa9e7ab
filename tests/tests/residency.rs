//! Channels live on disk and are loaded when used: an edge and a cloud holding a
//! million stored ops over a hundred thousand channels restart without loading them,
//! and serve resumes, history and state of channels that are not resident — read
//! back only through the client API — while a tiny memory budget unloads them again.
//!
//! `RESIDENCY_CHANNELS=n` changes the size (default 100,000 channels of 10 ops).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outpost_tests::{
    admin_token, bin, eventually, free_udp_port, metric, rss_kib, Cloud, Edge, Ws,
};
use serde_json::{json, Value};

const OPS: u64 = 10;
/// A budget far below what the sampled channels take together.
const STORAGE: &str =
    "[storage]\ndurability = \"os\"\nresident_bytes = 65536\nresident_idle_secs = 1\n";

fn channels() -> u64 {
    std::env::var("RESIDENCY_CHANNELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn bulk_load(data: &std::path::Path, n: u64) -> Result<std::process::Child> {
    Ok(std::process::Command::new(bin("outpost")?)
        .args([
            "bulk-load",
            "--channels",
            &n.to_string(),
            "--ops-per-channel",
            &OPS.to_string(),
            "--data-dir",
        ])
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_stored_ops_restart_cold_and_serve_resumes_history_and_state() -> Result<()> {
    let n = channels();
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let (cloud_dir, edge_dir) = (dir.path().join("cloud"), dir.path().join("edge"));
    let mut loaders = [
        bulk_load(&cloud_dir.join("data"), n)?,
        bulk_load(&edge_dir.join("data"), n)?,
    ];
    for l in &mut loaders {
        ensure!(l.wait()?.success(), "bulk-load failed");
    }
    eprintln!(
        "bulk-loaded {} ops over {n} channels into each of 2 data dirs in {:.1} s",
        n * OPS,
        started.elapsed().as_secs_f64()
    );

    let t0 = Instant::now();
    let cloud = Cloud::start(&cloud_dir, free_udp_port()?, &[], STORAGE)?;
    let cloud_ready = t0.elapsed();
    let t0 = Instant::now();
    let edge = Edge::start(&edge_dir, STORAGE)?;
    let edge_ready = t0.elapsed();
    let http = reqwest::Client::new();
    for (name, base) in [("cloud", cloud.url("")), ("edge", edge.url(""))] {
        let r = http.get(format!("{base}/readyz")).send().await?;
        ensure!(r.status() == 200, "{name} not ready");
    }
    eprintln!(
        "cold start with {} stored ops: cloud listening after {:.2} s, RSS {} KiB; edge after {:.2} s, RSS {} KiB (debug build)",
        n * OPS,
        cloud_ready.as_secs_f64(),
        rss_kib(cloud.pid().context("cloud pid")?)?,
        edge_ready.as_secs_f64(),
        edge.rss_kib()?
    );

    let r = serve_cold(&http, cloud.addr, n)
        .await
        .and(serve_cold(&http, edge.addr, n).await);
    r.map_err(|e| {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        e.context(format!(
            "--- cloud log\n{}\n--- edge log\n{}",
            tail(cloud.log()),
            tail(edge.log())
        ))
    })?;

    // The sweep keeps what is resident within the budget.
    for base in [cloud.url("/metrics"), edge.url("/metrics")] {
        let loads = metric(&http, &base, "outpost_channel_loads_total").await?;
        // 30 reads, 10 token pages after an unload, 10 resumes after another, 1 race.
        ensure!(loads >= 51.0, "{base}: {loads} channels loaded");
        eventually(
            Duration::from_secs(10),
            "resident channels unloaded",
            || async {
                let unloaded = metric(&http, &base, "outpost_channel_unloads_total")
                    .await
                    .unwrap_or(0.0);
                let resident = metric(&http, &base, "outpost_resident_bytes")
                    .await
                    .unwrap_or(f64::MAX);
                Ok((unloaded >= 50.0 && resident <= 65536.0).then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// Reads channels that are not resident through the client API: history, state, a
/// resume from the middle; then loads one while writes, a subscribe and reads race.
async fn serve_cold(http: &reqwest::Client, addr: SocketAddr, n: u64) -> Result<()> {
    let t = admin_token();
    let base = format!("http://{addr}");
    let sample: Vec<u64> = (0..30).map(|i| (i * 7919 + 13) % n).collect();
    let mut resume_ms = Vec::new();
    for c in &sample {
        let ch = format!("project:bulk-{c}");
        let v: Value = http
            .get(format!("{base}/v1/channels/{ch}/history?limit=100"))
            .bearer_auth(&t)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let ops = v["ops"].as_array().context("ops")?;
        ensure!(v["truncated"] != true, "{ch}: history truncated: {v}");
        let seqs: Vec<u64> = ops
            .iter()
            .filter_map(|o| o["dot"].as_str()?.rsplit_once(':')?.1.parse().ok())
            .collect();
        ensure!(
            seqs == (1..=OPS).collect::<Vec<_>>(),
            "{ch} at {addr}: history seqs {seqs:?}"
        );
        ensure!(ops[0]["data"]["c"] == *c, "{ch}: first op {}", ops[0]);
        let s: Value = http
            .get(format!("{base}/v1/channels/{ch}/state/k"))
            .bearer_auth(&t)
            .send()
            .await?
            .json()
            .await?;
        ensure!(s["value"]["n"] == OPS, "{ch} at {addr}: state {s}");
    }
    // Resumes from the middle of channels that are (again) not resident: tokens
    // first, then long enough for the sweep (every second, idle 1 s) to unload them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut tokens = Vec::new();
    for c in &sample[..10] {
        let ch = format!("project:bulk-{c}");
        let page: Value = http
            .get(format!("{base}/v1/channels/{ch}/history?limit=4"))
            .bearer_auth(&t)
            .send()
            .await?
            .json()
            .await?;
        tokens.push((ch, page["token"].as_str().context("token")?.to_owned()));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (ch, token) in &tokens {
        let mut ws = Ws::connect_url(&format!("ws://{addr}/v1/ws?token={t}")).await?;
        let sent = Instant::now();
        let (replayed, done) = ws.subscribe(ch, Some(token)).await?;
        resume_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
        let seqs: Vec<u64> = replayed
            .iter()
            .filter_map(|o| o["dot"].as_str()?.rsplit_once(':')?.1.parse().ok())
            .collect();
        ensure!(
            seqs == (5..=OPS).collect::<Vec<_>>(),
            "{ch} at {addr}: resume replayed {seqs:?} ({done})"
        );
    }
    resume_ms.sort_by(f64::total_cmp);
    eprintln!(
        "{addr}: resume from a channel that was not resident: p50 {:.1} ms, max {:.1} ms (debug build, {} resumes)",
        resume_ms[resume_ms.len() / 2],
        resume_ms[resume_ms.len() - 1],
        resume_ms.len()
    );

    // A channel being loaded while a subscribe, writes and reads arrive at once.
    let ch = format!("project:bulk-{}", (n / 2) % n);
    let mut sub = Ws::connect_url(&format!("ws://{addr}/v1/ws?token={t}")).await?;
    let subscribe = sub.subscribe(&ch, None);
    let writes = async {
        let mut dots = Vec::new();
        for i in 0..20 {
            let r: Value = http
                .post(format!("{base}/v1/channels/{ch}/events"))
                .bearer_auth(&t)
                .json(&json!({"event": "late", "data": {"i": i}}))
                .send()
                .await?
                .json()
                .await?;
            dots.push(r["dot"].as_str().context("dot")?.to_owned());
        }
        anyhow::Ok(dots)
    };
    let read = http
        .get(format!("{base}/v1/channels/{ch}/state/k"))
        .bearer_auth(&t)
        .send();
    let (sub_r, dots, state) = tokio::join!(subscribe, writes, read);
    let (replayed, _) = sub_r?;
    let dots = dots?;
    let state: Value = state?.json().await?;
    ensure!(state["value"]["n"] == OPS, "state while loading: {state}");
    // Every op once, bulk ops first in order, then the 20 writes in order.
    let mut seen: Vec<String> = replayed
        .iter()
        .filter_map(|o| o["dot"].as_str().map(str::to_owned))
        .collect();
    while seen.len() < OPS as usize + dots.len() {
        let m = sub.recv_within(Duration::from_secs(10)).await?;
        if m["type"] == "op" && m["channel"] == ch.as_str() {
            seen.push(m["dot"].as_str().unwrap_or_default().to_owned());
        }
    }
    let bulk: Vec<&String> = seen.iter().filter(|d| !dots.contains(d)).collect();
    let mine: Vec<&String> = seen.iter().filter(|d| dots.contains(d)).collect();
    ensure!(
        bulk.len() == OPS as usize,
        "{ch}: {} bulk ops delivered: {seen:?}",
        bulk.len()
    );
    ensure!(
        mine == dots.iter().collect::<Vec<_>>(),
        "{ch}: writes delivered {mine:?}, acked {dots:?}"
    );
    let own_seqs: Vec<u64> = dots
        .iter()
        .filter_map(|d| d.rsplit_once(':')?.1.parse().ok())
        .collect();
    ensure!(
        own_seqs == (1..=20).collect::<Vec<_>>(),
        "{ch}: new dots {own_seqs:?}"
    );
    let v: Value = http
        .get(format!("{base}/v1/channels/{ch}/history?limit=100"))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        v["ops"].as_array().map(Vec::len) == Some(OPS as usize + 20),
        "{ch}: history after the race: {v}"
    );
    Ok(())
}
