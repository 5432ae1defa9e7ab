//! The link recovers from what halted it or lost data before, between real processes:
//! backlogs of large events in both directions (and a state snapshot larger than a
//! frame), a cloud restored from an older backup while edges hold newer writes, and
//! a cloud killed and restarted at once while cross-edge traffic flows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outpost_tests::fleet::{connected, fleet, with_logs, Fleet, TOKEN_A, TOKEN_B};
use outpost_tests::{admin_token, eventually, free_udp_port, metric, Cloud, Edge, Ws};
use serde_json::{json, Value};

/// Publishes an event over REST to any endpoint; returns the acked dot.
async fn post(http: &reqwest::Client, base: &str, channel: &str, body: Value) -> Result<String> {
    let r = http
        .post(format!("{base}/v1/channels/{channel}/events"))
        .bearer_auth(admin_token())
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    ensure!(status == 200, "publish to {base} refused: {status} {v}");
    v["dot"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no dot in {v}"))
}

/// Every op of a channel at `base`: dot -> tag (`data.tag`), following pages.
async fn ops_at(
    http: &reqwest::Client,
    base: &str,
    channel: &str,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut since: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/channels/{channel}/history?limit=1000");
        if let Some(s) = &since {
            url.push_str(&format!("&since={s}"));
        }
        let v: Value = http
            .get(&url)
            .bearer_auth(admin_token())
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for op in v["ops"].as_array().into_iter().flatten() {
            out.insert(
                op["dot"].as_str().unwrap_or_default().to_owned(),
                op["data"]["tag"].as_str().unwrap_or_default().to_owned(),
            );
        }
        since = v["token"].as_str().map(str::to_owned);
        if v["more"] != true {
            return Ok(out);
        }
    }
}

/// ~61 KB of JSON, under the default 64 KiB message limit.
fn large(tag: &str) -> Value {
    json!({"event": "blob", "data": {"tag": tag, "blob": "x".repeat(61_000)}})
}

/// Reads ops from `ws` until `n` distinct dots of `channel` arrived.
async fn collect(
    ws: &mut Ws,
    channel: &str,
    n: usize,
    within: Duration,
) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + within;
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "{} of {n} ops of {channel} arrived",
            seen.len()
        );
        let m = ws.recv_within(left).await?;
        if m["type"] == "op" && m["channel"] == channel {
            seen.insert(m["dot"].as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_events_crosses_both_ways_after_an_outage() -> Result<()> {
    let mut f = fleet()?;
    with_logs(&mut f, |f| Box::pin(large_backlogs(f))).await
}

async fn large_backlogs(f: &mut Fleet) -> Result<()> {
    const N: usize = 300;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    let mut sub = Ws::connect(&f.b, &t).await?;
    sub.subscribe("project:big", None).await?;
    sub.subscribe("project:small", None).await?;

    // Edge -> cloud -> edge: 300 large events (18 MB) queued on edge A while the
    // cloud is down, and small events on another channel behind them.
    f.cloud.kill9();
    for i in 0..N {
        post(
            &http,
            &format!("http://{}", f.a.addr),
            "project:big",
            large(&format!("big-{i}")),
        )
        .await?;
    }
    for i in 0..20 {
        post(
            &http,
            &format!("http://{}", f.a.addr),
            "project:small",
            json!({"event": "small", "data": {"tag": format!("small-{i}")}}),
        )
        .await?;
    }
    let disconnects_before = metric(
        &http,
        &f.a.url("/metrics"),
        "outpost_uplink_disconnects_total",
    )
    .await?;
    tokio::task::block_in_place(|| f.cloud.restart())?;
    let back = Instant::now();
    let mut got = sub_collect_two(&mut sub, N).await?;
    let took = back.elapsed();
    got.0.extend(got.1);
    eprintln!(
        "edge A -> cloud -> edge B: {N} events of 61 KB + 20 small ones delivered {:.2} s after the cloud came back",
        took.as_secs_f64()
    );
    let disconnects = metric(
        &http,
        &f.a.url("/metrics"),
        "outpost_uplink_disconnects_total",
    )
    .await?
        - disconnects_before;
    ensure!(
        disconnects <= 1.0,
        "edge A's uplink reconnected {disconnects} times while the backlog crossed"
    );

    // Cloud -> edge: edge B is down while 300 large events reach the cloud; a new
    // subscriber on B after its restart gets all of them.
    f.b.kill9();
    let cloud = f.cloud.url("");
    for i in 0..N {
        post(&http, &cloud, "project:down", large(&format!("down-{i}"))).await?;
    }
    tokio::task::block_in_place(|| f.b.restart())?;
    let back = Instant::now();
    let mut sub = Ws::connect(&f.b, &t).await?;
    sub.subscribe("project:down", None).await?;
    collect(&mut sub, "project:down", N, Duration::from_secs(60)).await?;
    eprintln!(
        "cloud -> restarted edge B: {N} events of 61 KB delivered {:.2} s after the restart",
        back.elapsed().as_secs_f64()
    );
    let b_disconnects = metric(
        &http,
        &f.b.url("/metrics"),
        "outpost_uplink_disconnects_total",
    )
    .await?;
    ensure!(
        b_disconnects == 0.0,
        "edge B's uplink reconnected {b_disconnects} times while the backlog crossed"
    );
    Ok(())
}

/// Both channels of the first test: all large events and all small ones.
async fn sub_collect_two(sub: &mut Ws, n: usize) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let (mut big, mut small) = (BTreeSet::new(), BTreeSet::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while big.len() < n || small.len() < 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "edge B got {} of {n} large and {} of 20 small events",
            big.len(),
            small.len()
        );
        let m = sub.recv_within(left).await?;
        if m["type"] == "op" {
            let dot = m["dot"].as_str().unwrap_or_default().to_owned();
            match m["channel"].as_str() {
                Some("project:big") => big.insert(dot),
                Some("project:small") => small.insert(dot),
                _ => false,
            };
        }
    }
    Ok((big, small))
}

/// A state larger than a frame (200 keys of ~60 KB = 12 MB) reaches a new edge as a
/// snapshot (the cloud keeps 10 ops of history), and reaches an edge that evicted
/// the channel and writes to it again as a rebase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_larger_than_a_frame_travels_as_snapshot_and_rebase() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cloud = Cloud::start(
        &dir.path().join("cloud"),
        free_udp_port()?,
        &[("edge-a", TOKEN_A), ("edge-b", TOKEN_B)],
        "[history.default]\nmax_ops = 10\n",
    )?;
    let cache = "[cache]\nttl_secs = 1\nmax_bytes = 1\nsweep_secs = 1\n";
    let a = Edge::start(
        &dir.path().join("a"),
        &format!("{}\n{cache}", cloud.uplink_toml(TOKEN_A)),
    )?;
    let http = reqwest::Client::new();
    let r = snapshot_and_rebase(&http, &cloud, &a, dir.path()).await;
    r.map_err(|e| {
        e.context(format!(
            "--- cloud log\n{}\n--- edge A log\n{}",
            tail(&cloud.log()),
            tail(&a.log())
        ))
    })
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

async fn put_state(
    http: &reqwest::Client,
    base: &str,
    channel: &str,
    key: &str,
    v: &str,
) -> Result<()> {
    let r = http
        .put(format!("{base}/v1/channels/{channel}/state/{key}"))
        .bearer_auth(admin_token())
        .json(&json!({"value": {"v": v, "pad": "y".repeat(60_000)}}))
        .send()
        .await?;
    ensure!(r.status() == 200, "state write refused: {}", r.status());
    Ok(())
}

async fn state_values(
    http: &reqwest::Client,
    base: &str,
    channel: &str,
) -> Result<BTreeMap<String, String>> {
    let v: Value = http
        .get(format!("{base}/v1/channels/{channel}/state"))
        .bearer_auth(admin_token())
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| {
            Some((
                k["key"].as_str()?.to_owned(),
                k["value"]["v"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

async fn snapshot_and_rebase(
    http: &reqwest::Client,
    cloud: &Cloud,
    a: &Edge,
    dir: &std::path::Path,
) -> Result<()> {
    connected(http, cloud, 1.0).await?;
    let base = cloud.url("");
    for i in 0..200 {
        put_state(
            http,
            &base,
            "project:doc",
            &format!("k{i}"),
            &format!("cloud-{i}"),
        )
        .await?;
    }
    // A new edge: its first subscriber's fetch is behind the cloud's floor.
    let b = Edge::start(&dir.join("b"), &cloud.uplink_toml(TOKEN_B))?;
    let t = admin_token();
    let started = Instant::now();
    let mut sub = Ws::connect(&b, &t).await?;
    sub.subscribe("project:doc", None).await?;
    let b_base = format!("http://{}", b.addr);
    eventually(
        Duration::from_secs(30),
        "the 12 MB state on edge B",
        || async {
            Ok((state_values(http, &b_base, "project:doc").await?.len() == 200).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "a 12 MB state reached a new edge as a snapshot in parts in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    drop(sub);

    // Edge A writes to the channel, it is acked and evicted (cache ttl 1 s), then A
    // writes again: the cloud answers with a rebase of the whole state.
    let a_base = format!("http://{}", a.addr);
    put_state(http, &a_base, "project:doc", "k0", "edge-a-first").await?;
    eventually(
        Duration::from_secs(20),
        "edge A to evict project:doc",
        || async {
            let log = a.log();
            Ok(log.contains("evicted").then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    put_state(http, &a_base, "project:doc", "k1", "edge-a-second").await?;
    // A subscriber makes the re-opened channel ask the cloud for its base.
    let mut sub_a = Ws::connect(a, &t).await?;
    sub_a.subscribe("project:doc", None).await?;
    eventually(
        Duration::from_secs(30),
        "edge A's rebased state",
        || async {
            let s = state_values(http, &a_base, "project:doc").await?;
            Ok(
                (s.len() == 200 && s.get("k1").map(String::as_str) == Some("edge-a-second"))
                    .then_some(()),
            )
        },
    )
    .await?;
    eventually(
        Duration::from_secs(30),
        "the cloud to have edge A's writes",
        || async {
            let s = state_values(http, &base, "project:doc").await?;
            Ok((s.get("k0").map(String::as_str) == Some("edge-a-first")
                && s.get("k1").map(String::as_str) == Some("edge-a-second"))
            .then_some(()))
        },
    )
    .await?;
    let disconnects = metric(http, &a.url("/metrics"), "outpost_uplink_disconnects_total").await?;
    ensure!(
        disconnects == 0.0,
        "edge A's uplink reconnected {disconnects} times"
    );
    Ok(())
}

/// The cloud is backed up, takes more writes, and is restored from the older backup
/// while the edges hold the newer writes: nothing acked is lost, no dot names two
/// writes, and the edges (which pin the cloud's certificate) reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_restored_from_an_older_backup_loses_no_acknowledged_write() -> Result<()> {
    let mut f = fleet()?;
    with_logs(&mut f, |f| Box::pin(restore(f))).await
}

async fn restore(f: &mut Fleet) -> Result<()> {
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    // Subscribers keep the channel on both edges.
    let mut sub_a = Ws::connect(&f.a, &t).await?;
    sub_a.subscribe("project:r", None).await?;
    let mut sub_b = Ws::connect(&f.b, &t).await?;
    sub_b.subscribe("project:r", None).await?;
    let mut acked: BTreeMap<String, String> = BTreeMap::new(); // tag -> dot
    acked.extend(round(&http, f, "before", 20).await?);
    converged(&http, f, &acked).await?;

    let backup = f.cloud.dir.join("backup.jsonl");
    tokio::task::block_in_place(|| f.cloud.backup(&backup))?;
    connected(&http, &f.cloud, 2.0).await?;
    acked.extend(round(&http, f, "after-backup", 36).await?);
    converged(&http, f, &acked).await?;

    // Restore the older backup into a fresh data dir (certificate included).
    tokio::task::block_in_place(|| f.cloud.restore_from(&backup))?;
    connected(&http, &f.cloud, 2.0).await?;
    acked.extend(round(&http, f, "after-restore", 36).await?);
    let started = Instant::now();
    converged(&http, f, &acked).await?;
    eprintln!(
        "after restoring an older cloud backup: {} acked writes on all 3 replicas, converged {:.2} s after the last write",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `n` writes on each of the cloud, edge A and edge B: (tag, acked dot).
async fn round(
    http: &reqwest::Client,
    f: &Fleet,
    name: &str,
    n: usize,
) -> Result<Vec<(String, String)>> {
    let bases = [
        ("cloud", f.cloud.url("")),
        ("a", format!("http://{}", f.a.addr)),
        ("b", format!("http://{}", f.b.addr)),
    ];
    let mut out = Vec::new();
    for (who, base) in &bases {
        for i in 0..n {
            let tag = format!("{name}-{who}-{i}");
            let dot = post(
                http,
                base,
                "project:r",
                json!({"event": "e", "data": {"tag": tag}}),
            )
            .await?;
            out.push((tag, dot));
        }
    }
    Ok(out)
}

/// Waits until every replica holds every acked write under its acked dot, and the
/// same ops.
async fn converged(
    http: &reqwest::Client,
    f: &Fleet,
    acked: &BTreeMap<String, String>,
) -> Result<()> {
    let bases = [
        f.cloud.url(""),
        format!("http://{}", f.a.addr),
        format!("http://{}", f.b.addr),
    ];
    eventually(
        Duration::from_secs(30),
        "all acked writes on every replica",
        || async {
            let mut sets = Vec::new();
            for base in &bases {
                let ops = ops_at(http, base, "project:r").await?;
                let missing: Vec<&String> = acked
                    .iter()
                    .filter(|(tag, dot)| ops.get(*dot) != Some(*tag))
                    .map(|(t, _)| t)
                    .collect();
                if !missing.is_empty() {
                    eprintln!(
                        "{base} lacks {} acked writes (or holds others at their dots), e.g. {:?}",
                        missing.len(),
                        &missing[..missing.len().min(3)]
                    );
                    return Ok(None);
                }
                sets.push(ops);
            }
            Ok((sets[0] == sets[1] && sets[1] == sets[2]).then_some(()))
        },
    )
    .await
}

/// kill -9 of the cloud and a restart a second later, with ops flowing from edge A to
/// a subscriber on edge B, with the shipped link timers (keep-alive 500 ms, idle
/// timeout 10 s): delivery resumes within a second of the cloud being back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_edge_delivery_resumes_within_a_second_of_a_quick_cloud_restart() -> Result<()> {
    let mut f = fleet()?;
    // Edges and cloud with the shipped link timers instead of the test harness's.
    for e in [&mut f.a, &mut f.b] {
        shipped_link_timers(&e.dir.join("edge.toml"), "uplink")?;
        tokio::task::block_in_place(|| e.restart())?;
    }
    shipped_link_timers(&f.cloud.dir.join("cloud.toml"), "hub")?;
    tokio::task::block_in_place(|| f.cloud.restart())?;
    with_logs(&mut f, |f| Box::pin(quick_restarts(f))).await
}

/// Takes the test harness's short link timers out of a config's link section, so
/// the shipped defaults apply.
fn shipped_link_timers(path: &std::path::Path, section: &str) -> Result<()> {
    let mut t: toml::Table = std::fs::read_to_string(path)?.parse()?;
    let s = t
        .get_mut(section)
        .and_then(toml::Value::as_table_mut)
        .with_context(|| format!("no [{section}] in {}", path.display()))?;
    s.remove("keepalive_ms");
    s.remove("idle_timeout_ms");
    std::fs::write(path, t.to_string())?;
    Ok(())
}

async fn quick_restarts(f: &mut Fleet) -> Result<()> {
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    let mut sub = Ws::connect(&f.b, &t).await?;
    sub.subscribe("project:q", None).await?;
    let mut publ = Ws::connect(&f.a, &t).await?;
    let mut n = 0u64;
    let mut resumed = Vec::new();
    for round in 0..5 {
        // Traffic flows, then the cloud dies and is back a second later.
        for _ in 0..10 {
            n += 1;
            publ.request(
                json!({"type": "publish", "channel": "project:q", "event": "e", "data": {"n": n}}),
                n,
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f.cloud.kill9();
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::block_in_place(|| f.cloud.restart())?;
        let back = Instant::now();
        // Publish every 20 ms until one published after the restart reaches B.
        let first_after = n + 1;
        let took = loop {
            n += 1;
            publ.request(
                json!({"type": "publish", "channel": "project:q", "event": "e", "data": {"n": n}}),
                n,
            )
            .await?;
            if let Ok(m) = sub.recv_within(Duration::from_millis(20)).await {
                if m["type"] == "op" && m["data"]["n"].as_u64().is_some_and(|x| x >= first_after) {
                    break back.elapsed();
                }
            }
            ensure!(
                back.elapsed() < Duration::from_secs(20),
                "round {round}: no delivery within 20 s of the restart"
            );
        };
        eprintln!(
            "round {round}: cross-edge delivery resumed {:.0} ms after the cloud was back",
            took.as_secs_f64() * 1000.0
        );
        resumed.push(took);
        // Drain what is left before the next round.
        while sub.recv_within(Duration::from_millis(300)).await.is_ok() {}
    }
    resumed.sort();
    let (median, worst) = (resumed[resumed.len() / 2], resumed[resumed.len() - 1]);
    ensure!(
        median < Duration::from_secs(1) && worst < Duration::from_secs(2),
        "cross-edge delivery resumed after {resumed:?} (bound: 1 s; asserted: median under 1 s, worst under 2 s)"
    );
    Ok(())
}
