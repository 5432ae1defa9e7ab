//! Cloud + edges as real processes over QUIC on loopback: cross-edge delivery, the
//! cloud going away and coming back, partitions with concurrent writes, edges killed
//! mid-stream, client failover between endpoints, refused and hostile links.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::StreamExt;
use outpost_tests::fleet::{
    browser_ready, connected, fleet, fleet_with, with_logs, Fleet, OPERATOR_KEY, TOKEN_A,
};
use outpost_tests::{admin_token, eventually, metric, publish, Edge, Sse, Ws};
use serde_json::{json, Value};

async fn history(http: &reqwest::Client, base: String, channel: &str) -> Result<Vec<Value>> {
    let v: Value = http
        .get(format!("{base}/v1/channels/{channel}/history?limit=1000"))
        .bearer_auth(admin_token())
        .send()
        .await?
        .json()
        .await?;
    Ok(v["ops"].as_array().cloned().unwrap_or_default())
}

fn dots(ops: &[Value]) -> BTreeSet<String> {
    ops.iter()
        .filter_map(|o| o["dot"].as_str().map(str::to_owned))
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_published_on_edge_a_reaches_a_subscriber_on_edge_b() -> Result<()> {
    let f = fleet()?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    let mut sub = Ws::connect(&f.b, &t).await?;
    sub.subscribe("project:x", None).await?;
    let mut publ = Ws::connect(&f.a, &t).await?;
    // Warm-up: the first op also waits for B's interest to reach the cloud.
    publ.request(
        json!({"type": "publish", "channel": "project:x", "event": "warm"}),
        1,
    )
    .await?;
    sub.recv_until(|m| m["type"] == "op").await?;
    let mut lat = Vec::new();
    for i in 0..200u64 {
        let sent = Instant::now();
        publ.send(
            json!({"type": "publish", "channel": "project:x", "event": "e", "data": {"n": i}}),
        )
        .await?;
        let op = sub.recv_until(|m| m["type"] == "op").await?;
        lat.push(sent.elapsed().as_secs_f64() * 1000.0);
        ensure!(op["data"]["n"] == i, "out of order: {op} at {i}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lat.sort_by(f64::total_cmp);
    eprintln!(
        "edge A -> cloud -> edge B publish->deliver over {} ops (debug build, fsync on both hops): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_keep_serving_without_the_cloud_and_converge_when_it_returns() -> Result<()> {
    let mut f = fleet()?;
    with_logs(&mut f, |f| Box::pin(cloud_outage(f))).await
}

async fn cloud_outage(f: &mut Fleet) -> Result<()> {
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    let mut sub_a = Ws::connect(&f.a, &t).await?;
    sub_a.subscribe("project:p", None).await?;
    let mut sub_b = Ws::connect(&f.b, &t).await?;
    sub_b.subscribe("project:p", None).await?;
    f.cloud.kill9();
    // Writes on both edges are accepted, acked and delivered locally.
    for i in 0..20 {
        let (s, _) = publish(
            &http,
            &f.a,
            &t,
            "project:p",
            json!({"event": "a", "data": {"n": i}}),
        )
        .await?;
        ensure!(s == 200, "edge A refused a write without the cloud");
        let (s, _) = publish(
            &http,
            &f.b,
            &t,
            "project:p",
            json!({"event": "b", "data": {"n": i}}),
        )
        .await?;
        ensure!(s == 200, "edge B refused a write without the cloud");
    }
    // Concurrent writes to one key on both sides of the partition.
    for (edge, v) in [(&f.a, "from-a"), (&f.b, "from-b")] {
        let r = http
            .put(edge.url("/v1/channels/project:p/state/owner"))
            .bearer_auth(&t)
            .json(&json!({"value": v}))
            .send()
            .await?;
        ensure!(r.status() == 200);
    }
    for i in 0..20 {
        let op = sub_a
            .recv_until(|m| m["type"] == "op" && m["event"] == "a")
            .await?;
        ensure!(op["data"]["n"] == i);
        let op = sub_b
            .recv_until(|m| m["type"] == "op" && m["event"] == "b")
            .await?;
        ensure!(op["data"]["n"] == i);
    }
    f.cloud.restart()?;
    // B's subscriber gets A's partition-time ops, in A's order; and vice versa.
    for i in 0..20 {
        let op = sub_b
            .recv_until(|m| m["type"] == "op" && m["event"] == "a")
            .await?;
        ensure!(
            op["data"]["n"] == i,
            "B saw A's ops out of order: {op} at {i}"
        );
        let op = sub_a
            .recv_until(|m| m["type"] == "op" && m["event"] == "b")
            .await?;
        ensure!(
            op["data"]["n"] == i,
            "A saw B's ops out of order: {op} at {i}"
        );
    }
    // Everything converges: same history set, same state winner with both siblings.
    let want = 42; // 20 + 20 events, 2 state writes
    let ends = [f.cloud.url(""), f.a.url(""), f.b.url("")];
    for base in &ends {
        eventually(Duration::from_secs(20), "convergence", || async {
            Ok((history(&http, base.clone(), "project:p").await?.len() == want).then_some(()))
        })
        .await?;
    }
    let sets: Vec<BTreeSet<String>> = futures_util::future::try_join_all(
        ends.iter().map(|b| history(&http, b.clone(), "project:p")),
    )
    .await?
    .iter()
    .map(|o| dots(o))
    .collect();
    ensure!(sets[0] == sets[1] && sets[1] == sets[2], "histories differ");
    let mut winners = Vec::new();
    for base in &ends {
        let s: Value = http
            .get(format!(
                "{base}/v1/channels/project:p/state/owner?siblings=true"
            ))
            .bearer_auth(&t)
            .send()
            .await?
            .json()
            .await?;
        ensure!(
            s["conflict"] == true,
            "the concurrent write was not kept: {s}"
        );
        ensure!(s["siblings"].as_array().map(Vec::len) == Some(2), "{s}");
        winners.push(s["value"].clone());
    }
    ensure!(
        winners[0] == winners[1] && winners[1] == winners[2],
        "winners differ: {winners:?}"
    );
    let conflicts = metric(&http, &f.cloud.url("/metrics"), "outpost_conflicts_total").await?;
    ensure!(conflicts >= 1.0, "the cloud recorded no conflict");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_stream_replays_its_outbox_after_restart() -> Result<()> {
    let mut f = fleet()?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    // Edge B holds the channel because a client of it subscribes.
    let mut watcher = Ws::connect(&f.b, &t).await?;
    watcher.subscribe("project:k", None).await?;
    let url = f.a.url("/v1/channels/project:k/events");
    let publisher = {
        let (http, t) = (http.clone(), t.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..100_000 {
                let r = http
                    .post(&url)
                    .bearer_auth(&t)
                    .json(&json!({"event": "tick", "data": {"n": i}}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap_or_default();
                        if let Some(d) = v["dot"].as_str() {
                            acked.push(d.to_owned());
                        }
                    }
                    _ => break,
                }
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    f.a.kill9();
    let acked = publisher.await?;
    ensure!(
        acked.len() > 10,
        "only {} writes were acked before the kill",
        acked.len()
    );
    f.a.restart()?;
    let want: BTreeSet<String> = acked.into_iter().collect();
    for base in [f.cloud.url(""), f.b.url("")] {
        eventually(Duration::from_secs(20), "the outbox to replay", || async {
            let have = dots(&history(&http, base.clone(), "project:k").await?);
            Ok(want.is_subset(&have).then_some(()))
        })
        .await
        .with_context(|| format!("acked ops missing at {base} (cloud is {})", f.cloud.url("")))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_dead_edge_resumes_on_another_endpoint_without_a_gap() -> Result<()> {
    let mut f = fleet()?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    let mut ws = Ws::connect(&f.a, &t).await?;
    ws.subscribe("project:f", None).await?;
    // A backend service publishes through the cloud, 200 events/s.
    let cloud_url = f.cloud.url("/v1/channels/project:f/events");
    let publisher = {
        let (http, t) = (http.clone(), t.clone());
        tokio::spawn(async move {
            for i in 0..600 {
                let _ = http
                    .post(&cloud_url)
                    .bearer_auth(&t)
                    .json(&json!({"event": "job", "data": {"n": i}}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut got: Vec<i64> = Vec::new();
    let mut token = None;
    while got.len() < 100 {
        let op = ws.recv_until(|m| m["type"] == "op").await?;
        got.push(op["data"]["n"].as_i64().unwrap_or(-1));
        token = op["token"].as_str().map(str::to_owned);
    }
    f.a.kill9();
    let killed = Instant::now();
    // The client notices and moves to the next endpoint with its token.
    let _ = ws.close_code(Duration::from_secs(5)).await;
    let mut ws = Ws::connect(&f.b, &t).await?;
    let (replay, _) = ws.subscribe("project:f", token.as_deref()).await?;
    let mut first = None;
    for op in &replay {
        first.get_or_insert_with(|| killed.elapsed());
        got.push(op["data"]["n"].as_i64().unwrap_or(-1));
    }
    while got.len() < 600 {
        let op = ws.recv_until(|m| m["type"] == "op").await?;
        first.get_or_insert_with(|| killed.elapsed());
        got.push(op["data"]["n"].as_i64().unwrap_or(-1));
    }
    publisher.await?;
    ensure!(
        got == (0..600).collect::<Vec<_>>(),
        "gap or disorder after failover"
    );
    eprintln!(
        "failover: edge A killed -> first op delivered by edge B after {:.1} ms",
        first.unwrap_or_default().as_secs_f64() * 1000.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edges_and_hostile_frames_are_refused_and_others_keep_working() -> Result<()> {
    let f = fleet()?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let dir = tempfile::tempdir()?;
    // Wrong credential.
    let wrong = Edge::start(
        &dir.path().join("wrong"),
        &f.cloud.uplink_toml("not-a-known-edge-token"),
    )?;
    eventually(Duration::from_secs(10), "the refusal", || async {
        Ok((metric(
            &http,
            &wrong.url("/metrics"),
            "outpost_uplink_refusals_total",
        )
        .await?
            >= 1.0)
            .then_some(()))
    })
    .await?;
    ensure!(
        f.cloud.log().contains("refused an unknown edge"),
        "cloud did not log the refusal"
    );
    // A certificate pin that does not match.
    let bad_pin = f
        .cloud
        .uplink_toml(TOKEN_A)
        .replace(&f.cloud.fingerprint, &"0".repeat(64));
    let unpinned = Edge::start(&dir.path().join("unpinned"), &bad_pin)?;
    eventually(Duration::from_secs(10), "the TLS failure", || async {
        Ok(unpinned
            .log()
            .contains("does not match the pinned fingerprint")
            .then_some(()))
    })
    .await?;
    // Both still serve their own clients.
    let t = admin_token();
    let (s, _) = publish(&http, &wrong, &t, "project:z", json!({"event": "local"})).await?;
    ensure!(s == 200);
    // Garbage, a bad first frame, and an oversized length on a real QUIC link.
    let pinned = edge::config::UplinkConfig {
        endpoints: vec![f.cloud.quic.to_string()],
        token: TOKEN_A.into(),
        pin_sha256: Some(f.cloud.fingerprint.clone()),
        ..Default::default()
    };
    let client = edge::link::tls::client_config(&pinned)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client);
    for (bytes, code) in [
        (b"\x00\x00\x00\x05\x01garbage!".to_vec(), 4400u32),
        (vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3], 4413u32),
    ] {
        let conn = endpoint.connect(f.cloud.quic, "outpost-cloud")?.await?;
        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(&bytes).await?;
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await?;
        match reason {
            quinn::ConnectionError::ApplicationClosed(c) => {
                ensure!(
                    u64::from(c.error_code) == u64::from(code),
                    "closed with {c:?}, wanted {code}"
                )
            }
            other => anyhow::bail!("closed with {other:?}, wanted {code}"),
        }
    }
    // UDP garbage at the QUIC port is ignored.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    for _ in 0..100 {
        udp.send_to(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3], f.cloud.quic)?;
    }
    // The real edges still replicate.
    let mut sub = Ws::connect(&f.b, &t).await?;
    sub.subscribe("project:still", None).await?;
    publish(&http, &f.a, &t, "project:still", json!({"event": "alive"})).await?;
    let op = sub.recv_until(|m| m["type"] == "op").await?;
    ensure!(op["event"] == "alive");
    ensure!(metric(&http, &f.cloud.url("/metrics"), "outpost_edges_connected").await? == 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_channels_are_evicted_and_fetched_again_by_the_next_subscriber() -> Result<()> {
    let f = fleet_with("[cache]\nttl_secs = 1\nsweep_secs = 1\n")?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    for i in 0..10 {
        let (s, _) = publish(
            &http,
            &f.a,
            &t,
            "project:cache",
            json!({"event": "e", "data": {"n": i}}),
        )
        .await?;
        ensure!(s == 200);
    }
    // Acked by the cloud, no local subscriber: evicted after the TTL.
    let a_metrics = f.a.url("/metrics");
    eventually(Duration::from_secs(15), "the eviction", || async {
        Ok(
            (metric(&http, &a_metrics, "outpost_cache_evictions_total").await? >= 1.0)
                .then_some(()),
        )
    })
    .await?;
    ensure!(
        history(&http, f.cloud.url(""), "project:cache")
            .await?
            .len()
            == 10
    );
    // The next subscriber makes the edge fetch the channel from the cloud.
    // (It catches up before answering, so the ops come as the replay, before
    // `subscribed`, as PROTOCOL.md says.)
    let mut ws = Ws::connect(&f.a, &t).await?;
    let (mut ops, subscribed) = ws.subscribe("project:cache", None).await?;
    ensure!(subscribed["replayed"] == 10, "{subscribed}");
    while ops.len() < 10 {
        ops.push(ws.recv_until(|m| m["type"] == "op").await?);
    }
    for (i, op) in ops.iter().enumerate() {
        ensure!(op["data"]["n"] == i, "{op}");
    }
    // The cloud exports per-edge link figures.
    let m = http
        .get(f.cloud.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        m.contains("outpost_edge_rtt_ms") && m.contains("outpost_edge_outbox_ops"),
        "{m}"
    );
    Ok(())
}

fn outpost(url: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = std::process::Command::new(outpost_tests::bin("outpost")?)
        .args(args)
        .env("OUTPOST_URL", url)
        .env("OUTPOST_OPERATOR_KEY", OPERATOR_KEY)
        .env("OUTPOST_TOKEN", admin_token())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_the_fleet_read_the_reconciliation_report_and_drain_and_revoke() -> Result<()>
{
    let mut f = fleet()?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    let cloud = f.cloud.url("");
    // The operator API needs the operator key.
    let r = http
        .get(f.cloud.url("/v1/admin/edges"))
        .bearer_auth(&t)
        .send()
        .await?;
    ensure!(r.status() == 401, "a client token opened the operator API");
    let (ok, out, err) = outpost(&cloud, &["edges"])?;
    ensure!(
        ok && out.contains("edge-a") && out.contains("edge-b") && out.contains("connected"),
        "{out}{err}"
    );
    // A concurrent write during a partition shows up in the reconciliation report.
    let mut sub = Ws::connect(&f.b, &t).await?;
    sub.subscribe("project:r", None).await?;
    f.cloud.kill9();
    for (edge, v) in [(&f.a, "a-wins?"), (&f.b, "b-wins?")] {
        let r = http
            .put(edge.url("/v1/channels/project:r/state/doc-title"))
            .bearer_auth(&t)
            .json(&json!({"value": v}))
            .send()
            .await?;
        ensure!(r.status() == 200);
    }
    f.cloud.restart()?;
    let cloud = f.cloud.url("");
    connected(&http, &f.cloud, 2.0).await?;
    let report = eventually(Duration::from_secs(20), "a reconciliation entry", || {
        let (http, url) = (
            http.clone(),
            f.cloud.url("/v1/admin/conflicts?channel=project:r"),
        );
        async move {
            let v: Value = http
                .get(url)
                .bearer_auth(OPERATOR_KEY)
                .send()
                .await?
                .json()
                .await?;
            Ok(v["conflicts"].as_array().filter(|a| !a.is_empty()).cloned())
        }
    })
    .await?;
    let c = &report[0];
    ensure!(
        c["key"] == "doc-title" && c["losers"].as_array().map(Vec::len) == Some(1),
        "{c}"
    );
    let origins: BTreeSet<String> = [
        c["winner"]["origin_edge"].clone(),
        c["losers"][0]["origin_edge"].clone(),
    ]
    .iter()
    .filter_map(|v| v.as_str().map(str::to_owned))
    .collect();
    ensure!(
        origins == BTreeSet::from(["edge-a".to_owned(), "edge-b".to_owned()]),
        "{c}"
    );
    let (ok, out, _) = outpost(&cloud, &["conflicts", "--channel", "project:r"])?;
    ensure!(
        ok && out.contains("doc-title") && out.contains("won") && out.contains("lost"),
        "{out}"
    );
    // Channels and the timeline.
    let (ok, out, _) = outpost(&cloud, &["channels"])?;
    ensure!(ok && out.contains("project:r"), "{out}");
    let (ok, out, _) = outpost(&cloud, &["timeline"])?;
    ensure!(ok && out.contains("joined"), "{out}");
    // CLI publish and tail through an edge.
    let (ok, dot, err) = outpost(
        &f.a.url(""),
        &["publish", "project:r", "ingest.job.created", r#"{"job":5}"#],
    )?;
    ensure!(ok && dot.contains(':'), "{dot}{err}");
    let (ok, out, err) = outpost(&f.a.url(""), &["tail", "project:r", "--count", "3"])?;
    ensure!(
        ok && out.lines().count() == 3 && out.contains("ingest.job.created"),
        "{out}{err}"
    );
    // Edge A reports its clients; evicting a channel A holds without subscribers works.
    let (ok, out, _) = outpost(&cloud, &["edges", "--json"])?;
    ensure!(ok && out.contains("\"clients\""), "{out}");
    let (ok, _, err) = outpost(&cloud, &["evict", "project:r"])?;
    ensure!(ok, "{err}");
    let a_metrics = f.a.url("/metrics");
    eventually(
        Duration::from_secs(10),
        "the operator eviction on edge A",
        || async {
            Ok(
                (metric(&http, &a_metrics, "outpost_cache_evictions_total").await? >= 1.0)
                    .then_some(()),
            )
        },
    )
    .await?;
    // Drain edge B: its client is told to go elsewhere, it stops being ready.
    let (ok, _, err) = outpost(&cloud, &["drain", "edge-b"])?;
    ensure!(ok, "{err}");
    let code = sub.close_code(Duration::from_secs(5)).await?;
    ensure!(code == Some(4101), "close code {code:?}");
    let ready = http.get(f.b.url("/readyz")).send().await?.status();
    ensure!(ready == 503, "drained edge still ready: {ready}");
    // Revoke edge B: its link drops and it cannot come back.
    let (ok, _, err) = outpost(&cloud, &["revoke", "edge-b"])?;
    ensure!(ok, "{err}");
    connected(&http, &f.cloud, 1.0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        metric(&http, &f.cloud.url("/metrics"), "outpost_edges_connected").await? == 1.0,
        "revoked edge reconnected"
    );
    ensure!(
        f.cloud.log().contains("refused a revoked edge"),
        "no refusal logged"
    );
    let (ok, out, _) = outpost(&cloud, &["timeline"])?;
    for kind in ["drained", "revoked", "left", "refused"] {
        ensure!(ok && out.contains(kind), "timeline lacks {kind}: {out}");
    }
    // The timeline outlives a crash of the cloud (saved within a second of a change).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    f.cloud.restart()?;
    let cloud = f.cloud.url("");
    let (ok, out, _) = outpost(&cloud, &["timeline"])?;
    for kind in ["drained", "revoked", "left"] {
        ensure!(
            ok && out.contains(kind),
            "timeline after a restart lacks {kind}: {out}"
        );
    }
    // A wrong operator key gets a clear error.
    let out = std::process::Command::new(outpost_tests::bin("outpost")?)
        .args(["edges", "--url", &cloud, "--operator-key", "opk_wrong"])
        .output()?;
    ensure!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unauthorized"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_a_dead_edge_and_the_reconciliation_report() -> Result<()> {
    if !browser_ready()? {
        return Ok(());
    }
    let mut f = fleet()?;
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    // A partition with a concurrent write, so the report has an entry — under a key
    // a hostile client chose: the dashboard must show it as text, never run it.
    const HOSTILE: &str = "<img src=x onerror=\"document.title='pwned'\">";
    let key: String = HOSTILE
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    f.cloud.kill9();
    for (edge, v) in [(&f.a, "left"), (&f.b, "right")] {
        http.put(edge.url(&format!("/v1/channels/project:dash/state/{key}")))
            .bearer_auth(&t)
            .json(&json!({"value": v}))
            .send()
            .await?;
    }
    f.cloud.restart()?;
    connected(&http, &f.cloud, 2.0).await?;
    // Some traffic for the sparklines.
    for i in 0..30 {
        publish(
            &http,
            &f.a,
            &t,
            "project:dash",
            json!({"event": "ingest.job.updated", "data": {"n": i}}),
        )
        .await?;
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let pid = f.b.pid().context("edge B pid")?.to_string();
    let out = tokio::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/dashboard.mjs"))
        .args([f.cloud.url("").as_str(), OPERATOR_KEY, pid.as_str()])
        .arg(&docs)
        .arg(HOSTILE)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "browser test failed: {stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        f.logs()
    );
    Ok(())
}

/// An edge killed and restarted at once links again before the cloud notices its old
/// link is gone (that one ends only at the idle timeout): the operator's view must
/// keep it connected when the old link ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_reconnects_before_its_old_link_ends_stays_connected() -> Result<()> {
    let mut f = fleet()?;
    with_logs(&mut f, |f| Box::pin(quick_edge_restart(f))).await
}

async fn quick_edge_restart(f: &mut Fleet) -> Result<()> {
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let key = OPERATOR_KEY;
    let links = |v: &Value| -> Option<(bool, u64)> {
        let e = v["edges"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "edge-a")?;
        Some((e["connected"].as_bool()?, e["links"].as_u64()?))
    };
    tokio::task::block_in_place(|| f.a.restart())?;
    // The new link comes up while the old one is still open on the cloud's side.
    eventually(Duration::from_secs(20), "edge A's second link", || async {
        let v: Value = http
            .get(f.cloud.url("/v1/admin/edges"))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await?;
        Ok(links(&v).filter(|(_, n)| *n >= 2).map(|_| ()))
    })
    .await?;
    // The harness's idle timeout is 3 s: by now the old link has ended.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let v: Value = http
        .get(f.cloud.url("/v1/admin/edges"))
        .bearer_auth(key)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        links(&v).is_some_and(|(up, _)| up),
        "edge A shown as down while linked: {v}"
    );
    let n = metric(&http, &f.cloud.url("/metrics"), "outpost_edges_connected").await?;
    ensure!(n == 2.0, "outpost_edges_connected is {n}");
    Ok(())
}

/// A channel unloaded from memory still ages out of the edge's cache: it is unloaded
/// after 1 s idle, and evicted (from disk) once the 4 s cache TTL has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_is_not_resident_is_still_evicted_from_the_cache() -> Result<()> {
    let mut f =
        fleet_with("[cache]\nttl_secs = 4\nsweep_secs = 1\n[storage]\nresident_idle_secs = 1\n")?;
    with_logs(&mut f, |f| Box::pin(cold_eviction(f))).await
}

async fn cold_eviction(f: &mut Fleet) -> Result<()> {
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    for i in 0..5 {
        let (s, _) = publish(
            &http,
            &f.a,
            &t,
            "project:cold",
            json!({"event": "e", "data": {"n": i}}),
        )
        .await?;
        ensure!(s == 200);
    }
    let a_metrics = f.a.url("/metrics");
    eventually(
        Duration::from_secs(15),
        "the channel to be unloaded",
        || async {
            Ok((metric(&http, &a_metrics, "outpost_channel_unloads_total")
                .await
                .unwrap_or(0.0)
                >= 1.0)
                .then_some(()))
        },
    )
    .await?;
    let evictions = metric(&http, &a_metrics, "outpost_cache_evictions_total")
        .await
        .unwrap_or(0.0);
    ensure!(
        evictions == 0.0,
        "evicted before it was unloaded ({evictions})"
    );
    eventually(
        Duration::from_secs(15),
        "the cold channel's eviction",
        || async {
            Ok((metric(&http, &a_metrics, "outpost_cache_evictions_total")
                .await
                .unwrap_or(0.0)
                >= 1.0)
                .then_some(()))
        },
    )
    .await?;
    ensure!(
        history(&http, f.cloud.url(""), "project:cold").await?.len() == 5,
        "the cloud lost it"
    );
    // A read on edge A of the channel it dropped asks the cloud first: all of it.
    // (Reading edge A's history no longer shows its cache: reads of channels
    // without subscribers there are fetched.)
    let fetches = metric(&http, &a_metrics, "outpost_read_fetches_total").await?;
    ensure!(
        history(&http, f.a.url(""), "project:cold").await?.len() == 5,
        "a read after the eviction did not fetch the channel again"
    );
    ensure!(metric(&http, &a_metrics, "outpost_read_fetches_total").await? > fetches);
    Ok(())
}

/// The `outpost` CLI as a new user meets it: fleet commands pointed at an edge, empty
/// reports, readable `tail` lines and `--live`, tokens for several channel patterns,
/// errors without backtraces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_what_is_wrong_and_prints_readable_lines() -> Result<()> {
    let mut f = fleet()?;
    with_logs(&mut f, |f| Box::pin(cli_first_hour(f))).await
}

async fn cli_first_hour(f: &mut Fleet) -> Result<()> {
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let (cloud, edge) = (f.cloud.url(""), f.a.url(""));

    // A fleet command sent to an edge says where the operator API is.
    let (ok, _, err) = outpost(&edge, &["edges"])?;
    ensure!(!ok && err.contains("it is an edge"), "{err}");
    ensure!(
        !err.contains("stack backtrace") && !err.contains(" at "),
        "{err}"
    );
    // Empty reports say so.
    let (ok, out, _) = outpost(&cloud, &["conflicts"])?;
    ensure!(ok && out.starts_with("none"), "{out}");

    // Readable lines: time, dot, event and data.
    let (ok, _, err) = outpost(
        &edge,
        &["publish", "project:cli", "job.started", r#"{"job":1}"#],
    )?;
    ensure!(ok, "{err}");
    let (ok, out, err) = outpost(&edge, &["tail", "project:cli", "--count", "1"])?;
    ensure!(ok, "{err}");
    let line = out.lines().next().unwrap_or_default();
    ensure!(
        line.contains("Z  ") && line.contains("job.started {\"job\":1}") && !line.starts_with('{'),
        "not a readable line: {line}"
    );
    // `--live` skips the history: only the op published after it started.
    let bin = outpost_tests::bin("outpost")?;
    let live = std::process::Command::new(&bin)
        .args(["tail", "project:cli", "--live", "--count", "1"])
        .env("OUTPOST_URL", &edge)
        .env("OUTPOST_TOKEN", admin_token())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, _, err) = outpost(&edge, &["publish", "project:cli", "job.finished", "2"])?;
    ensure!(ok, "{err}");
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || live.wait_with_output()),
    )
    .await???;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.lines().count() == 1 && out.contains("job.finished") && !out.contains("job.started"),
        "tail --live printed: {out}"
    );

    // One token for two channel patterns (repeated flag and commas both work).
    let mint = std::process::Command::new(&bin)
        .args([
            "gentoken",
            "--secret",
            outpost_tests::SECRET,
            "--sub",
            "svc",
        ])
        .args([
            "--channels",
            "project:x1",
            "--channels",
            "project:y*,project:z1",
        ])
        .args(["--actions", "publish"])
        .output()?;
    ensure!(
        mint.status.success(),
        "{}",
        String::from_utf8_lossy(&mint.stderr)
    );
    let tok = String::from_utf8_lossy(&mint.stdout).trim().to_owned();
    for (ch, want) in [
        ("project:x1", 200),
        ("project:y7", 200),
        ("project:z1", 200),
        ("project:w", 403),
    ] {
        let r = http
            .post(f.a.url(&format!("/v1/channels/{ch}/events")))
            .bearer_auth(&tok)
            .json(&json!({"event": "e"}))
            .send()
            .await?;
        ensure!(r.status() == want, "{ch}: {} (wanted {want})", r.status());
    }
    Ok(())
}

/// Clients see whether their endpoint syncs with the fleet: `connected.uplink`, then
/// an `uplink` message on each change (WebSocket) or event (SSE), as the cloud goes
/// away and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_when_their_edge_is_local_only() -> Result<()> {
    let mut f = fleet()?;
    with_logs(&mut f, |f| Box::pin(local_only(f))).await
}

/// The next `uplink` event on `sse`, which must say `want` (earlier ones may not).
async fn sse_uplink(sse: &mut Sse, want: &str) -> Result<()> {
    loop {
        let e = sse.next().await?;
        if e.event == "uplink" {
            let v: Value = serde_json::from_str(&e.data)?;
            if v["state"] == want {
                return Ok(());
            }
        }
    }
}

/// The next `uplink` message on `ws`, which must say `want`.
async fn ws_uplink(ws: &mut outpost_tests::WsStream, want: &str) -> Result<()> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .context("no uplink message within 15 s")?
            .context("socket closed")??;
        let v: Value = serde_json::from_str(m.to_text()?)?;
        if v["type"] == "uplink" {
            ensure!(v["state"] == want, "{v}");
            return Ok(());
        }
    }
}

async fn local_only(f: &mut Fleet) -> Result<()> {
    let http = reqwest::Client::new();
    connected(&http, &f.cloud, 2.0).await?;
    let t = admin_token();
    let hello = |url: String| async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        let m = ws.next().await.context("no hello")??;
        let v: Value = serde_json::from_str(m.to_text()?)?;
        anyhow::Ok((ws, v))
    };
    let (mut ws, v) = hello(format!("{}?token={t}", f.a.ws_url())).await?;
    ensure!(
        v["type"] == "connected" && v["uplink"] == "connected",
        "{v}"
    );
    let (_, v) = hello(format!("ws://{}/v1/ws?token={t}", f.cloud.addr)).await?;
    ensure!(v["uplink"] == "none", "the cloud's hello: {v}");
    let mut sse = match Sse::open(&http, &f.b, &t, "project:u", None).await? {
        Ok(s) => s,
        Err(e) => bail!("SSE: {e:?}"),
    };
    sse_uplink(&mut sse, "connected").await?;
    f.cloud.kill9();
    ws_uplink(&mut ws, "disconnected").await?;
    sse_uplink(&mut sse, "disconnected").await?;
    f.cloud.restart()?;
    ws_uplink(&mut ws, "connected").await?;
    sse_uplink(&mut sse, "connected").await?;
    Ok(())
}
