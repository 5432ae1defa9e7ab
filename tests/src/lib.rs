//! The harness shared by Outpost's cross-process tests: start real `outpost-edge`
//! processes on loopback, talk to them over real sockets (WebSocket, SSE, REST), kill
//! them with SIGKILL or SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub mod fleet;
pub mod nats;
pub mod netns;
pub mod proxy;

use anyhow::{anyhow, bail, Context, Result};
use edge::auth::{Action, Claims, Right};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The HS256 secret every test edge accepts.
pub const SECRET: &str = "outpost-test-secret-0123456789abcdef";
/// An API key with publish and state rights on `project:*`.
pub const API_KEY: &str = "opk_test_ingest_key";

/// Where cargo put the workspace binaries (next to the test executable's `deps/`).
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .ok_or_else(|| anyhow!("no parent for {}", exe.display()))?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the binaries first (`cargo build --workspace --bins`; scripts/test does)",
            p.display()
        );
    }
    Ok(p)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Configuration every test edge gets, before the test's own additions.
pub fn base_config(data_dir: &Path) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{}"
region = "test"
shutdown_grace_ms = 200

[auth]
hs256_secret = "{SECRET}"
ed25519_public_key = "{}"

[[auth.api_keys]]
name = "ingest"
sha256 = "{}"
rights = [{{ channels = "project:*", actions = ["publish", "state", "subscribe"] }}]
"#,
        data_dir.display(),
        fixture("test-ed25519.pub.pem").display(),
        edge::auth::api_key_hash(API_KEY),
    )
}

/// A running `outpost-edge` process.
#[derive(Debug)]
pub struct Edge {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
}

impl Edge {
    /// Starts an edge with its data in `dir` and `extra` TOML appended to the base
    /// configuration (tables in `extra` must not repeat the base's tables).
    pub fn start(dir: &Path, extra: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("edge.toml");
        let text = merge_toml(&base_config(&dir.join("data")), extra)?;
        std::fs::write(&config, text)?;
        Self::spawn(dir, config)
    }

    /// Like [`Edge::start`], with the process limited to `nofile` open files
    /// (through util-linux `prlimit`).
    pub fn start_with_nofile(dir: &Path, extra: &str, nofile: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("edge.toml");
        std::fs::write(&config, merge_toml(&base_config(&dir.join("data")), extra)?)?;
        let prlimit = [
            "prlimit".to_owned(),
            format!("--nofile={nofile}:{nofile}"),
            "--".to_owned(),
        ];
        Self::spawn_in(dir, config, &prlimit)
    }

    fn spawn(dir: &Path, config: PathBuf) -> Result<Self> {
        Self::spawn_in(dir, config, &[])
    }

    fn spawn_in(dir: &Path, config: PathBuf, prefix: &[String]) -> Result<Self> {
        let (child, lines) = spawn_proc_in(
            "outpost-edge",
            dir,
            &config,
            &["outpost-edge listening on http://"],
            prefix,
        )?;
        Ok(Self {
            child: Some(child),
            addr: lines[0].parse()?,
            dir: dir.to_owned(),
            config,
        })
    }

    /// The edge's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("outpost-edge.log")).unwrap_or_default()
    }

    /// Starts the same edge again (same data dir, a new port).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let again = Self::spawn(&self.dir, self.config.clone())?;
        *self = again;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal by name (`STOP`, `CONT`, …) to the running process.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("not running"))?;
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -{sig} {pid} failed");
        Ok(())
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself (after a signal sent elsewhere).
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        bail!("edge did not exit within {within:?}")
    }

    /// SIGTERM and wait for the process to exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.signal("TERM")?;
        let mut c = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        for _ in 0..100 {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        bail!("edge did not exit within 5 s of SIGTERM")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid().ok_or_else(|| anyhow!("not running"))?;
        rss_kib(pid)
    }
}

/// Spawns a binary with `--config` (through `prefix`, e.g. `prlimit ... --` or
/// `ip netns exec NS`), stderr to `<dir>/<name>.log`, and waits until its stdout has
/// printed a line starting with each of `wait_for` (in order); returns the rest of
/// each such line.
fn spawn_proc_in(
    name: &str,
    dir: &Path,
    config: &Path,
    wait_for: &[&str],
    prefix: &[String],
) -> Result<(Child, Vec<String>)> {
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin(name)?);
            c
        }
        None => Command::new(bin(name)?),
    };
    let mut child = cmd
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("TEST_LOG").unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("spawning {name}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let prefixes: Vec<String> = wait_for.iter().map(|s| (*s).to_owned()).collect();
    std::thread::spawn(move || {
        let mut next = 0;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = prefixes.get(next) {
                if let Some(rest) = line.strip_prefix(p.as_str()) {
                    let _ = tx.send(rest.trim().to_owned());
                    next += 1;
                }
            }
        }
    });
    let mut lines = Vec::new();
    for _ in wait_for {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{name} did not start within 30 s; its log:\n{log}");
            }
        }
    }
    Ok((child, lines))
}

/// A UDP port that was free a moment ago (for a QUIC listener that must keep its
/// port across restarts).
pub fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

/// A running `outpost-cloud` process.
#[derive(Debug)]
pub struct Cloud {
    child: Option<Child>,
    /// Runs the process through this (e.g. `ip netns exec NS`).
    prefix: Vec<String>,
    pub addr: SocketAddr,
    pub quic: SocketAddr,
    pub fingerprint: String,
    pub dir: PathBuf,
    config: PathBuf,
}

impl Cloud {
    /// Starts a cloud in dev mode (self-signed certificate) on `quic_port`, accepting
    /// the edges named with their uplink tokens.
    pub fn start(dir: &Path, quic_port: u16, edges: &[(&str, &str)], extra: &str) -> Result<Self> {
        Self::start_in(dir, "127.0.0.1", &[], quic_port, edges, extra)
    }

    /// Like [`Cloud::start`], bound to `ip` and run through `prefix` (e.g. inside a
    /// network namespace).
    pub fn start_in(
        dir: &Path,
        ip: &str,
        prefix: &[String],
        quic_port: u16,
        edges: &[(&str, &str)],
        extra: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut base = format!(
            "listen = \"{ip}:0\"\ndata_dir = \"{}\"\nregion = \"cloud\"\ndev = true\nshutdown_grace_ms = 200\n\n[auth]\nhs256_secret = \"{SECRET}\"\n\n[hub]\nlisten = \"{ip}:{quic_port}\"\nkeepalive_ms = 500\nidle_timeout_ms = 3000\n",
            dir.join("data").display()
        );
        for (name, token) in edges {
            base.push_str(&format!(
                "\n[[hub.edges]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n",
                edge::auth::api_key_hash(token)
            ));
        }
        let config = dir.join("cloud.toml");
        std::fs::write(&config, merge_toml(&base, extra)?)?;
        Self::spawn(dir, config, prefix.to_vec())
    }

    fn spawn(dir: &Path, config: PathBuf, prefix: Vec<String>) -> Result<Self> {
        let (child, lines) = spawn_proc_in(
            "outpost-cloud",
            dir,
            &config,
            &[
                "outpost-cloud listening on http://",
                "outpost-cloud quic on ",
                "outpost-cloud certificate sha256 ",
            ],
            &prefix,
        )?;
        Ok(Self {
            child: Some(child),
            prefix,
            addr: lines[0].parse()?,
            quic: lines[1].parse()?,
            fingerprint: lines[2].clone(),
            dir: dir.to_owned(),
            config,
        })
    }

    /// TOML for an edge's `[uplink]` to this cloud.
    pub fn uplink_toml(&self, token: &str) -> String {
        self.uplink_toml_via(self.quic, token)
    }

    /// TOML for an edge's `[uplink]` to this cloud through `via` (a fault proxy).
    pub fn uplink_toml_via(&self, via: SocketAddr, token: &str) -> String {
        format!(
            "[uplink]\nendpoints = [\"{via}\"]\ntoken = \"{token}\"\npin_sha256 = \"{}\"\nbackoff_min_ms = 50\nbackoff_max_ms = 500\nkeepalive_ms = 500\nidle_timeout_ms = 3000\n",
            self.fingerprint
        )
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same cloud again (same data dir, same QUIC port, new HTTP port).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let mut last = None;
        // The QUIC port may take a moment to be free again.
        for _ in 0..20 {
            match Self::spawn(&self.dir, self.config.clone(), self.prefix.clone()) {
                Ok(again) => {
                    *self = again;
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("restart failed")))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the cloud, backs its data dir up with `outpost export`, starts it again.
    pub fn backup(&mut self, to: &Path) -> Result<()> {
        self.kill9();
        let data = self.dir.join("data");
        run_outpost(&[
            "export".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            to.as_os_str(),
        ])?;
        self.restart()
    }

    /// Stops the cloud, restores a backup into a fresh data dir with `outpost
    /// import`, starts it again.
    pub fn restore_from(&mut self, backup: &Path) -> Result<()> {
        self.kill9();
        let data = self.dir.join("data");
        std::fs::remove_dir_all(&data)?;
        run_outpost(&[
            "import".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--in".as_ref(),
            backup.as_os_str(),
        ])?;
        self.restart()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("outpost-cloud.log")).unwrap_or_default()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the `outpost` CLI; fails with its stderr if it does.
pub fn run_outpost(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new(bin("outpost")?).args(args).output()?;
    if !out.status.success() {
        bail!("outpost {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a metric's value (summed over label sets) from a Prometheus endpoint.
pub async fn metric(http: &reqwest::Client, url: &str, name: &str) -> Result<f64> {
    let text = http.get(url).send().await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum())
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// Appends `extra` to `base`, merging tables that both define (so a test can add keys
/// to `[auth]`).
fn merge_toml(base: &str, extra: &str) -> Result<String> {
    let mut a: toml::Table = base.parse()?;
    let b: toml::Table = extra.parse()?;
    deep_merge(&mut a, b);
    Ok(a.to_string())
}

fn deep_merge(a: &mut toml::Table, b: toml::Table) {
    for (k, v) in b {
        match (a.get_mut(&k), v) {
            (Some(toml::Value::Table(at)), toml::Value::Table(bt)) => deep_merge(at, bt),
            (_, v) => {
                a.insert(k, v);
            }
        }
    }
}

/// An HS256 token for `sub` with `actions` on `channels`, valid for `ttl` seconds
/// (negative: already expired).
pub fn token(sub: &str, channels: &str, actions: &[Action], ttl: i64) -> String {
    let now = edge::core::now_ms() as i64 / 1000;
    edge::auth::mint_hs256(
        SECRET,
        &Claims {
            sub: sub.into(),
            exp: (now + ttl).max(1) as u64,
            nbf: None,
            aud: None,
            iss: None,
            rights: vec![Right {
                channels: channels.into(),
                actions: actions.to_vec(),
            }],
        },
    )
    .unwrap_or_default()
}

/// A token with every right on every channel.
pub fn admin_token() -> String {
    token("admin", "*", &Action::ALL, 3600)
}

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A test WebSocket client speaking the JSON protocol.
#[derive(Debug)]
pub struct Ws {
    pub ws: WsStream,
    /// The `client` id the server assigned.
    pub client: String,
}

impl Ws {
    /// Connects with `token` in the URL and waits for `connected`.
    pub async fn connect(edge: &Edge, token: &str) -> Result<Self> {
        Self::connect_url(&format!("{}?token={token}", edge.ws_url())).await
    }

    pub async fn connect_url(url: &str) -> Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut me = Self {
            ws,
            client: String::new(),
        };
        let hello = me.recv().await?;
        if hello["type"] != "connected" {
            bail!("expected connected, got {hello}");
        }
        me.client = hello["client"].as_str().unwrap_or_default().to_owned();
        Ok(me)
    }

    pub async fn send(&mut self, v: Value) -> Result<()> {
        self.ws.send(Message::Text(v.to_string().into())).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, s: &str) -> Result<()> {
        self.ws.send(Message::Text(s.to_owned().into())).await?;
        Ok(())
    }

    /// The next JSON message (10 s timeout).
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_within(Duration::from_secs(10)).await
    }

    pub async fn recv_within(&mut self, d: Duration) -> Result<Value> {
        loop {
            let m = tokio::time::timeout(d, self.ws.next())
                .await
                .map_err(|_| anyhow!("no message within {d:?}"))?
                .ok_or_else(|| anyhow!("connection ended"))??;
            match m {
                Message::Text(t) => return Ok(serde_json::from_str(&t)?),
                Message::Close(f) => bail!("closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// Waits for a message matching `pred`, skipping others.
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        loop {
            let v = self.recv().await?;
            if pred(&v) {
                return Ok(v);
            }
        }
    }

    /// Sends a request with `id` and returns the reply with that id.
    pub async fn request(&mut self, mut v: Value, id: u64) -> Result<Value> {
        v["id"] = id.into();
        self.send(v).await?;
        self.recv_until(|m| m["id"] == id).await
    }

    /// Subscribes and collects the replayed ops until `subscribed`.
    pub async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<&str>,
    ) -> Result<(Vec<Value>, Value)> {
        let mut req = serde_json::json!({"type": "subscribe", "channel": channel, "id": 900_001});
        if let Some(s) = since {
            req["since"] = s.into();
        }
        self.send(req).await?;
        let mut ops = Vec::new();
        loop {
            let v = self.recv().await?;
            match v["type"].as_str() {
                Some("op") if v["channel"] == channel => ops.push(v),
                Some("subscribed") if v["channel"] == channel => return Ok((ops, v)),
                Some("error") => bail!("subscribe failed: {v}"),
                _ => {}
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn close_code(&mut self, within: Duration) -> Result<Option<u16>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("not closed within {within:?}"))?;
            match m {
                None => return Ok(None),
                Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Close(f))) => return Ok(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// The close code for "slow consumer: resume".
pub fn close_code_num(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Publishes an event over REST with `auth` as the bearer credential.
pub async fn publish(
    http: &reqwest::Client,
    edge: &Edge,
    auth: &str,
    channel: &str,
    body: Value,
) -> Result<(u16, Value)> {
    let r = http
        .post(edge.url(&format!("/v1/channels/{channel}/events")))
        .bearer_auth(auth)
        .json(&body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A server-sent events reader over a real HTTP connection.
pub struct Sse {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sse").finish_non_exhaustive()
    }
}

impl Sse {
    /// Opens `GET /v1/channels/{channel}/events` as an event stream.
    pub async fn open(
        http: &reqwest::Client,
        edge: &Edge,
        token: &str,
        channel: &str,
        last_event_id: Option<&str>,
    ) -> Result<std::result::Result<Self, (u16, Value)>> {
        let mut req = http
            .get(edge.url(&format!("/v1/channels/{channel}/events")))
            .header("accept", "text/event-stream")
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        if status != 200 {
            return Ok(Err((status, r.json().await.unwrap_or(Value::Null))));
        }
        Ok(Ok(Self {
            stream: Box::pin(r.bytes_stream()),
            buf: String::new(),
        }))
    }

    /// The next event (comments and heartbeats skipped), within 10 s.
    pub async fn next(&mut self) -> Result<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Ok(ev);
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .map_err(|_| anyhow!("no SSE data within 10 s"))?
                .ok_or_else(|| anyhow!("SSE stream ended"))??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next `op` event's JSON.
    pub async fn next_op(&mut self) -> Result<(Value, Option<String>)> {
        loop {
            let e = self.next().await?;
            if e.event == "op" {
                return Ok((serde_json::from_str(&e.data)?, e.id));
            }
        }
    }
}
