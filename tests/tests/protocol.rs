//! The client surface as an independent client sees it: raw WebSocket frames written
//! by hand (no WebSocket library between the test and the wire), plain HTTP requests
//! built from docs/PROTOCOL.md, the documented metrics list compared with what a fresh
//! edge exposes, and SIGTERM as a load balancer sees it.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use outpost_tests::{admin_token, publish, Edge, Sse};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A WebSocket client that writes frames byte by byte.
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// A frame from the server.
#[derive(Debug)]
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn text(&self) -> Result<Value> {
        ensure!(self.opcode == 1, "not a text frame: {self:?}");
        Ok(serde_json::from_slice(&self.payload)?)
    }

    /// A close frame's code and reason.
    fn close(&self) -> Result<(u16, String)> {
        ensure!(self.opcode == 8, "not a close frame: {self:?}");
        ensure!(self.payload.len() >= 2, "close frame without a code");
        Ok((
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            String::from_utf8(self.payload[2..].to_vec())?,
        ))
    }
}

impl RawWs {
    async fn connect(edge: &Edge, query: &str) -> Result<Self> {
        let mut tcp = TcpStream::connect(edge.addr).await?;
        let req = format!(
            "GET /v1/ws{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            edge.addr
        );
        tcp.write_all(req.as_bytes()).await?;
        let mut me = Self {
            tcp,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = me.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            me.fill().await?;
        };
        let head = String::from_utf8_lossy(&me.buf[..end]).to_string();
        ensure!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        me.buf.drain(..end);
        Ok(me)
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), self.tcp.read(&mut chunk))
            .await
            .context("nothing from the server within 5 s")??;
        if n == 0 {
            bail!("the server closed TCP (without a close frame if none was read)");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Writes one masked frame whose header announces `announced` payload bytes and
    /// carries `payload` (shorter when the test lies about the length).
    async fn send_frame(&mut self, opcode: u8, payload: &[u8], announced: u64) -> Result<()> {
        let mut f = vec![0x80 | opcode];
        match announced {
            0..=125 => f.push(0x80 | announced as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(announced as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&announced.to_be_bytes());
            }
        }
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&f).await?;
        Ok(())
    }

    async fn send_text(&mut self, v: &Value) -> Result<()> {
        let t = v.to_string();
        self.send_frame(1, t.as_bytes(), t.len() as u64).await
    }

    async fn frame(&mut self) -> Result<Frame> {
        loop {
            if let Some((frame, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Frames until a close frame (text frames before it are skipped).
    async fn close_frame(&mut self) -> Result<(u16, String, usize)> {
        loop {
            let f = self.frame().await?;
            if f.opcode == 8 {
                let (code, reason) = f.close()?;
                return Ok((code, reason, f.payload.len()));
            }
        }
    }
}

/// One unmasked server frame from the front of `b`, with the bytes it used.
fn parse(b: &[u8]) -> Result<Option<(Frame, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    ensure!(b[1] & 0x80 == 0, "the server masked a frame");
    let (len, mut at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().unwrap_or_default()) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if b.len() < at + len {
        return Ok(None);
    }
    let payload = b[at..at + len].to_vec();
    at += len;
    Ok(Some((
        Frame {
            opcode: b[0] & 0x0f,
            payload,
        },
        at,
    )))
}

/// An unsigned JWT (`alg: none`) with a long subject: refused, with a long message.
fn alg_none_token() -> String {
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "x".repeat(200), "exp": 4_000_000_000u64, "rights": []}))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_close_frames_follow_rfc_6455() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "[limits]\nmax_message_bytes = 4096\n")?;

    // A refused token: close 4001 with a reason that fits a control frame.
    let mut ws = RawWs::connect(&edge, &format!("?token={}", alg_none_token())).await?;
    let err = ws
        .frame()
        .await
        .context("refused token: the error")?
        .text()?;
    ensure!(err["type"] == "error", "{err}");
    let full = err["message"].as_str().unwrap_or_default().len();
    ensure!(
        full > 125,
        "the case needs a long message (got {full} bytes): {err}"
    );
    let (code, reason, len) = ws.close_frame().await.context("refused token: the close")?;
    ensure!(code == 4001, "close code {code} ({reason})");
    ensure!(
        len <= 125,
        "close frame payload of {len} bytes breaks RFC 6455 §5.5"
    );
    ensure!(!reason.is_empty(), "the reason says why");

    // Invalid UTF-8 in a text frame: 1007.
    let t = admin_token();
    let mut ws = RawWs::connect(&edge, &format!("?token={t}")).await?;
    ensure!(ws.frame().await?.text()?["type"] == "connected");
    let bad = b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}";
    ws.send_frame(1, bad, bad.len() as u64).await?;
    let (code, reason, _) = ws.close_frame().await.context("invalid UTF-8")?;
    ensure!(code == 1007, "close code {code} ({reason})");

    // A frame header announcing far more than the limit: 1009, before any payload.
    let mut ws = RawWs::connect(&edge, &format!("?token={t}")).await?;
    ensure!(ws.frame().await?.text()?["type"] == "connected");
    ws.send_frame(1, b"{", 1 << 40).await?;
    let (code, reason, _) = ws.close_frame().await.context("huge frame header")?;
    ensure!(code == 1009, "close code {code} ({reason})");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_their_id_in_every_answer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "[limits]\nmax_message_bytes = 4096\n")?;
    let t = admin_token();

    // `connect` with an `id`, as any request may carry one.
    let mut ws = RawWs::connect(&edge, "").await?;
    ws.send_text(&json!({"type": "connect", "id": 7, "token": t}))
        .await?;
    let hello = ws.frame().await?.text()?;
    ensure!(
        hello["type"] == "connected" && hello["id"] == 7,
        "expected connected with id 7: {hello}"
    );

    // Too large (but under the frame limit): the error answers request 8.
    let big = json!({"type": "publish", "id": 8, "channel": "project:1", "event": "e", "data": "x".repeat(6000)});
    ws.send_text(&big).await?;
    let e = ws.frame().await?.text()?;
    ensure!(
        e["code"] == "message_too_large" && e["id"] == 8,
        "expected message_too_large for id 8: {e}"
    );
    // A bad request still answers its id; the connection stays up.
    ws.send_text(&json!({"type": "publish", "id": 9, "channel": "project:1"}))
        .await?;
    let e = ws.frame().await?.text()?;
    ensure!(e["code"] == "bad_request" && e["id"] == 9, "{e}");
    ws.send_text(&json!({"type": "ping", "id": 10})).await?;
    let p = ws.frame().await?.text()?;
    ensure!(p["type"] == "pong" && p["id"] == 10, "{p}");

    // A refused `connect` answers its id too.
    let mut ws = RawWs::connect(&edge, "").await?;
    ws.send_text(&json!({"type": "connect", "id": 3, "token": "nope"}))
        .await?;
    let e = ws.frame().await?.text()?;
    ensure!(e["type"] == "error" && e["id"] == 3, "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_with_slashes_work_as_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let ch = "project:42/canvas/main";

    // SSE on the name as written.
    let mut sse = match Sse::open(&http, &edge, &t, ch, None).await? {
        Ok(s) => s,
        Err((status, body)) => bail!("SSE on {ch}: {status} {body}"),
    };
    let (_, ack) = publish(&http, &edge, &t, ch, json!({"event": "drawn", "data": 1})).await?;
    let (op, _) = sse.next_op().await?;
    ensure!(
        op["channel"] == ch && op["dot"] == ack["dot"],
        "{op} vs {ack}"
    );

    // History, written and percent-encoded: the same op.
    for path in [
        format!("/v1/channels/{ch}/history"),
        format!("/v1/channels/{}/history", ch.replace('/', "%2F")),
    ] {
        let h: Value = http
            .get(edge.url(&path))
            .bearer_auth(&t)
            .send()
            .await?
            .json()
            .await?;
        ensure!(h["ops"][0]["dot"] == ack["dot"], "{path}: {h}");
    }

    // State: put, get, list, delete on the name as written.
    let put: Value = http
        .put(edge.url(&format!("/v1/channels/{ch}/state/title")))
        .bearer_auth(&t)
        .json(&json!({"value": "Q3"}))
        .send()
        .await?
        .json()
        .await?;
    ensure!(put["ack"]["type"] == "ack", "{put}");
    let got: Value = http
        .get(edge.url(&format!("/v1/channels/{ch}/state/title")))
        .bearer_auth(&t)
        .send()
        .await?
        .json()
        .await?;
    ensure!(got["value"] == "Q3" && got["channel"] == ch, "{got}");
    let all = http
        .get(edge.url(&format!("/v1/channels/{ch}/state")))
        .bearer_auth(&t)
        .send()
        .await?;
    ensure!(all.status() == 200, "state list: {}", all.status());
    let members = http
        .get(edge.url(&format!("/v1/channels/{ch}/presence")))
        .bearer_auth(&t)
        .send()
        .await?;
    ensure!(members.status() == 200, "presence: {}", members.status());
    // Unknown paths under a slashed name stay 404 with the JSON error.
    let r = http
        .get(edge.url(&format!("/v1/channels/{ch}/nothing")))
        .bearer_auth(&t)
        .send()
        .await?;
    ensure!(r.status() == 404, "{}", r.status());

    // The CLI publishes to it and tails it.
    let out = std::process::Command::new(outpost_tests::bin("outpost")?)
        .args(["publish", ch, "cli.event", "{\"n\":2}"])
        .args(["--url", &format!("http://{}", edge.addr), "--token", &t])
        .output()?;
    ensure!(
        out.status.success(),
        "outpost publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    loop {
        let (op, _) = sse.next_op().await?;
        if op["op"] == "event" {
            ensure!(op["event"] == "cli.event", "{op}");
            break;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_with_accept_event_stream_is_sse() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let t = admin_token();
    let http = reqwest::Client::new();
    let (_, ack) = publish(&http, &edge, &t, "project:h", json!({"event": "e"})).await?;
    let r = http
        .get(edge.url("/v1/channels/project:h/history"))
        .header("accept", "text/event-stream")
        .bearer_auth(&t)
        .send()
        .await?;
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(ct.starts_with("text/event-stream"), "content-type {ct}");
    let mut body = r.bytes_stream();
    use futures_util::StreamExt;
    let mut text = String::new();
    while !text.contains("event: subscribed") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .context("no SSE data")?
            .context("stream ended")??;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let dot = ack["dot"].as_str().unwrap_or("?");
    ensure!(text.contains("event: op") && text.contains(dot), "{text}");
    Ok(())
}

/// The metrics table of docs/OPERATIONS.md: (name, labelled, scope) per series, with
/// `{in,out}` spelled out.
fn documented_metrics() -> Result<Vec<(String, bool, String)>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md");
    let doc = std::fs::read_to_string(&path)?;
    let mut out = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with("| `outpost_")) {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let meaning = cols.get(3).copied().unwrap_or_default();
        let scope = meaning
            .split_once(':')
            .map(|(s, _)| s)
            .filter(|s| ["edge", "cloud", "coordinator"].contains(s))
            .unwrap_or("every")
            .to_owned();
        for cell in cols[1].split(", ") {
            let name = cell.trim_matches('`');
            // `name{a,b}_total` spells out; `name{label}` is a labelled series.
            let (base, labelled) = match name.split_once('{') {
                Some((head, rest)) => {
                    let (inner, tail) = rest.split_once('}').unwrap_or((rest, ""));
                    if tail.is_empty() {
                        (vec![head.to_owned()], true)
                    } else {
                        (
                            inner
                                .split(',')
                                .map(|v| format!("{head}{v}{tail}"))
                                .collect(),
                            false,
                        )
                    }
                }
                None => (vec![name.to_owned()], false),
            };
            for b in base {
                out.push((b, labelled, scope.clone()));
            }
        }
    }
    ensure!(
        out.len() > 30,
        "found only {} metrics in {}",
        out.len(),
        path.display()
    );
    Ok(out)
}

/// The series names (histograms by their base name) of a Prometheus text page.
fn exposed(page: &str) -> std::collections::BTreeSet<String> {
    page.lines()
        .filter(|l| l.starts_with("outpost_"))
        .filter_map(|l| l.split([' ', '{']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exposed_from_start() -> Result<()> {
    let doc = documented_metrics()?;
    let dir = tempfile::tempdir()?;
    let edge = Edge::start(dir.path(), "")?;
    let page = reqwest::get(edge.url("/metrics")).await?.text().await?;
    let have = exposed(&page);
    let missing: Vec<&str> = doc
        .iter()
        .filter(|(_, labelled, scope)| !labelled && (scope == "every" || scope == "edge"))
        .map(|(n, _, _)| n.as_str())
        .filter(|n| !have.contains(*n))
        .collect();
    ensure!(
        missing.is_empty(),
        "documented but absent from a fresh edge's /metrics: {missing:?}"
    );
    let undocumented: Vec<&String> = have
        .iter()
        .filter(|n| !doc.iter().any(|(d, _, _)| d == *n))
        .collect();
    ensure!(
        undocumented.is_empty(),
        "exposed but not in docs/OPERATIONS.md: {undocumented:?}"
    );

    // The cloud: its own series too, and none of the edge's.
    let cloud_dir = tempfile::tempdir()?;
    let cloud =
        outpost_tests::Cloud::start(cloud_dir.path(), outpost_tests::free_udp_port()?, &[], "")?;
    let page = reqwest::get(cloud.url("/metrics")).await?.text().await?;
    let have = exposed(&page);
    let missing: Vec<&str> = doc
        .iter()
        .filter(|(_, labelled, scope)| !labelled && (scope == "every" || scope == "cloud"))
        .map(|(n, _, _)| n.as_str())
        .filter(|n| !have.contains(*n))
        .collect();
    ensure!(
        missing.is_empty(),
        "documented but absent from a fresh cloud's /metrics: {missing:?}"
    );
    let foreign: Vec<&str> = doc
        .iter()
        .filter(|(_, _, scope)| scope == "edge" || scope == "coordinator")
        .map(|(n, _, _)| n.as_str())
        .filter(|n| have.contains(*n))
        .collect();
    ensure!(foreign.is_empty(), "a plain cloud exposes {foreign:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_readyz_says_draining_before_the_listener_closes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut edge = Edge::start(dir.path(), "shutdown_drain_ms = 1500\n")?;
    let addr = edge.addr;
    let url = edge.url("/readyz");
    // A fresh connection per probe, as a load balancer's health check makes.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    ensure!(http.get(&url).send().await?.status() == 200);
    let pid = edge.pid().context("edge pid")?;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let started = Instant::now();
    let (mut draining, mut refused) = (0, false);
    while started.elapsed() < Duration::from_secs(6) {
        match http.get(&url).send().await {
            Ok(r) if r.status() == 503 => draining += 1,
            Ok(r) => ensure!(draining == 0, "readyz {} after it said 503", r.status()),
            Err(_) => {
                refused = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        draining >= 3,
        "only {draining} probes saw 503 before {addr} refused connections"
    );
    ensure!(refused, "the listener never closed");
    let status = edge.wait_exit(Duration::from_secs(5))?;
    ensure!(status.success(), "exit status {status}");
    Ok(())
}
