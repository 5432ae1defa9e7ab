//! `outpost-bench`: load and latency measurements against a running Outpost edge.
//!
//! - `idle`: opens N WebSocket connections (optionally subscribed) and reports the
//!   server's resident memory per connection (read from `/proc/PID/status`).
//! - `latency`: S subscribers on one channel, one publisher sending at a fixed rate
//!   on an open-loop schedule; latency is measured from each message's *scheduled*
//!   send time to its delivery (no coordinated omission), in an HDR histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(name = "outpost-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Idle connections: server RSS per connection.
    Idle {
        /// WebSocket URL of the edge, e.g. ws://127.0.0.1:7700/v1/ws
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// PID of the server whose memory to read.
        #[arg(long)]
        pid: u32,
        /// Subscribe each connection to this channel (otherwise just connected).
        #[arg(long)]
        channel: Option<String>,
    },
    /// Publish -> deliver latency at a fixed rate.
    Latency {
        /// Where the subscribers connect.
        #[arg(long)]
        url: String,
        /// Where the publisher connects (default: --url). Another edge measures the
        /// edge -> cloud -> edge path.
        #[arg(long)]
        publish_url: Option<String>,
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "bench:latency")]
        channel: String,
        #[arg(long, default_value_t = 1)]
        subs: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Payload padding in bytes.
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// Publish as durable events (default) or ephemeral messages.
        #[arg(long)]
        ephemeral: bool,
    },
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: &str) -> Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={token}")).await?;
    let hello = next_json(&mut ws).await?;
    if hello["type"] != "connected" {
        bail!("expected connected, got {hello}");
    }
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        match ws.next().await.context("closed")?? {
            Message::Text(t) => return Ok(serde_json::from_str(&t)?),
            Message::Close(f) => bail!("closed: {f:?}"),
            _ => {}
        }
    }
}

async fn subscribe(ws: &mut Ws, channel: &str) -> Result<()> {
    ws.send(Message::Text(
        json!({"type": "subscribe", "channel": channel})
            .to_string()
            .into(),
    ))
    .await?;
    loop {
        let v = next_json(ws).await?;
        if v["type"] == "subscribed" {
            return Ok(());
        }
        if v["type"] == "error" {
            bail!("subscribe: {v}");
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Idle {
            url,
            token,
            conns,
            pid,
            channel,
        } => {
            let before = rss_kib(pid)?;
            let mut all = Vec::with_capacity(conns);
            let started = Instant::now();
            for i in 0..conns {
                let mut ws = connect(&url, &token).await?;
                if let Some(c) = &channel {
                    subscribe(&mut ws, c).await?;
                }
                all.push(ws);
                if (i + 1) % 1000 == 0 {
                    eprintln!("  {} connections open ({:.1?})", i + 1, started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss_kib(pid)?;
            let per = (after.saturating_sub(before)) as f64 / conns as f64;
            println!(
                "idle: {conns} connections{}: server RSS {before} KiB -> {after} KiB = {per:.2} KiB per connection",
                channel.map(|c| format!(" subscribed to {c}")).unwrap_or_default()
            );
            drop(all);
        }
        Cmd::Latency {
            url,
            publish_url,
            token,
            channel,
            subs,
            rate,
            secs,
            size,
            ephemeral,
        } => {
            let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1_000,
                60_000_000_000,
                3,
            )?));
            let delivered = Arc::new(AtomicU64::new(0));
            let total = rate * secs;
            let mut tasks = Vec::new();
            for _ in 0..subs {
                let mut ws = connect(&url, &token).await?;
                subscribe(&mut ws, &channel).await?;
                let (hist, delivered) = (hist.clone(), delivered.clone());
                tasks.push(tokio::spawn(async move {
                    let mut local = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
                    let mut n = 0;
                    while n < total {
                        let Ok(Some(m)) =
                            tokio::time::timeout(Duration::from_secs(10), ws.next()).await
                        else {
                            break;
                        };
                        let Message::Text(t) = m? else { continue };
                        let v: Value = serde_json::from_str(&t)?;
                        if let Some(sched) = v["data"]["t"].as_u64() {
                            let _ = local.record(unix_ns().saturating_sub(sched).max(1_000));
                            n += 1;
                        }
                    }
                    delivered.fetch_add(n, Ordering::Relaxed);
                    hist.lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .add(&local)?;
                    anyhow::Ok(())
                }));
            }
            let publisher = connect(publish_url.as_deref().unwrap_or(&url), &token).await?;
            let pad = "p".repeat(size);
            let start_ns = unix_ns() + 50_000_000;
            let start = Instant::now() + Duration::from_millis(50);
            let interval_ns = 1_000_000_000 / rate.max(1);
            // Drain acks so the server never blocks on us.
            let (mut tx, mut rx) = publisher.split();
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
            for i in 0..total {
                let due = start + Duration::from_nanos(i * interval_ns);
                tokio::time::sleep_until(due.into()).await;
                let sched = start_ns + i * interval_ns;
                let msg = json!({"type": "publish", "channel": channel, "event": "bench",
                    "ephemeral": ephemeral, "data": {"t": sched, "pad": pad}});
                tx.send(Message::Text(msg.to_string().into())).await?;
            }
            for t in tasks {
                t.await??;
            }
            drain.abort();
            let h = hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
            let expected = total * subs as u64;
            let got = delivered.load(Ordering::Relaxed);
            println!(
                "latency: {rate} msg/s x {secs} s, {subs} subscriber(s), {size} B, {}: delivered {got}/{expected}; p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
                if ephemeral { "ephemeral" } else { "durable" },
                ms(0.5),
                ms(0.99),
                ms(0.999),
                h.max() as f64 / 1e6
            );
            if got != expected {
                bail!("lost deliveries: {got} of {expected}");
            }
        }
    }
    Ok(())
}
