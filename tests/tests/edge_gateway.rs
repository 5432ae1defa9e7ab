//! The edge on its own (local processing mode), driven the way users drive it: real
//! processes, real sockets, WebSocket + SSE + REST clients.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge::auth::Action;
use outpost_tests::{admin_token, publish, token, Edge, Sse, Ws, API_KEY, SECRET};
use serde_json::{json, Value};

fn seq(op: &Value) -> u64 {
    op["dot"]
        .as_str()
        .and_then(|d| d.rsplit(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn n(op: &Value) -> i64 {
    op["data"]["n"].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_publish_reaches_websocket_and_sse_subscribers_in_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let mut ws = Ws::connect(&edge, &t).await?;
    ws.subscribe("project:1", None).await?;
    let mut sse = Sse::open(&http, &edge, &t, "project:1", None)
        .await?
        .map_err(|e| anyhow::anyhow!("sse refused: {e:?}"))?;
    let first = sse.next().await?;
    ensure!(first.event == "subscribed", "first SSE event: {first:?}");
    for i in 0..50 {
        let (status, ack) = publish(
            &http,
            &edge,
            API_KEY,
            "project:1",
            json!({"event": "ingest.job.updated", "data": {"n": i}}),
        )
        .await?;
        ensure!(
            status == 200 && ack["type"] == "ack",
            "publish {i}: {status} {ack}"
        );
    }
    for i in 0..50 {
        let w = ws.recv_until(|m| m["type"] == "op").await?;
        ensure!(n(&w) == i && seq(&w) == i as u64 + 1, "ws got {w} at {i}");
        ensure!(w["event"] == "ingest.job.updated");
        let (s, id) = sse.next_op().await?;
        ensure!(n(&s) == i, "sse got {s} at {i}");
        ensure!(
            id.as_deref() == s["token"].as_str(),
            "SSE id is the resume token"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_token_replays_exactly_what_was_missed_then_goes_live() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let mut ws = Ws::connect(&edge, &t).await?;
    ws.subscribe("project:2", None).await?;
    for i in 0..5 {
        publish(
            &http,
            &edge,
            &t,
            "project:2",
            json!({"event": "e", "data": {"n": i}}),
        )
        .await?;
    }
    let mut last = String::new();
    for i in 0..5 {
        let op = ws.recv_until(|m| m["type"] == "op").await?;
        ensure!(n(&op) == i);
        last = op["token"].as_str().unwrap_or_default().to_owned();
    }
    drop(ws);
    for i in 5..12 {
        publish(
            &http,
            &edge,
            &t,
            "project:2",
            json!({"event": "e", "data": {"n": i}}),
        )
        .await?;
    }
    let mut ws = Ws::connect(&edge, &t).await?;
    let (replay, sub) = ws.subscribe("project:2", Some(&last)).await?;
    let got: Vec<i64> = replay.iter().map(n).collect();
    ensure!(got == (5..12).collect::<Vec<_>>(), "replayed {got:?}");
    ensure!(sub["replayed"] == 7 && sub["truncated"] == false, "{sub}");
    publish(
        &http,
        &edge,
        &t,
        "project:2",
        json!({"event": "e", "data": {"n": 12}}),
    )
    .await?;
    let live = ws.recv_until(|m| m["type"] == "op").await?;
    ensure!(n(&live) == 12, "live {live}");
    // SSE resumes the same way, with Last-Event-ID.
    let mut sse = Sse::open(&http, &edge, &t, "project:2", Some(&last))
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for i in 5..13 {
        let (op, _) = sse.next_op().await?;
        ensure!(n(&op) == i, "sse resume got {op} for {i}");
    }
    // A token from the future (ahead of this replica) is not an error: nothing is
    // replayed and ops it already covers are not sent again.
    let bad = http
        .get(edge.url("/v1/channels/project:2/history?since=!!"))
        .bearer_auth(&t)
        .send()
        .await?;
    ensure!(bad.status() == 400);
    let body: Value = bad.json().await?;
    ensure!(body["error"]["code"] == "bad_resume_token", "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_acks_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut edge = Edge::start(dir.path(), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for w in 0..10 {
        let (http, url, t) = (
            http.clone(),
            edge.url("/v1/channels/project:3/events"),
            t.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut dots = Vec::new();
            for i in 0..20 {
                let r = http
                    .post(&url)
                    .bearer_auth(&t)
                    .json(&json!({"event": "ingest.job.updated", "data": {"w": w, "i": i}}))
                    .send()
                    .await?;
                let v: Value = r.json().await?;
                if let Some(d) = v["dot"].as_str() {
                    dots.push(d.to_owned());
                }
            }
            anyhow::Ok(dots)
        }));
    }
    let mut acked = BTreeSet::new();
    for task in tasks {
        acked.extend(task.await??);
    }
    // A state write too.
    let put = http
        .put(edge.url("/v1/channels/project:3/state/config"))
        .bearer_auth(&t)
        .json(&json!({"value": {"mode": "fast"}}))
        .send()
        .await?;
    ensure!(put.status() == 200);
    edge.kill9();
    ensure!(acked.len() == 200, "acked {}", acked.len());
    edge.restart()?;
    let h: Value = http
        .get(edge.url("/v1/channels/project:3/history?limit=1000"))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    let have: BTreeSet<String> = h["ops"]
        .as_array()
        .context("ops")?
        .iter()
        .filter_map(|o| o["dot"].as_str().map(str::to_owned))
        .collect();
    let lost: Vec<_> = acked.difference(&have).collect();
    ensure!(lost.is_empty(), "acked but lost after kill -9: {lost:?}");
    let s: Value = http
        .get(edge.url("/v1/channels/project:3/state/config"))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    ensure!(s["value"]["mode"] == "fast", "{s}");
    Ok(())
}

fn jwt_with(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    rights: Value,
) -> String {
    let now = edge::core::now_ms() / 1000;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &json!({"sub": "mallory", "exp": now + 600, "rights": rights}),
        key,
    )
    .unwrap_or_default()
}

async fn ws_refused(edge: &Edge, token: &str) -> Result<String> {
    let url = format!("{}?token={token}", edge.ws_url());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    use futures_util::StreamExt;
    let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await?
        .context("ended")??;
    let v: Value = serde_json::from_str(m.to_text()?)?;
    ensure!(v["type"] == "error", "expected an error, got {v}");
    Ok(v["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_their_codes_and_projects_stay_isolated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let http = reqwest::Client::new();
    let all = json!([{"channels": "*", "actions": ["subscribe", "publish", "state", "presence"]}]);
    // Garbage, expired, wrong algorithm, wrong key, HS/EdDSA key confusion.
    ensure!(ws_refused(&edge, "not-a-jwt").await? == "unauthorized");
    ensure!(ws_refused(&edge, &token("u", "*", &Action::ALL, -3600)).await? == "token_expired");
    let hs384 = jwt_with(
        jsonwebtoken::Algorithm::HS384,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        all.clone(),
    );
    ensure!(ws_refused(&edge, &hs384).await? == "unauthorized");
    let other = jwt_with(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(b"some other secret that is long enough"),
        all.clone(),
    );
    ensure!(ws_refused(&edge, &other).await? == "unauthorized");
    let public_pem = std::fs::read(outpost_tests::fixture("test-ed25519.pub.pem"))?;
    let confused = jwt_with(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
        all.clone(),
    );
    ensure!(ws_refused(&edge, &confused).await? == "unauthorized");
    // The asymmetric algorithm works with the right key.
    let private_pem = std::fs::read(outpost_tests::fixture("test-ed25519.key.pem"))?;
    let eddsa = jwt_with(
        jsonwebtoken::Algorithm::EdDSA,
        &jsonwebtoken::EncodingKey::from_ed_pem(&private_pem)?,
        json!([{"channels": "project:1", "actions": ["subscribe"]}]),
    );
    let mut ok = Ws::connect(&edge, &eddsa).await?;
    ok.subscribe("project:1", None).await?;

    // Project isolation: a token for project:1 sees nothing of project:2, anywhere.
    let admin = admin_token();
    publish(
        &http,
        &edge,
        &admin,
        "project:2",
        json!({"event": "secret", "data": 42}),
    )
    .await?;
    let p1 = token("alice", "project:1", &Action::ALL, 600);
    let mut ws = Ws::connect(&edge, &p1).await?;
    let r = ws
        .request(json!({"type": "subscribe", "channel": "project:2"}), 1)
        .await?;
    ensure!(r["code"] == "forbidden", "{r}");
    let r = ws
        .request(
            json!({"type": "get", "channel": "project:2", "key": "k"}),
            2,
        )
        .await?;
    ensure!(r["code"] == "forbidden", "{r}");
    let r = ws
        .request(
            json!({"type": "publish", "channel": "project:2", "event": "x"}),
            3,
        )
        .await?;
    ensure!(r["code"] == "forbidden", "{r}");
    let r = ws
        .request(json!({"type": "members", "channel": "project:2"}), 4)
        .await?;
    ensure!(r["code"] == "forbidden", "{r}");
    // project:10 is another project, not a sub-channel of project:1.
    let r = ws
        .request(json!({"type": "subscribe", "channel": "project:10"}), 5)
        .await?;
    ensure!(r["code"] == "forbidden", "{r}");
    match Sse::open(&http, &edge, &p1, "project:2", None).await? {
        Ok(_) => anyhow::bail!("SSE on another project was allowed"),
        Err((status, body)) => ensure!(status == 403 && body["error"]["code"] == "forbidden"),
    }
    for path in [
        "/v1/channels/project:2/history",
        "/v1/channels/project:2/state",
        "/v1/channels/project:2/state/k",
        "/v1/channels/project:2/presence",
    ] {
        let r = http.get(edge.url(path)).bearer_auth(&p1).send().await?;
        ensure!(r.status() == 403, "{path}: {}", r.status());
    }
    let (status, body) = publish(&http, &edge, &p1, "project:2", json!({"event": "x"})).await?;
    ensure!(
        status == 403 && body["error"]["code"] == "forbidden",
        "{status} {body}"
    );
    // No credential at all; an unknown API key.
    let r = http
        .get(edge.url("/v1/channels/project:1/history"))
        .send()
        .await?;
    ensure!(r.status() == 401);
    let (status, _) = publish(
        &http,
        &edge,
        "opk_unknown",
        "project:1",
        json!({"event": "x"}),
    )
    .await?;
    ensure!(status == 401);
    // The API key may publish to project:* but not subscribe to other namespaces.
    let (status, _) = publish(&http, &edge, API_KEY, "user:7", json!({"event": "x"})).await?;
    ensure!(status == 403);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_input_gets_codes_and_everything_stays_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "[limits]\nmax_message_bytes = 4096\n")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let mut ws = Ws::connect(&edge, &t).await?;
    ws.send_raw("this is not json").await?;
    let e = ws.recv().await?;
    ensure!(e["code"] == "bad_request", "{e}");
    ws.send_raw(r#"{"type":"publish","id":7}"#).await?;
    let e = ws.recv().await?;
    ensure!(e["code"] == "bad_request" && e["id"] == 7, "{e}");
    let big =
        json!({"type": "publish", "channel": "project:1", "event": "x", "data": "y".repeat(6000)});
    ws.send(big).await?;
    let e = ws.recv().await?;
    ensure!(e["code"] == "message_too_large", "{e}");
    let r = ws
        .request(json!({"type": "subscribe", "channel": "bad name!"}), 9)
        .await?;
    ensure!(r["code"] == "bad_channel", "{r}");
    let r = ws
        .request(
            json!({"type": "subscribe", "channel": "project:1", "since": "%%%"}),
            10,
        )
        .await?;
    ensure!(r["code"] == "bad_resume_token", "{r}");
    let pong = ws.request(json!({"type": "ping"}), 11).await?;
    ensure!(pong["type"] == "pong", "connection still healthy: {pong}");
    // A frame far beyond any limit closes that connection only.
    let mut huge = Ws::connect(&edge, &t).await?;
    let _ = huge.send_raw(&"z".repeat(1 << 20)).await;
    let _ = huge.close_code(Duration::from_secs(5)).await;
    // REST: oversized body, invalid JSON, bad channel.
    let r = http
        .post(edge.url("/v1/channels/project:1/events"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"event":"x","data":"{}"}}"#,
            "y".repeat(10_000)
        ))
        .send()
        .await?;
    ensure!(r.status() == 413);
    let v: Value = r.json().await?;
    ensure!(v["error"]["code"] == "message_too_large", "{v}");
    let r = http
        .post(edge.url("/v1/channels/project:1/events"))
        .bearer_auth(&t)
        .body("{oops")
        .send()
        .await?;
    ensure!(r.status() == 400);
    let r = http
        .post(edge.url("/v1/channels/no%20spaces/events"))
        .bearer_auth(&t)
        .json(&json!({"event": "x"}))
        .send()
        .await?;
    let v: Value = r.json().await?;
    ensure!(v["error"]["code"] == "bad_channel", "{v}");
    // Still serving.
    let pong = ws.request(json!({"type": "ping"}), 12).await?;
    ensure!(pong["type"] == "pong");
    ensure!(http.get(edge.url("/healthz")).send().await?.status() == 200);
    let m = http.get(edge.url("/metrics")).send().await?.text().await?;
    ensure!(m.contains("outpost_errors_total"), "metrics: {m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_resume_code_and_resumes_without_loss() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(
        dir.path(),
        "[limits]\nsend_queue = 64\nmax_message_bytes = 65536\n[storage]\ndurability = \"os\"\n",
    )?;
    let t = admin_token();
    let http = reqwest::Client::new();
    const N: i64 = 500;
    let mut slow = Ws::connect(&edge, &t).await?;
    slow.subscribe("project:slow", None).await?;
    let mut fast = Ws::connect(&edge, &t).await?;
    fast.subscribe("project:slow", None).await?;
    let fast_task = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < N as usize {
            let op = fast.recv_until(|m| m["type"] == "op").await?;
            got.push(n(&op));
        }
        anyhow::Ok(got)
    });
    let blob = "x".repeat(48_000);
    for i in 0..N {
        let (status, _) = publish(
            &http,
            &edge,
            &t,
            "project:slow",
            json!({"event": "blob", "data": {"n": i, "blob": blob}}),
        )
        .await?;
        ensure!(status == 200);
    }
    let fast_got = fast_task.await??;
    ensure!(
        fast_got == (0..N).collect::<Vec<_>>(),
        "fast consumer was affected"
    );
    // The slow one now reads: some ops, then the close telling it to resume.
    let mut got = Vec::new();
    let mut last_token = None;
    let code = loop {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        match tokio::time::timeout(Duration::from_secs(10), slow.ws.next()).await? {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "op" {
                    got.push(n(&v));
                    last_token = v["token"].as_str().map(str::to_owned);
                }
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => anyhow::bail!("slow consumer ended without a close frame: {other:?}"),
        }
    };
    ensure!(code == Some(4100), "close code {code:?}");
    ensure!(
        (got.len() as i64) < N,
        "the slow consumer was never cut off"
    );
    let mut again = Ws::connect(&edge, &t).await?;
    let (replay, _) = again
        .subscribe("project:slow", last_token.as_deref())
        .await?;
    got.extend(replay.iter().map(n));
    ensure!(
        got == (0..N).collect::<Vec<_>>(),
        "slow consumer lost or reordered ops after resume"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_signals_and_state_with_siblings() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let http = reqwest::Client::new();
    let a_tok = token("alice", "project:7*", &Action::ALL, 600);
    let b_tok = token("bob", "project:7*", &Action::ALL, 600);
    let mut a = Ws::connect(&edge, &a_tok).await?;
    let mut b = Ws::connect(&edge, &b_tok).await?;
    a.subscribe("project:7", None).await?;
    b.subscribe("project:7", None).await?;
    let r = a
        .request(
            json!({"type": "presence", "channel": "project:7", "data": {"color": "red"}}),
            1,
        )
        .await?;
    ensure!(r["type"] == "ack", "{r}");
    let j = b.recv_until(|m| m["type"] == "presence").await?;
    ensure!(
        j["action"] == "join" && j["subject"] == "alice" && j["client"] == a.client.as_str(),
        "{j}"
    );
    let m = b
        .request(json!({"type": "members", "channel": "project:7"}), 2)
        .await?;
    ensure!(m["members"][0]["data"]["color"] == "red", "{m}");
    let r = b
        .request(json!({"type": "signal", "channel": "project:7", "to": a.client, "data": {"sdp": "offer"}}), 3)
        .await?;
    ensure!(r["type"] == "ack", "{r}");
    let s = a.recv_until(|m| m["type"] == "signal").await?;
    ensure!(
        s["from"] == b.client.as_str() && s["data"]["sdp"] == "offer",
        "{s}"
    );
    let r = b
        .request(
            json!({"type": "signal", "channel": "project:7", "to": "nobody", "data": {}}),
            4,
        )
        .await?;
    ensure!(r["code"] == "not_found", "{r}");
    // Ephemeral messages reach subscribers and are not stored.
    b.send(json!({"type": "publish", "channel": "project:7", "event": "cursor", "data": {"x": 1}, "ephemeral": true}))
        .await?;
    let e = a.recv_until(|m| m["type"] == "ephemeral").await?;
    ensure!(e["data"]["x"] == 1 && e["from"] == b.client.as_str(), "{e}");
    let h: Value = http
        .get(edge.url("/v1/channels/project:7/history"))
        .bearer_auth(&a_tok)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        h["ops"].as_array().is_some_and(Vec::is_empty),
        "ephemeral was stored: {h}"
    );
    drop(a);
    let l = b.recv_until(|m| m["type"] == "presence").await?;
    ensure!(l["action"] == "leave", "{l}");
    // Two blind writes are concurrent: both stay, the later one wins the read.
    for v in [1, 2] {
        let r = b
            .request(
                json!({"type": "set", "channel": "project:7", "key": "title", "value": v}),
                10 + v,
            )
            .await?;
        ensure!(r["type"] == "ack", "{r}");
    }
    let g = b
        .request(
            json!({"type": "get", "channel": "project:7", "key": "title", "siblings": true}),
            20,
        )
        .await?;
    ensure!(g["value"] == 2 && g["conflict"] == true, "{g}");
    ensure!(g["siblings"].as_array().map(Vec::len) == Some(2), "{g}");
    // A write with the context it read supersedes both.
    let ctx = g["context"].as_str().unwrap_or_default().to_owned();
    b.request(
        json!({"type": "set", "channel": "project:7", "key": "title", "value": 3, "context": ctx}),
        21,
    )
    .await?;
    let g = b
        .request(
            json!({"type": "get", "channel": "project:7", "key": "title", "siblings": true}),
            22,
        )
        .await?;
    ensure!(g["value"] == 3 && g["conflict"] == false, "{g}");
    let d = http
        .delete(edge.url(&format!(
            "/v1/channels/project:7/state/title?context={}",
            g["context"].as_str().unwrap_or_default()
        )))
        .bearer_auth(&b_tok)
        .send()
        .await?;
    ensure!(d.status() == 200);
    let s: Value = http
        .get(edge.url("/v1/channels/project:7/state/title"))
        .bearer_auth(&b_tok)
        .send()
        .await?
        .json()
        .await?;
    ensure!(s["deleted"] == true && s["value"].is_null(), "{s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_websocket_clients() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let rss_before = edge.rss_kib()?;
    let mut clients = Vec::new();
    for _ in 0..1000 {
        let mut c = Ws::connect(&edge, &t).await?;
        c.subscribe("project:crowd", None).await?;
        clients.push(c);
    }
    let rss_after = edge.rss_kib()?;
    eprintln!(
        "1000 subscribed WebSocket clients: RSS {rss_before} -> {rss_after} KiB ({:.1} KiB each)",
        (rss_after.saturating_sub(rss_before)) as f64 / 1000.0
    );
    for i in 0..3 {
        publish(
            &http,
            &edge,
            &t,
            "project:crowd",
            json!({"event": "e", "data": {"n": i}}),
        )
        .await?;
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            for i in 0..3 {
                let op = c.recv_until(|m| m["type"] == "op").await?;
                ensure!(n(&op) == i);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_clients_to_resume_elsewhere_and_keeps_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut edge = Edge::start(dir.path(), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let mut ws = Ws::connect(&edge, &t).await?;
    ws.subscribe("project:9", None).await?;
    let (_, ack) = publish(
        &http,
        &edge,
        &t,
        "project:9",
        json!({"event": "e", "data": {"n": 0}}),
    )
    .await?;
    let status = edge.terminate()?;
    ensure!(status.success(), "exit status {status}");
    let code = ws.close_code(Duration::from_secs(5)).await?;
    ensure!(code == Some(4101), "close code {code:?}");
    edge.restart()?;
    let h: Value = http
        .get(edge.url("/v1/channels/project:9/history"))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    ensure!(h["ops"][0]["dot"] == ack["dot"], "{h} vs {ack}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_with_their_codes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(
        dir.path(),
        "[limits]\nmax_subscriptions_per_connection = 2\npublish_rate_per_sec = 5\npublish_burst = 5\nmax_connections_per_ip = 3\n",
    )?;
    let t = admin_token();
    let mut ws = Ws::connect(&edge, &t).await?;
    ws.subscribe("project:l1", None).await?;
    ws.subscribe("project:l2", None).await?;
    let r = ws
        .request(json!({"type": "subscribe", "channel": "project:l3"}), 1)
        .await?;
    ensure!(r["code"] == "too_many_subscriptions", "{r}");
    // A burst of 5 passes, the rest of a fast burst is refused, nothing crashes.
    let mut codes = Vec::new();
    for i in 0..12u64 {
        let r = ws
            .request(
                json!({"type": "publish", "channel": "project:l1", "event": "e"}),
                100 + i,
            )
            .await?;
        codes.push(
            r["type"].as_str().unwrap_or_default().to_owned()
                + ":"
                + r["code"].as_str().unwrap_or(""),
        );
    }
    let acks = codes.iter().filter(|c| c.starts_with("ack")).count();
    let limited = codes.iter().filter(|c| c.ends_with("rate_limited")).count();
    ensure!((5..=7).contains(&acks) && acks + limited == 12, "{codes:?}");
    // Per-IP connection limit: this client already holds one; two more fit, then 429.
    let _b = Ws::connect(&edge, &t).await?;
    let _c = Ws::connect(&edge, &t).await?;
    let refused = tokio_tungstenite::connect_async(format!("{}?token={t}", edge.ws_url())).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            ensure!(resp.status() == 429, "status {}", resp.status());
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())?;
            ensure!(body["error"]["code"] == "too_many_connections", "{body}");
        }
        other => anyhow::bail!("a fourth connection from one IP was not refused: {other:?}"),
    }
    let pong = ws.request(json!({"type": "ping"}), 999).await?;
    ensure!(pong["type"] == "pong");
    Ok(())
}

#[test]
fn checkconfig_names_the_broken_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bin = outpost_tests::bin("outpost-edge")?;
    let good = dir.path().join("good.toml");
    let out = std::process::Command::new(&bin).arg("genconfig").output()?;
    std::fs::write(&good, &out.stdout)?;
    let ok = std::process::Command::new(&bin)
        .arg("checkconfig")
        .arg(&good)
        .output()?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[auth]\nhs256_secret = \"short\"\n[limits]\nsend_queue = 2\n[storage]\ndurability = \"sometimes\"\n",
    )?;
    let r = std::process::Command::new(&bin)
        .arg("checkconfig")
        .arg(&bad)
        .output()?;
    let err = String::from_utf8_lossy(&r.stderr);
    ensure!(!r.status.success(), "a broken config passed");
    ensure!(err.contains("storage.durability"), "{err}");
    std::fs::write(
        &bad,
        "[auth]\nhs256_secret = \"short\"\n[limits]\nsend_queue = 2\n",
    )?;
    let r = std::process::Command::new(&bin)
        .arg("checkconfig")
        .arg(&bad)
        .output()?;
    let err = String::from_utf8_lossy(&r.stderr);
    ensure!(
        err.contains("auth.hs256_secret") && err.contains("limits.send_queue"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_restore_a_stopped_edge() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut edge = Edge::start(&dir.path().join("one"), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    for i in 0..25 {
        publish(
            &http,
            &edge,
            &t,
            "project:bk",
            json!({"event": "e", "data": {"n": i}}),
        )
        .await?;
    }
    http.put(edge.url("/v1/channels/project:bk/state/cfg"))
        .bearer_auth(&t)
        .json(&json!({"value": {"v": 1}}))
        .send()
        .await?;
    let before: Value = http
        .get(edge.url("/v1/channels/project:bk/history?limit=100"))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    let index: Value = http.get(edge.url("/")).send().await?.json().await?;
    edge.terminate()?;
    let backup = dir.path().join("backup.jsonl");
    let cli = outpost_tests::bin("outpost")?;
    let run = |verb: &str, data: &str, flag: &str| {
        std::process::Command::new(&cli)
            .args([verb, "--data-dir"])
            .arg(dir.path().join(data).join("data"))
            .arg(flag)
            .arg(&backup)
            .output()
    };
    let out = run("export", "one", "--out")?;
    ensure!(
        out.status.success(),
        "export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("import", "two", "--in")?;
    ensure!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Importing over an existing database is refused.
    let again = run("import", "two", "--in")?;
    ensure!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("empty data dir")
    );
    let restored = Edge::start(&dir.path().join("two"), "")?;
    let after: Value = http
        .get(restored.url("/v1/channels/project:bk/history?limit=100"))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        before["ops"] == after["ops"] && after["ops"].as_array().map(Vec::len) == Some(26),
        "history differs after restore"
    );
    let index2: Value = http.get(restored.url("/")).send().await?.json().await?;
    // A restored replica never reuses the dots of the one it was copied from: it
    // takes a new id, and its ops keep theirs.
    ensure!(
        index["replica"].is_string() && index["replica"] != index2["replica"],
        "a restored replica must take a new id: {index} / {index2}"
    );
    let s: Value = http
        .get(restored.url("/v1/channels/project:bk/state/cfg"))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    ensure!(s["value"]["v"] == 1, "{s}");
    Ok(())
}

/// The connection's timers (idle timeout, token expiry) and its kill paths wait in a
/// gate that is polled only when they fire: traffic keeps a connection open, silence
/// closes it with 4102, an expired token closes it with `token_expired` + 4001, a
/// token renewed with `connect` moves the expiry, and messages keep flowing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_and_token_expiry_close_connections_and_renewal_moves_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "[limits]\nidle_timeout_secs = 2\n")?;
    let http = reqwest::Client::new();
    let t = admin_token();
    let short = token("u-short", "*", &Action::ALL, 2);
    let mut busy = Ws::connect(&edge, &t).await?;
    busy.subscribe("project:timers", None).await?;
    let mut expiring = Ws::connect(&edge, &short).await?;
    let mut renewed = Ws::connect(&edge, &short).await?;
    renewed.send(json!({"type": "connect", "token": t})).await?;
    let hello = renewed.recv().await?;
    ensure!(hello["type"] == "connected", "renewal: {hello}");
    let mut silent = Ws::connect(&edge, &t).await?;
    let started = tokio::time::Instant::now();
    // 4.2 s of traffic every 0.6 s: twice the idle timeout, past the short token's
    // expiry (2 s, rounded up to the next second plus one).
    let mut expired_at = None;
    let mut n = 0u64;
    while started.elapsed() < Duration::from_millis(4200) {
        n += 1;
        let pong = busy.request(json!({"type": "ping"}), 10 + n).await?;
        ensure!(pong["type"] == "pong", "{pong}");
        let (status, _) = publish(
            &http,
            &edge,
            API_KEY,
            "project:timers",
            json!({"event": "tick", "data": {"n": n}}),
        )
        .await?;
        ensure!(status == 200);
        let op = busy.recv_until(|m| m["type"] == "op").await?;
        ensure!(op["data"]["n"] == n, "{op}");
        let pong = renewed.request(json!({"type": "ping"}), 10 + n).await?;
        ensure!(
            pong["type"] == "pong",
            "the renewed connection closed: {pong}"
        );
        if expired_at.is_none() {
            expiring.send(json!({"type": "ping", "id": 10 + n})).await?;
            let m = expiring
                .recv_within(Duration::from_secs(2))
                .await
                .context("expiring connection")?;
            if m["code"] == "token_expired" {
                expired_at = Some(started.elapsed());
            } else {
                ensure!(m["type"] == "pong", "unexpected {m}");
            }
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let expired_at = expired_at.context("the short token never expired")?;
    ensure!(
        expired_at >= Duration::from_millis(1500),
        "expired too early: {expired_at:?}"
    );
    ensure!(
        expiring.close_code(Duration::from_secs(3)).await? == Some(4001),
        "expired token: close code"
    );
    // The silent connection was closed for idleness long ago; the busy one only now.
    ensure!(
        silent.close_code(Duration::from_millis(100)).await? == Some(4102),
        "silent connection: close code"
    );
    let quiet_from = tokio::time::Instant::now();
    ensure!(busy.close_code(Duration::from_secs(5)).await? == Some(4102));
    let quiet = quiet_from.elapsed();
    ensure!(
        quiet >= Duration::from_millis(1000),
        "closed {quiet:?} after the last message: the timer did not move"
    );
    Ok(())
}

/// A client that pipelines 1,000 publishes without reading gets every ack, in request
/// order, with the dots in order; reading pauses at 256 pending acks and resumes, and
/// a subscriber sees all 1,000 in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_are_acked_in_order_past_the_pending_ack_cap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(
        dir.path(),
        "[limits]\npublish_rate_per_sec = 100000\npublish_burst = 100000\n",
    )?;
    let t = admin_token();
    let mut sub = Ws::connect(&edge, &t).await?;
    sub.subscribe("project:pipe", None).await?;
    let mut publisher = Ws::connect(&edge, &t).await?;
    const N: u64 = 1000;
    for i in 0..N {
        publisher
            .send(json!({"type": "publish", "id": i, "channel": "project:pipe", "event": "e", "data": {"n": i}}))
            .await?;
    }
    let mut last_seq = 0;
    for i in 0..N {
        let ack = publisher.recv().await?;
        ensure!(ack["type"] == "ack" && ack["id"] == i, "ack {i}: {ack}");
        let got = seq(&ack);
        ensure!(got > last_seq, "dot {got} after {last_seq}");
        last_seq = got;
    }
    for i in 0..N {
        let op = sub.recv_until(|m| m["type"] == "op").await?;
        ensure!(n(&op) == i as i64, "op {i}: {op}");
    }
    Ok(())
}

/// Retention compacts the log on disk: with `max_ops = 20` a cloud that took 100
/// events keeps the newest 20, and after kill -9 and restart exactly those (no dropped
/// op comes back from storage); writing on after the restart compacts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_trims_the_stored_log_and_survives_kill_9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cloud = outpost_tests::Cloud::start(
        dir.path(),
        outpost_tests::free_udp_port()?,
        &[],
        "[history.default]\nmax_ops = 20\n",
    )?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let publish_n = |url: String, from: i64, to: i64| {
        let (http, t) = (http.clone(), t.clone());
        async move {
            for i in from..to {
                let r = http
                    .post(&url)
                    .bearer_auth(&t)
                    .json(&json!({"event": "e", "data": {"n": i}}))
                    .send()
                    .await?;
                ensure!(r.status() == 200, "publish {i}: {}", r.status());
            }
            anyhow::Ok(())
        }
    };
    let history = |url: String| {
        let (http, t) = (http.clone(), t.clone());
        async move {
            let h: Value = http.get(url).bearer_auth(&t).send().await?.json().await?;
            let ns: Vec<i64> = h["ops"].as_array().context("ops")?.iter().map(n).collect();
            anyhow::Ok(ns)
        }
    };
    let url = cloud.url("/v1/channels/project:trim/history?limit=1000");
    publish_n(cloud.url("/v1/channels/project:trim/events"), 0, 100).await?;
    let before = outpost_tests::eventually(Duration::from_secs(10), "compaction", || {
        let h = history(url.clone());
        async move {
            let ns = h.await?;
            anyhow::Ok((ns.len() <= 20 && ns.last() == Some(&99)).then_some(ns))
        }
    })
    .await?;
    ensure!(
        before.windows(2).all(|w| w[1] == w[0] + 1),
        "not the newest, in order: {before:?}"
    );
    // Compaction shows in memory at once and reaches the disk with the next group
    // commit: an acked write on another channel is a flush barrier.
    publish_n(cloud.url("/v1/channels/project:barrier/events"), 0, 1).await?;
    cloud.kill9();
    cloud.restart()?;
    let url = cloud.url("/v1/channels/project:trim/history?limit=1000");
    let after = history(url.clone()).await?;
    ensure!(
        after == before,
        "after restart {after:?}, before {before:?}"
    );
    publish_n(cloud.url("/v1/channels/project:trim/events"), 100, 130).await?;
    outpost_tests::eventually(Duration::from_secs(10), "compaction after restart", || {
        let h = history(url.clone());
        async move {
            let ns = h.await?;
            let done = ns.len() <= 20
                && ns.last() == Some(&129)
                && ns.windows(2).all(|w| w[1] == w[0] + 1);
            anyhow::Ok(done.then_some(()))
        }
    })
    .await?;
    Ok(())
}
