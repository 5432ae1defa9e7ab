//! Negative security suite over real sockets: forged and misused tokens, signalling
//! across projects, slowloris, and connection floods up to the descriptor limit.
//! (Bad edge credentials, revoked edges and UDP garbage at the QUIC port are in
//! `fleet.rs`; basic token and project isolation checks in `edge_gateway.rs`.)

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use base64::Engine;
use edge::auth::Action;
use outpost_tests::{publish, token, Edge, Ws, SECRET};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AUDIENCE: &str = "outpost";
const ISSUER: &str = "https://auth.test";

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn claims(extra: Value) -> Value {
    let now = edge::core::now_ms() / 1000;
    let mut c = json!({
        "sub": "mallory",
        "exp": now + 600,
        "aud": AUDIENCE,
        "iss": ISSUER,
        "rights": [{"channels": "*", "actions": ["subscribe", "publish", "state", "presence"]}],
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn hs256(c: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        c,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_default()
}

/// The error code a WebSocket connection with `token` is refused with.
async fn refused(edge: &Edge, token: &str) -> Result<String> {
    let url = format!("{}?token={token}", edge.ws_url());
    let mut ws = Ws {
        ws: tokio_tungstenite::connect_async(url).await?.0,
        client: String::new(),
    };
    let v = ws.recv().await?;
    ensure!(v["type"] == "error", "token accepted: {v}");
    Ok(v["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misused_tokens_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(
        dir.path(),
        &format!("[auth]\naudience = \"{AUDIENCE}\"\nissuer = \"{ISSUER}\"\nleeway_secs = 0\n"),
    )?;
    // The control: a well-formed token for this audience and issuer works.
    let good = hs256(&claims(json!({})));
    Ws::connect(&edge, &good).await.context("the valid token")?;

    let now = edge::core::now_ms() / 1000;
    let payload = b64(claims(json!({})).to_string().as_bytes());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#)),
            "unauthorized",
        ),
        (
            "alg none, upper case",
            format!("{}.{payload}.", b64(br#"{"alg":"NONE","typ":"JWT"}"#)),
            "unauthorized",
        ),
        (
            "not yet valid",
            hs256(&claims(json!({"nbf": now + 3600}))),
            "token_expired",
        ),
        (
            "expired",
            hs256(&claims(json!({"exp": now.saturating_sub(10)}))),
            "token_expired",
        ),
        (
            "wrong audience",
            hs256(&claims(json!({"aud": "someone-else"}))),
            "unauthorized",
        ),
        (
            "no audience",
            hs256(&claims(json!({"aud": null}))),
            "unauthorized",
        ),
        (
            "wrong issuer",
            hs256(&claims(json!({"iss": "https://evil.test"}))),
            "unauthorized",
        ),
        (
            "tampered payload",
            {
                // Signed for project:1, payload swapped for every channel.
                let narrow = hs256(&claims(json!({
                    "rights": [{"channels": "project:1", "actions": ["subscribe"]}]
                })));
                let parts: Vec<&str> = narrow.split('.').collect();
                format!("{}.{payload}.{}", parts[0], parts[2])
            },
            "unauthorized",
        ),
        (
            "signature stripped",
            {
                let parts: Vec<String> = good.split('.').map(str::to_owned).collect();
                format!("{}.{}.", parts[0], parts[1])
            },
            "unauthorized",
        ),
        (
            "RS256 header on an HS256 signature (key confusion)",
            {
                let parts: Vec<String> = good.split('.').map(str::to_owned).collect();
                format!(
                    "{}.{}.{}",
                    b64(br#"{"alg":"RS256","typ":"JWT"}"#),
                    parts[1],
                    parts[2]
                )
            },
            "unauthorized",
        ),
        ("not three parts", "abc.def".to_owned(), "unauthorized"),
        ("4 KiB of junk", "a".repeat(4096), "unauthorized"),
    ];
    for (what, tok, code) in &cases {
        let got = refused(&edge, tok)
            .await
            .with_context(|| what.to_string())?;
        ensure!(got == *code, "{what}: refused with {got}, expected {code}");
    }
    // The same tokens on REST are 401 and never publish anything.
    let http = reqwest::Client::new();
    for (what, tok, _) in &cases[..7] {
        let (status, _) = publish(&http, &edge, tok, "project:1", json!({"event": "x"})).await?;
        ensure!(status == 401, "{what} over REST: {status}");
    }
    // A 64 KiB bearer token is refused outright (401, or 431 from the HTTP layer).
    let (status, _) = publish(
        &http,
        &edge,
        &"a".repeat(64 * 1024),
        "project:1",
        json!({"event": "x"}),
    )
    .await?;
    ensure!(
        status == 401 || status == 431,
        "oversized token over REST: {status}"
    );
    let r: Value = http
        .get(edge.url("/v1/channels/project:1/history"))
        .bearer_auth(&good)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        r["ops"].as_array().is_some_and(Vec::is_empty),
        "a refused token published something: {r}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_signalling_and_presence_stay_inside_the_project() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let p1 = token("alice", "project:1", &Action::ALL, 600);
    let p2 = token("bob", "project:2", &Action::ALL, 600);
    let mut alice = Ws::connect(&edge, &p1).await?;
    let mut bob = Ws::connect(&edge, &p2).await?;
    bob.subscribe("project:2", None).await?;
    let r = bob
        .request(
            json!({"type": "presence", "channel": "project:2", "data": {"name": "Bob"}}),
            1,
        )
        .await?;
    ensure!(r["type"] == "ack", "{r}");
    // Alice knows Bob's client id (say it leaked) and tries to reach him.
    let r = alice
        .request(
            json!({"type": "signal", "channel": "project:2", "to": bob.client, "data": {"sdp": "v=0"}}),
            2,
        )
        .await?;
    ensure!(r["code"] == "forbidden", "signal into another project: {r}");
    // Through her own project's channel she cannot reach a client that is not there.
    let r = alice
        .request(
            json!({"type": "signal", "channel": "project:1", "to": bob.client, "data": {"sdp": "v=0"}}),
            3,
        )
        .await?;
    ensure!(
        r["type"] == "error",
        "signal to a client outside the channel: {r}"
    );
    let r = alice
        .request(json!({"type": "members", "channel": "project:2"}), 4)
        .await?;
    ensure!(r["code"] == "forbidden", "{r}");
    let r = alice
        .request(
            json!({"type": "publish", "channel": "project:2", "event": "cursor", "data": {}, "ephemeral": true}),
            5,
        )
        .await?;
    ensure!(
        r["code"] == "forbidden",
        "ephemeral into another project: {r}"
    );
    // Bob got nothing from Alice.
    if let Ok(m) = bob.recv_within(Duration::from_millis(300)).await {
        ensure!(
            m["type"] != "signal" && m["type"] != "ephemeral",
            "Bob received {m}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_and_the_edge_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "[limits]\nheader_timeout_secs = 2\n")?;
    let addr = edge.addr;
    // 300 connections that dribble a request header, one byte at a time.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..300 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
            let mut buf = [0u8; 512];
            for _ in 0..60 {
                // Closed by the server: the write fails or the read sees EOF.
                if s.write_all(b"X").await.is_err() {
                    return Ok::<_, anyhow::Error>(started.elapsed());
                }
                match tokio::time::timeout(Duration::from_millis(250), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
                    // A 408 may come before the close.
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
            anyhow::bail!("a slowloris connection was still open after 15 s")
        }));
    }
    // Meanwhile a normal client is served.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::new();
    let t = Instant::now();
    let r = http.get(edge.url("/healthz")).send().await?;
    ensure!(
        r.status() == 200,
        "healthz during slowloris: {}",
        r.status()
    );
    ensure!(
        t.elapsed() < Duration::from_secs(2),
        "healthz took {:?}",
        t.elapsed()
    );
    let mut latest = Duration::ZERO;
    for t in tasks {
        latest = latest.max(t.await??);
    }
    eprintln!(
        "300 slowloris connections all closed by the edge within {:.1} s (header timeout 2 s)",
        latest.as_secs_f64()
    );
    ensure!(
        latest < Duration::from_secs(6),
        "closed only after {latest:?}"
    );
    Ok(())
}

/// `POST /v1/rtc/offer` refuses what it cannot use before it opens a peer connection:
/// no or bad credentials, junk, answers instead of offers, oversized bodies; with
/// WebRTC off it says so. Each refusal has its error code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_offers_that_cannot_be_used_are_refused_with_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(&dir.path().join("on"), "")?;
    let off = Edge::start(&dir.path().join("off"), "[webrtc]\nenabled = false\n")?;
    let http = reqwest::Client::new();
    let good = token("ada", "*", &Action::ALL, 600);
    let offer = |e: &Edge, tok: Option<&str>, body: String| {
        let mut r = http
            .post(e.url("/v1/rtc/offer"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = tok {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let cases: Vec<(&Edge, Option<&str>, String, u16, &str)> = vec![
        (
            &edge,
            None,
            r#"{"type":"offer","sdp":"v=0"}"#.into(),
            401,
            "unauthorized",
        ),
        (
            &edge,
            Some("junk"),
            r#"{"type":"offer","sdp":"v=0"}"#.into(),
            401,
            "unauthorized",
        ),
        (&edge, Some(&good), "not json".into(), 400, "bad_request"),
        (
            &edge,
            Some(&good),
            r#"{"type":"answer","sdp":"v=0"}"#.into(),
            400,
            "bad_request",
        ),
        (
            &edge,
            Some(&good),
            r#"{"type":"offer","sdp":"garbage"}"#.into(),
            400,
            "bad_request",
        ),
        (
            &edge,
            Some(&good),
            format!(r#"{{"type":"offer","sdp":"{}"}}"#, "a".repeat(70_000)),
            413,
            "message_too_large",
        ),
        (
            &off,
            Some(&good),
            r#"{"type":"offer","sdp":"v=0"}"#.into(),
            404,
            "not_found",
        ),
    ];
    for (i, (e, tok, body, status, code)) in cases.into_iter().enumerate() {
        let r = offer(e, tok, body).await?;
        let got = r.status().as_u16();
        let v: Value = r.json().await.context("error body")?;
        ensure!(
            got == status && v["error"]["code"] == code,
            "case {i}: {got} {v}, expected {status} {code}"
        );
    }
    // Nothing was left behind: no peer connections, and the edge still answers.
    let metrics = http.get(edge.url("/metrics")).send().await?.text().await?;
    let peers = metrics
        .lines()
        .find(|l| l.starts_with("outpost_rtc_peers "))
        .map(|l| l.trim_start_matches("outpost_rtc_peers ").trim().to_owned());
    ensure!(
        peers.as_deref().unwrap_or("0") == "0",
        "peers left: {peers:?}"
    );
    publish(
        &http,
        &edge,
        &good,
        "project:1",
        json!({"event": "still-up"}),
    )
    .await?;
    Ok(())
}
