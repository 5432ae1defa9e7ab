//! `outpost-bench`: load and latency measurements against a running Outpost edge.
//!
//! - `idle`: opens N WebSocket connections (optionally subscribed) and reports the
//!   server's resident memory per connection (read from `/proc/PID/status`).
//! - `latency`: S subscribers on one channel, one publisher sending at a fixed rate
//!   on an open-loop schedule; latency is measured from each message's *scheduled*
//!   send time to its delivery (no coordinated omission), in an HDR histogram.
//! - `fanout`: the same against Outpost, NATS (WebSocket), Socket.IO or a plain `ws`
//!   server, with subscribers spread over topics and 127.0.0.x source addresses, and
//!   the server's CPU time read from `/proc`; prints one JSON line of results.
//! - `idle-any`: idle connections of any of those protocols; server RSS per connection.

mod proto;

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
    /// Fan-out from one publisher to many subscribers, for any protocol.
    Fanout(FanoutArgs),
    /// Publishes N durable events on one channel over one WebSocket, keeping up to 256
    /// unacknowledged (an edge cut off from the cloud acknowledges locally).
    Burst {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "bench:heal")]
        channel: String,
        #[arg(long, default_value_t = 10_000)]
        n: u64,
        /// Spread the events round-robin over this many channels
        /// (`<channel>-<i>`); 1 = all on `channel`.
        #[arg(long, default_value_t = 1)]
        spread: u64,
        /// Parallel connections, each publishing n / conns events.
        #[arg(long, default_value_t = 1)]
        conns: u64,
    },
    /// Resume latency from channels that are not resident vs ones that are: takes a
    /// resume token after op `at` of `count` channels `<prefix><i>` (spread over
    /// `channels`), waits `settle_ms` (for the node to unload them), then times
    /// subscribe -> `subscribed` (replay included) with that token, twice per channel:
    /// cold, then again at once (resident).
    Resume {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "project:bulk-")]
        prefix: String,
        #[arg(long)]
        channels: u64,
        #[arg(long, default_value_t = 200)]
        count: u64,
        #[arg(long, default_value_t = 4)]
        at: usize,
        #[arg(long, default_value_t = 2500)]
        settle_ms: u64,
    },
    /// Subscribes on every edge and waits until each has seen `expect` ops on the
    /// channel; prints how long that took.
    Converge {
        /// Edge base URLs (ws://host:port), comma-separated.
        #[arg(long)]
        urls: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "bench:heal")]
        channel: String,
        #[arg(long)]
        expect: u64,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Idle connections of any protocol: server RSS per connection.
    IdleAny {
        #[arg(long, value_enum)]
        proto: proto::Proto,
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "")]
        token: String,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 4)]
        source_ips: u8,
        #[arg(long)]
        label: Option<String>,
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

/// `outpost-bench fanout`.
#[derive(Debug, clap::Args)]
struct FanoutArgs {
    #[arg(long, value_enum)]
    pub proto: proto::Proto,
    /// The server's base URL, e.g. ws://127.0.0.1:7700
    #[arg(long)]
    pub url: String,
    /// Outpost token (other protocols ignore it).
    #[arg(long, default_value = "")]
    pub token: String,
    #[arg(long, default_value_t = 100)]
    pub subs: usize,
    /// Subscriber i follows topic i % topics; the publisher round-robins.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Messages per second (all topics together).
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Outpost: ephemeral (never stored) instead of durable events.
    #[arg(long)]
    pub ephemeral: bool,
    /// The server's PID, to read its CPU time.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Spread subscribers over this many source addresses 127.0.0.2.. (ports).
    #[arg(long, default_value_t = 4)]
    pub source_ips: u8,
    /// A label for the results (e.g. "outpost-fsync").
    #[arg(long)]
    pub label: Option<String>,
    /// Where the publisher connects (default: --url); another edge measures the
    /// edge -> cloud -> edge path.
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Exit with an error unless every expected delivery arrived.
    #[arg(long)]
    pub require_all: bool,
    /// A shell command run when the measured window opens (after the subscriptions
    /// settle, before the first publish), e.g. `callgrind_control -z PID`.
    #[arg(long)]
    pub at_start: Option<String>,
    /// A shell command run when the window closes (every delivery in), e.g.
    /// `callgrind_control -d PID`.
    #[arg(long)]
    pub at_end: Option<String>,
}

/// Runs a window hook and waits for it.
fn hook(cmd: Option<&str>) -> Result<()> {
    if let Some(cmd) = cmd {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()?;
        if !st.success() {
            bail!("`{cmd}` failed: {st}");
        }
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

/// The server's CPU time so far, user and kernel (seconds), from `/proc/PID/stat`.
fn cpu_secs(pid: u32) -> Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = s.rsplit_once(") ").map(|(_, r)| r).context("stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Ok((ticks(11) as f64 / 100.0, ticks(12) as f64 / 100.0))
}

fn source_ip(i: usize, n: u8) -> Option<std::net::IpAddr> {
    (n > 0).then(|| std::net::IpAddr::from([127, 0, 0, 2 + (i % n as usize) as u8]))
}

/// The topic name for `proto`: channels for Outpost, subjects for NATS, rooms for
/// Socket.IO.
fn topic(p: proto::Proto, k: usize) -> String {
    match p {
        proto::Proto::Outpost => format!("bench:t{k}"),
        proto::Proto::Nats | proto::Proto::Jetstream => format!("bench.t{k}"),
        proto::Proto::Socketio | proto::Proto::Ws => format!("t{k}"),
    }
}

async fn fanout(args: FanoutArgs) -> Result<()> {
    let FanoutArgs {
        proto: p,
        url,
        token,
        subs,
        topics,
        rate,
        secs,
        size,
        ephemeral,
        pid,
        source_ips,
        label,
        publish_url,
        require_all,
        at_start,
        at_end,
    } = args;
    let topics = topics.max(1);
    if p == proto::Proto::Ws && topics > 1 {
        bail!("the ws peer broadcasts to everyone: one topic only");
    }
    let total = rate * secs;
    let per_topic = |k: usize| (total as usize + topics - 1 - k) / topics;
    let new_hist = || Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3);
    let hist = Arc::new(Mutex::new(new_hist()?));
    let delivered = Arc::new(AtomicU64::new(0));
    let publishing_done = Arc::new(tokio::sync::Notify::new());
    let done_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if p == proto::Proto::Jetstream {
        let mut ws = proto::connect(p, &url, &token, None).await?;
        proto::create_stream(&mut ws).await?;
    }
    // Connect subscribers, 256 at a time.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(subs);
    let mut connected = 0;
    while connected < subs {
        let batch: Vec<usize> = (connected..(connected + 256).min(subs)).collect();
        let conns = futures_util::future::join_all(batch.iter().map(|&i| {
            let (url, token) = (url.clone(), token.clone());
            async move {
                let mut ws = proto::connect(p, &url, &token, source_ip(i, source_ips)).await?;
                proto::subscribe(p, &mut ws, &topic(p, i % topics)).await?;
                anyhow::Ok((i, ws))
            }
        }))
        .await;
        for c in conns {
            let (i, mut ws) = c?;
            let expect = per_topic(i % topics) as u64;
            let (hist, delivered, done, done_flag) = (
                hist.clone(),
                delivered.clone(),
                publishing_done.clone(),
                done_flag.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut local = new_hist()?;
                let mut buf = Vec::new();
                let mut n = 0u64;
                while n < expect {
                    // After publishing ends, give stragglers 5 s, then count what came.
                    let wait = if done_flag.load(Ordering::Relaxed) {
                        Duration::from_secs(5)
                    } else {
                        Duration::from_secs(3600)
                    };
                    let m = tokio::select! {
                        m = tokio::time::timeout(wait, ws.next()) => m,
                        () = done.notified(), if !done_flag.load(Ordering::Relaxed) => continue,
                    };
                    let Ok(Some(Ok(m))) = m else { break };
                    let data: &[u8] = match &m {
                        Message::Text(t) => t.as_bytes(),
                        Message::Binary(b) => b,
                        _ => continue,
                    };
                    let parsed = proto::parse(p, data, &mut buf);
                    let now = unix_ns();
                    for t in parsed.times {
                        let _ = local.record(now.saturating_sub(t).max(1_000));
                        n += 1;
                    }
                    if let Some(r) = parsed.reply {
                        ws.send(Message::Text(r.into())).await?;
                    }
                }
                delivered.fetch_add(n, Ordering::Relaxed);
                hist.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .add(&local)?;
                // Kept open until the server's CPU time has been read: closing 10k
                // connections is not part of delivering.
                anyhow::Ok(ws)
            }));
        }
        connected += batch.len();
        if connected % 1000 == 0 || connected == subs {
            eprintln!(
                "  {connected}/{subs} subscribed ({:.1?})",
                started.elapsed()
            );
        }
    }
    let mut publisher =
        proto::connect(p, publish_url.as_deref().unwrap_or(&url), &token, None).await?;
    proto::prepare_publisher(p, &mut publisher).await?;
    if p == proto::Proto::Ws {
        // Make sure the broadcast server has registered everyone.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pad = "p".repeat(size);
    // Let the server finish the subscriptions' work before the CPU window opens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    hook(at_start.as_deref())?;
    let cpu_before = pid.map(cpu_secs).transpose()?;
    let t0 = Instant::now() + Duration::from_millis(50);
    let t0_ns = unix_ns() + 50_000_000;
    let interval_ns = 1_000_000_000 / rate.max(1);
    let (mut tx, mut rx) = publisher.split();
    // Drain replies (acks, pings) so the server never blocks on the publisher.
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    for i in 0..total {
        let due = t0 + Duration::from_nanos(i * interval_ns);
        tokio::time::sleep_until(due.into()).await;
        let k = i as usize % topics;
        tx.send(proto::publish_frame(
            p,
            &topic(p, k),
            t0_ns + i * interval_ns,
            &pad,
            ephemeral,
        ))
        .await?;
    }
    done_flag.store(true, Ordering::Relaxed);
    publishing_done.notify_waiters();
    let mut open = Vec::with_capacity(tasks.len());
    for t in tasks {
        open.push(t.await??);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu, cpu_user) = match (pid, cpu_before) {
        (Some(pid), Some((u0, s0))) => {
            let (u1, s1) = cpu_secs(pid)?;
            (Some(u1 - u0 + s1 - s0), Some(u1 - u0))
        }
        _ => (None, None),
    };
    // After the CPU reading: a hook's own work (a profile dump) is not delivery.
    hook(at_end.as_deref())?;
    drop(open);
    drain.abort();
    let h = hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
    let expected: u64 = (0..subs).map(|i| per_topic(i % topics) as u64).sum();
    let got = delivered.load(Ordering::Relaxed);
    let label = label.unwrap_or_else(|| p.name().to_owned());
    let out = json!({
        "label": label, "proto": p.name(), "subs": subs, "topics": topics, "rate": rate,
        "secs": secs, "size": size, "sent": total, "expected": expected, "delivered": got,
        "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": h.max() as f64 / 1e6,
        "deliveries_per_s": got as f64 / elapsed,
        "server_cpu_s": cpu,
        "server_user_s": cpu_user,
        "cpu_s_per_1m": cpu.map(|c| c / (got.max(1) as f64) * 1e6),
    });
    eprintln!(
        "fanout {label}: {rate} msg/s x {secs} s to {subs} subscribers over {topics} topic(s): delivered {got}/{expected}; p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms; server CPU {}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        cpu.map(|c| format!("{c:.2} s")).unwrap_or_else(|| "n/a".into())
    );
    println!("{out}");
    if require_all && got != expected {
        bail!("lost deliveries: {got} of {expected}");
    }
    Ok(())
}

/// `burst` over `conns` connections in parallel: prints the total rate.
async fn bursts(
    url: String,
    token: String,
    channel: String,
    n: u64,
    spread: u64,
    conns: u64,
) -> Result<()> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns.max(1) {
        let (url, token, channel) = (url.clone(), token.clone(), channel.clone());
        let share = n / conns.max(1);
        tasks.push(tokio::spawn(async move {
            burst(url, token, channel, share, spread, c * share).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"bench": "burst", "events": n, "channels": spread, "conns": conns, "secs": secs, "acked_per_sec": n as f64 / secs})
    );
    Ok(())
}

async fn burst(
    url: String,
    token: String,
    channel: String,
    n: u64,
    spread: u64,
    offset: u64,
) -> Result<()> {
    let ws = proto::connect(proto::Proto::Outpost, &url, &token, None).await?;
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let counter = acked.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Text(t) = m {
                if t.contains("\"type\":\"ack\"") {
                    counter.fetch_add(1, Ordering::Relaxed);
                } else if t.contains("\"type\":\"error\"") {
                    bail!("publish refused: {t}");
                }
            }
        }
        anyhow::Ok(())
    });
    for i in 0..n {
        while i.saturating_sub(acked.load(Ordering::Relaxed)) >= 256 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let ch = if spread > 1 {
            format!("{channel}-{}", (offset + i) % spread)
        } else {
            channel.clone()
        };
        let m = format!(
            "{{\"type\":\"publish\",\"id\":{i},\"channel\":\"{ch}\",\"event\":\"b\",\"data\":{{\"n\":{i}}}}}"
        );
        tx.send(Message::Text(m.into())).await?;
    }
    while acked.load(Ordering::Relaxed) < n {
        if reader.is_finished() {
            reader.await??;
            bail!(
                "connection ended after {} acks",
                acked.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reader.abort();
    eprintln!(
        "burst: {n} events acked in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Subscribes (with `since` when given) and reads until `subscribed`; returns the
/// replayed ops.
async fn subscribe_since(ws: &mut Ws, channel: &str, since: Option<&str>) -> Result<Vec<Value>> {
    let mut req = json!({"type": "subscribe", "channel": channel});
    if let Some(s) = since {
        req["since"] = s.into();
    }
    ws.send(Message::Text(req.to_string().into())).await?;
    let mut ops = Vec::new();
    loop {
        let v = next_json(ws).await?;
        match v["type"].as_str() {
            Some("op") => ops.push(v),
            Some("subscribed") => return Ok(ops),
            Some("error") => bail!("subscribe: {v}"),
            _ => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn resume(
    url: String,
    token: String,
    prefix: String,
    channels: u64,
    count: u64,
    at: usize,
    settle_ms: u64,
) -> Result<()> {
    let step = (channels / count.max(1)).max(1);
    let names: Vec<String> = (0..count.min(channels))
        .map(|i| format!("{prefix}{}", i * step))
        .collect();
    let mut tokens = Vec::new();
    for ch in &names {
        let mut ws = connect(&url, &token).await?;
        let ops = subscribe_since(&mut ws, ch, None).await?;
        let t = ops
            .get(at.saturating_sub(1))
            .and_then(|o| o["token"].as_str())
            .with_context(|| format!("{ch}: fewer than {at} ops"))?;
        tokens.push((ch.clone(), t.to_owned(), ops.len() - at));
    }
    tokio::time::sleep(Duration::from_millis(settle_ms)).await;
    let mut cold = Histogram::<u64>::new(3)?;
    let mut warm = Histogram::<u64>::new(3)?;
    for (ch, t, expect) in &tokens {
        let mut ws = connect(&url, &token).await?;
        for hist in [&mut cold, &mut warm] {
            let started = Instant::now();
            let ops = subscribe_since(&mut ws, ch, Some(t)).await?;
            hist.record(started.elapsed().as_micros() as u64)?;
            if ops.len() != *expect {
                bail!("{ch}: resume replayed {} ops, expected {expect}", ops.len());
            }
            ws.send(Message::Text(
                json!({"type": "unsubscribe", "channel": ch})
                    .to_string()
                    .into(),
            ))
            .await?;
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{}",
        json!({
            "bench": "resume", "resumes": tokens.len(),
            "cold_p50_ms": ms(&cold, 0.5), "cold_p99_ms": ms(&cold, 0.99),
            "warm_p50_ms": ms(&warm, 0.5), "warm_p99_ms": ms(&warm, 0.99),
        })
    );
    Ok(())
}

async fn converge(
    urls: String,
    token: String,
    channel: String,
    expect: u64,
    timeout_secs: u64,
) -> Result<()> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for url in urls.split(',') {
        let (url, token, channel) = (url.to_owned(), token.clone(), channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut since: Option<String> = None;
            // A burst can overflow the subscriber's queue (close 4100): resume with
            // the last token, as a client would.
            while n < expect {
                let mut ws = proto::connect(proto::Proto::Outpost, &url, &token, None).await?;
                let sub = match &since {
                    Some(t) => format!(
                        "{{\"type\":\"subscribe\",\"channel\":\"{channel}\",\"since\":\"{t}\"}}"
                    ),
                    None => format!("{{\"type\":\"subscribe\",\"channel\":\"{channel}\"}}"),
                };
                ws.send(Message::Text(sub.into())).await?;
                while n < expect {
                    let m = tokio::time::timeout(Duration::from_secs(timeout_secs), ws.next())
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!("{url}: {n} of {expect} ops after {timeout_secs} s")
                        })?;
                    let Some(Ok(Message::Text(t))) = m else {
                        break;
                    };
                    if t.contains("\"type\":\"op\"") {
                        n += 1;
                        let v: Value = serde_json::from_str(&t)?;
                        since = v["token"].as_str().map(str::to_owned);
                    }
                }
            }
            anyhow::Ok(started.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await??);
    }
    eprintln!(
        "converge: every edge holds {expect} ops after {:.2} s",
        slowest.as_secs_f64()
    );
    println!(
        "{}",
        json!({"label": "heal", "expect": expect, "converged_s": slowest.as_secs_f64()})
    );
    Ok(())
}

async fn idle_any(
    p: proto::Proto,
    url: String,
    token: String,
    conns: usize,
    pid: u32,
    source_ips: u8,
    label: Option<String>,
) -> Result<()> {
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let mut all = Vec::with_capacity(conns);
    let mut i = 0;
    while i < conns {
        let batch: Vec<usize> = (i..(i + 256).min(conns)).collect();
        let opened = futures_util::future::join_all(batch.iter().map(|&k| {
            let (url, token) = (url.clone(), token.clone());
            async move { proto::connect(p, &url, &token, source_ip(k, source_ips)).await }
        }))
        .await;
        for ws in opened {
            all.push(ws?);
        }
        i += batch.len();
        if i % 1000 == 0 || i == conns {
            eprintln!("  {i}/{conns} open ({:.1?})", started.elapsed());
        }
    }
    // Let the server settle, answering pings meanwhile (Engine.IO, NATS).
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = rss_kib(pid)?;
    let per = after.saturating_sub(before) as f64 / conns as f64;
    let label = label.unwrap_or_else(|| p.name().to_owned());
    eprintln!("idle {label}: {conns} connections: server RSS {before} KiB -> {after} KiB = {per:.2} KiB per connection");
    println!(
        "{}",
        json!({"label": label, "proto": p.name(), "conns": conns, "rss_before_kib": before, "rss_after_kib": after, "kib_per_conn": per})
    );
    drop(all);
    Ok(())
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
        Cmd::Fanout(args) => fanout(args).await?,
        Cmd::Burst {
            url,
            token,
            channel,
            n,
            spread,
            conns,
        } => bursts(url, token, channel, n, spread, conns).await?,
        Cmd::Resume {
            url,
            token,
            prefix,
            channels,
            count,
            at,
            settle_ms,
        } => resume(url, token, prefix, channels, count, at, settle_ms).await?,
        Cmd::Converge {
            urls,
            token,
            channel,
            expect,
            timeout_secs,
        } => converge(urls, token, channel, expect, timeout_secs).await?,
        Cmd::IdleAny {
            proto,
            url,
            token,
            conns,
            pid,
            source_ips,
            label,
        } => idle_any(proto, url, token, conns, pid, source_ips, label).await?,
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
