//! Connection floods against a real edge process: up to this machine's descriptor
//! limit (20,000 per process), and past a deliberately small one. The edge must
//! refuse cleanly, keep serving the clients it has, and serve new ones once the flood
//! is gone. (Its own file, so no other test shares this process's descriptors.)

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use outpost_tests::{admin_token, eventually, metric, Edge, Ws};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The two tests share this process's descriptors: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A subscriber and a publisher connected before the flood, used during it.
async fn clients(edge: &Edge) -> Result<(Ws, Ws)> {
    let t = admin_token();
    let mut sub = Ws::connect(edge, &t).await?;
    sub.subscribe("project:flood", None).await?;
    let publ = Ws::connect(edge, &t).await?;
    Ok((sub, publ))
}

/// Publishes through `publ` and expects `sub` to get it.
async fn still_serving(sub: &mut Ws, publ: &mut Ws, n: u64) -> Result<()> {
    let r = publ
        .request(
            json!({"type": "publish", "channel": "project:flood", "event": "e", "data": {"n": n}}),
            n,
        )
        .await?;
    ensure!(r["type"] == "ack", "publish during the flood: {r}");
    let op = sub.recv_until(|m| m["type"] == "op").await?;
    ensure!(op["data"]["n"] == n, "wrong op {op}");
    Ok(())
}

/// Opens up to `n` TCP connections; returns them (some may already be closed by the
/// edge) and how many the edge closed at once.
async fn flood(edge: &Edge, n: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(edge.addr)).await {
            Ok(Ok(s)) => open.push(s),
            _ => break,
        }
    }
    // Count the sockets the edge closed right away (EOF within a moment).
    let mut closed = 0;
    let mut buf = [0u8; 64];
    for s in open.iter_mut().rev().take(2_000) {
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    (open, closed)
}

async fn served_again(edge: &Edge) -> Result<Duration> {
    let http = reqwest::Client::new();
    let t = Instant::now();
    eventually(
        Duration::from_secs(15),
        "new connections served",
        || async {
            Ok(http
                .get(edge.url("/healthz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
                .then_some(()))
        },
    )
    .await?;
    Ok(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_to_the_descriptor_limit_is_refused_and_clients_keep_working() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir()?;
    // This machine's hard limit; the edge's socket cap (19,000) sits below it.
    // A long header timeout: a slow flood must pile up past the cap instead of having
    // its first sockets closed as slowloris before the last ones arrive.
    let edge =
        Edge::start_with_nofile(dir.path(), "[limits]\nheader_timeout_secs = 300\n", 20_000)?;
    let (mut sub, mut publ) = clients(&edge).await?;
    still_serving(&mut sub, &mut publ, 1).await?;
    let t = Instant::now();
    let (conns, closed) = flood(&edge, 19_700).await;
    eprintln!(
        "flood: {} connections opened in {:.1} s; of the last 2,000, {closed} were closed by the edge at once",
        conns.len(),
        t.elapsed().as_secs_f64()
    );
    ensure!(conns.len() > 19_000, "the flood stopped at {}", conns.len());
    ensure!(closed > 0, "the edge accepted every socket past its cap");
    for n in 2..12 {
        still_serving(&mut sub, &mut publ, n).await?;
    }
    drop(conns);
    let after = served_again(&edge).await?;
    let refused = metric(
        &reqwest::Client::new(),
        &edge.url("/metrics"),
        "outpost_sockets_refused_total",
    )
    .await?;
    eprintln!(
        "after the flood: new clients served within {:.2} s; sockets refused: {refused}",
        after.as_secs_f64()
    );
    ensure!(refused > 0.0);
    still_serving(&mut sub, &mut publ, 100).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_backs_off_and_recovers() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir()?;
    // A process limit far below the socket cap: accept() fails with EMFILE.
    let edge = Edge::start_with_nofile(dir.path(), "", 256)?;
    let (mut sub, mut publ) = clients(&edge).await?;
    let (conns, _) = flood(&edge, 800).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..6 {
        still_serving(&mut sub, &mut publ, n).await?;
    }
    drop(conns);
    let after = served_again(&edge).await?;
    let errors = metric(
        &reqwest::Client::new(),
        &edge.url("/metrics"),
        "outpost_accept_errors_total",
    )
    .await?;
    eprintln!(
        "out of descriptors: {errors} failed accepts; new clients served {:.2} s after the flood ended",
        after.as_secs_f64()
    );
    ensure!(errors > 0.0, "the flood never exhausted the descriptors");
    ensure!(
        edge.log().contains("accept failed; backing off"),
        "no warning in the log"
    );
    still_serving(&mut sub, &mut publ, 100).await?;
    Ok(())
}
