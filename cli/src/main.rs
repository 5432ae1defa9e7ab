//! `outpost`: the command line for operators and developers.
//!
//! Fleet commands talk to the cloud's operator API with an operator key; channel
//! commands talk to any endpoint's client API with a client token. Every error says
//! what to do next.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use edge::config::EdgeConfig;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "outpost", version, about = "Operate and use an Outpost fleet")]
struct Cli {
    /// Base URL of an endpoint (the cloud for fleet commands; any edge or the cloud
    /// for channel commands).
    #[arg(
        long,
        env = "OUTPOST_URL",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    url: String,
    /// Operator key, for fleet commands.
    #[arg(
        long,
        env = "OUTPOST_OPERATOR_KEY",
        global = true,
        hide_env_values = true
    )]
    operator_key: Option<String>,
    /// Client token (JWT or API key), for channel commands.
    #[arg(long, env = "OUTPOST_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print raw JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Health of the endpoint and a fleet summary.
    Status,
    /// The edges: connection, region, RTT, lag, outbox.
    Edges,
    /// Channels held by the cloud: ops, size, which edges hold them.
    Channels,
    /// Fleet events: edges joining, leaving, healing, refused, drained, revoked.
    Timeline {
        /// Only events in the last this many seconds.
        #[arg(long, default_value_t = 3600)]
        last_secs: u64,
    },
    /// The reconciliation report: concurrent writes, who won, who lost.
    Conflicts {
        #[arg(long)]
        channel: Option<String>,
        #[arg(long, default_value_t = 86_400)]
        last_secs: u64,
    },
    /// Tell an edge's clients to move elsewhere and resume; the edge stops being ready.
    Drain { edge: String },
    /// Revoke an edge's credentials (persisted) and drop its link.
    Revoke { edge: String },
    /// Drop a channel from every edge's cache.
    Evict { channel: String },
    /// Follow a channel (server-sent events): its history, then live; resumes after
    /// disconnects. One readable line per op (time, dot, what it did); `--json` for
    /// the raw op messages.
    Tail {
        channel: String,
        /// Resume token to start after (default: the retained history first).
        #[arg(long)]
        since: Option<String>,
        /// Skip the history: only ops that arrive from now on.
        #[arg(long, conflicts_with = "since")]
        live: bool,
        /// Stop after this many ops.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Publish an event to a channel.
    Publish {
        channel: String,
        event: String,
        /// JSON payload.
        #[arg(default_value = "null")]
        data: String,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Mint an HS256 client token.
    Gentoken(edge::startup::GentokenArgs),
    /// Test and benchmark tool: writes synthetic history straight into a stopped
    /// node's data dir — events (and one state key per channel) of a made-up origin,
    /// as if replicated from elsewhere. Read it back through the client API.
    #[command(hide = true)]
    BulkLoad {
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long, default_value_t = 1000)]
        channels: u64,
        #[arg(long, default_value_t = 10)]
        ops_per_channel: u64,
        /// Bytes of padding in each event's payload.
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// Channels are named `<prefix><n>`.
        #[arg(long, default_value = "project:bulk-")]
        prefix: String,
    },
    /// Back up a (stopped) node's data dir to a file of JSON lines.
    Export {
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Restore a backup made by `export` into an empty data dir.
    Import {
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long = "in")]
        input: std::path::PathBuf,
    },
    /// Print a commented default configuration (edge; the cloud adds a [hub] section).
    Genconfig,
    /// Validate a configuration file.
    Checkconfig { file: std::path::PathBuf },
}

fn now_ms() -> u64 {
    edge::core::now_ms()
}

async fn get(http: &reqwest::Client, cli: &Cli, path: &str) -> Result<Value> {
    let key = cli.operator_key.as_deref().context(
        "this command needs an operator key: pass --operator-key or set OUTPOST_OPERATOR_KEY",
    )?;
    let r = http
        .get(format!("{}{path}", cli.url))
        .bearer_auth(key)
        .send()
        .await
        .with_context(|| {
            format!(
                "cannot reach {} — is the cloud running, and is --url right?",
                cli.url
            )
        })?;
    if r.status() == reqwest::StatusCode::NOT_FOUND && path.starts_with("/v1/admin") {
        bail!(
            "{} has no operator API: it is an edge. Fleet commands go to the cloud (or any coordinator): --url http://<cloud>:<port>",
            cli.url
        );
    }
    answer(r).await
}

async fn post(
    http: &reqwest::Client,
    cli: &Cli,
    path: &str,
    key: &str,
    body: Value,
) -> Result<Value> {
    let r = http
        .post(format!("{}{path}", cli.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .with_context(|| {
            format!(
                "cannot reach {} — is it running, and is --url right?",
                cli.url
            )
        })?;
    answer(r).await
}

async fn answer(r: reqwest::Response) -> Result<Value> {
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let code = v["error"]["code"].as_str().unwrap_or("error");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        let hint = match code {
            "unauthorized" => " — check the key or token (and that the server's config lists it)",
            "forbidden" => " — the token lacks this right on this channel",
            "not_found" => " — check the name",
            _ => "",
        };
        bail!("{status}: {code}: {msg}{hint}");
    }
    Ok(v)
}

fn ago(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    if s < 120 {
        format!("{s}s ago")
    } else if s < 7200 {
        format!("{}m ago", s / 60)
    } else {
        format!("{}h ago", s / 3600)
    }
}

fn client_token(cli: &Cli) -> Result<&str> {
    cli.token
        .as_deref()
        .context("this command needs a client token: pass --token or set OUTPOST_TOKEN (scripts/start prints one)")
}

async fn tail(
    http: &reqwest::Client,
    cli: &Cli,
    channel: &str,
    mut since: Option<String>,
    live: bool,
    count: Option<u64>,
) -> Result<()> {
    let token = client_token(cli)?;
    let mut seen = 0u64;
    // `--live`: the replay before the first `subscribed` is skipped (its token is
    // where live ops start; later reconnects resume from the last op shown).
    let mut skipping = live;
    loop {
        let mut req = http
            .get(format!("{}/v1/channels/{channel}/events", cli.url))
            .header("accept", "text/event-stream")
            .bearer_auth(token);
        if let Some(s) = &since {
            req = req.header("last-event-id", s);
        }
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return answer(r).await.map(|_| ()),
            Err(e) => {
                eprintln!(
                    "disconnected ({e}); retrying in 1 s from {}",
                    since.as_deref().unwrap_or("the start")
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = ("message", None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = match v.trim() {
                            "op" => "op",
                            "subscribed" => "subscribed",
                            _ => "other",
                        };
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event == "subscribed" && skipping {
                    skipping = false;
                    since = id.or(since.take());
                    continue;
                }
                if event == "op" && !skipping {
                    if cli.json {
                        println!("{data}");
                    } else {
                        println!("{}", op_line(&data));
                    }
                    since = id.or(since.take());
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        return Ok(());
                    }
                }
            }
        }
        eprintln!(
            "stream ended; resuming from {}",
            since.as_deref().unwrap_or("the start")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One op as a readable line: local time, dot, and what it did.
fn op_line(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(json) else {
        return json.to_owned();
    };
    let wall_ms: u64 = v["hlc"]
        .as_str()
        .and_then(|h| h.split('.').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let secs = wall_ms / 1000;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        wall_ms % 1000
    );
    let what = match v["op"].as_str() {
        Some("event") => format!("{} {}", v["event"].as_str().unwrap_or(""), v["data"]),
        Some("set") => format!("set {} = {}", v["key"].as_str().unwrap_or(""), v["value"]),
        Some("delete") => format!("delete {}", v["key"].as_str().unwrap_or("")),
        _ => v.to_string(),
    };
    format!("{time}Z  {}  {what}", v["dot"].as_str().unwrap_or(""))
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} ops ({per_sec}, {eta} left)",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what.to_owned());
    b
}

fn open_storage(dir: &std::path::Path) -> Result<edge::storage::Storage> {
    edge::storage::Storage::open(dir, 64).map_err(|e| {
        anyhow::anyhow!(
            "cannot open {}: {e} (stop the node first: sled allows one process at a time)",
            dir.display()
        )
    })
}

/// Files of a data dir that a backup carries besides the database: the cloud's dev
/// certificate and key (edges pin it) and the QUIC stateless-reset key.
const BACKUP_FILES: [&str; 3] = [
    edge::link::tls::DEV_CERT_FILE,
    edge::link::tls::DEV_KEY_FILE,
    edge::link::tls::RESET_KEY_FILE,
];

/// Backup format: JSON lines. A header with the replica id, then a `file` line
/// (base64) for each of [`BACKUP_FILES`] the data dir holds, then per channel a
/// `channel` line (floor, acked), its `register` lines and its `op` lines in applied
/// order.
fn export(data_dir: &std::path::Path, out: &std::path::Path) -> Result<()> {
    use base64::Engine as _;
    use std::io::Write;
    let storage = open_storage(data_dir)?;
    let id = storage.replica_id().map_err(|e| anyhow::anyhow!("{e}"))?;
    let channels = storage.load().map_err(|e| anyhow::anyhow!("{e}"))?;
    let total: u64 = channels.values().map(|c| c.log.len() as u64).sum();
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    writeln!(
        w,
        "{}",
        json!({"outpost_export": 1, "replica": id.to_string(), "channels": channels.len(), "ops": total})
    )?;
    for name in BACKUP_FILES {
        match std::fs::read(data_dir.join(name)) {
            Ok(bytes) => writeln!(
                w,
                "{}",
                json!({"file": name, "base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
            )?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    let pb = bar(total, "export");
    for (name, c) in &channels {
        writeln!(
            w,
            "{}",
            json!({"channel": name.as_str(), "floor": shared::token::encode(&c.floor), "acked": c.acked})
        )?;
        for (key, reg) in &c.state {
            writeln!(
                w,
                "{}",
                json!({"register": key, "channel": name.as_str(), "value": reg})
            )?;
        }
        for op in &c.log {
            writeln!(w, "{}", json!({"op": op, "channel": name.as_str()}))?;
            pb.inc(1);
        }
    }
    w.flush()?;
    pb.finish();
    eprintln!(
        "exported {} channels, {total} ops of replica {id} to {}",
        channels.len(),
        out.display()
    );
    Ok(())
}

/// Restores a backup under a **new replica id**: the replica that was backed up may
/// have written ops after the backup, under dots the restored one would otherwise
/// hand out again. The old id's ops are kept as they are (ops of another origin), and
/// the first link compares every channel with its peers, so the edges send back what
/// the backup lacks.
/// The origin of bulk-loaded ops (no real replica has it).
const BULK_ORIGIN: u64 = 0xb0b0_0000_0000_0001;

/// See `Cmd::BulkLoad`. Each channel gets `ops` ops: events, the last one a state
/// write of key `k` (`{"n": <ops>}`), built by a replica of the bulk origin so that
/// dots, clocks and registers are what replication would have stored.
fn bulk_load(
    data_dir: &std::path::Path,
    channels: u64,
    ops: u64,
    payload_bytes: usize,
    prefix: &str,
) -> Result<()> {
    use shared::replica::{ChannelReplica, LocalOutcome, LocalWrite, ReplicaConfig};
    use shared::store::Store as _;
    use shared::sync::Persist;
    std::fs::create_dir_all(data_dir)?;
    let storage = open_storage(data_dir)?;
    // Opening built the (empty) outbox index: nothing loaded here is this node's own.
    storage.replica_id().map_err(|e| anyhow::anyhow!("{e}"))?;
    let origin = shared::ReplicaId::new(BULK_ORIGIN).context("bulk origin")?;
    let pad = "x".repeat(payload_bytes);
    let start_ms = now_ms().saturating_sub(channels * ops);
    let pb = bar(channels * ops, "bulk-load");
    let apply = |p: Persist| storage.apply(&p).map_err(|e| anyhow::anyhow!("{e}"));
    for c in 0..channels {
        let channel = shared::ChannelName::new(format!("{prefix}{c}"))?;
        let mut replica = ChannelReplica::new(channel.clone(), origin, ReplicaConfig::default());
        for n in 1..=ops {
            let hlc = shared::Hlc::new(start_ms + c * ops + n, 0);
            let write = if n == ops {
                LocalWrite::Set {
                    key: "k".into(),
                    value: shared::Payload::from_value(&json!({ "n": n })),
                    context: shared::VersionVector::new(),
                    by: None,
                }
            } else {
                LocalWrite::Event {
                    kind: "bulk".into(),
                    data: shared::Payload::from_value(&json!({ "c": c, "n": n, "pad": pad })),
                    idempotency_key: None,
                    by: None,
                }
            };
            let LocalOutcome::Applied(a) = replica.local(hlc, write)? else {
                bail!("bulk write {c}/{n} was taken as a duplicate");
            };
            if let Some((key, register)) = a.register {
                apply(Persist::Register {
                    channel: channel.clone(),
                    key,
                    register,
                })?;
            }
            apply(Persist::Op {
                channel: channel.clone(),
                op: a.op,
            })?;
        }
        pb.inc(ops);
    }
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| rt.block_on(storage.flush()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    pb.finish();
    eprintln!(
        "bulk-loaded {} ops over {channels} channels into {}",
        channels * ops,
        data_dir.display()
    );
    Ok(())
}

fn import(data_dir: &std::path::Path, input: &std::path::Path) -> Result<()> {
    use base64::Engine as _;
    use shared::store::Store as _;
    use shared::sync::Persist;
    use std::io::BufRead;
    if data_dir.join("db").exists() {
        bail!(
            "{} already holds a database: import only into an empty data dir",
            data_dir.display()
        );
    }
    let file =
        std::fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let header: Value = serde_json::from_str(&lines.next().context("empty backup")??)?;
    if header["outpost_export"] != 1 {
        bail!("{} is not an outpost export (version 1)", input.display());
    }
    let old: shared::ReplicaId = header["replica"].as_str().unwrap_or_default().parse()?;
    std::fs::create_dir_all(data_dir)?;
    let storage = open_storage(data_dir)?;
    // A fresh data dir makes a fresh id.
    let id = storage.replica_id().map_err(|e| anyhow::anyhow!("{e}"))?;
    let pb = bar(header["ops"].as_u64().unwrap_or(0), "import");
    let apply = |p: Persist| storage.apply(&p).map_err(|e| anyhow::anyhow!("{e}"));
    for (n, line) in lines.enumerate() {
        let v: Value = serde_json::from_str(&line?).with_context(|| format!("line {}", n + 2))?;
        if let Some(name) = v.get("file").and_then(Value::as_str) {
            let name = BACKUP_FILES
                .into_iter()
                .find(|f| *f == name)
                .with_context(|| format!("line {}: unknown file {name:?}", n + 2))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v["base64"].as_str().unwrap_or_default())
                .with_context(|| format!("line {}: {name}", n + 2))?;
            std::fs::write(data_dir.join(name), bytes)?;
            continue;
        }
        let channel = shared::ChannelName::new(v["channel"].as_str().unwrap_or_default())?;
        if let Some(op) = v.get("op") {
            apply(Persist::Op {
                channel,
                op: serde_json::from_value(op.clone())?,
            })?;
            pb.inc(1);
        } else if let Some(key) = v.get("register").and_then(Value::as_str) {
            apply(Persist::Register {
                channel,
                key: key.to_owned(),
                register: serde_json::from_value(v["value"].clone())?,
            })?;
        } else {
            let floor = shared::token::decode(v["floor"].as_str().unwrap_or_default())?;
            apply(Persist::Floor {
                channel: channel.clone(),
                floor,
            })?;
            apply(Persist::Acked {
                channel,
                seq: v["acked"].as_u64().unwrap_or(0),
            })?;
        }
    }
    pb.finish();
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| rt.block_on(storage.flush()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "imported the backup of replica {old} into {} as replica {id} (a restored replica never reuses the old one's dots)",
        data_dir.display()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // What went wrong and why, without a backtrace: these are user errors
            // (a wrong URL, key, channel or file) far more often than bugs.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let http = reqwest::Client::new();
    match &cli.cmd {
        Cmd::Status => {
            let health = http
                .get(format!("{}/readyz", cli.url))
                .send()
                .await
                .with_context(|| format!("cannot reach {} — is it running?", cli.url))?;
            println!("{}: {}", cli.url, health.text().await?.trim());
            if cli.operator_key.is_some() {
                let e = get(&http, &cli, "/v1/admin/edges").await?;
                let edges = e["edges"].as_array().cloned().unwrap_or_default();
                let up = edges.iter().filter(|e| e["connected"] == true).count();
                println!("edges: {up} connected of {} known", edges.len());
            }
        }
        Cmd::Edges => {
            let v = get(&http, &cli, "/v1/admin/edges").await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<12} {:<18} {:<10} {:<18} {:<9} {:>7} {:>8} {:>8} {:>8}  SINCE",
                    "NAME",
                    "REPLICA",
                    "REGION",
                    "COORDINATOR",
                    "STATE",
                    "RTT ms",
                    "LAG ops",
                    "OUTBOX",
                    "CLIENTS"
                );
                let edges = v["edges"].as_array().cloned().unwrap_or_default();
                if edges.is_empty() {
                    println!("no edge has connected yet");
                }
                for e in edges {
                    println!(
                        "{:<12} {:<18} {:<10} {:<18} {:<9} {:>7} {:>8} {:>8} {:>8}  {}",
                        e["name"].as_str().unwrap_or(""),
                        e["replica"].as_str().unwrap_or(""),
                        e["region"].as_str().unwrap_or(""),
                        e["coordinator"].as_str().unwrap_or(""),
                        if e["connected"] == true {
                            "connected"
                        } else {
                            "down"
                        },
                        e["rtt_ms"]
                            .as_u64()
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e["lag_ops"].as_u64().unwrap_or(0),
                        e["outbox_ops"].as_u64().unwrap_or(0),
                        e["clients"].as_u64().unwrap_or(0),
                        ago(e["connected_since"].as_u64().unwrap_or(0)),
                    );
                }
            }
        }
        Cmd::Channels => {
            let v = get(&http, &cli, "/v1/admin/channels").await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<32} {:>8} {:>10} {:>6} {:>9}  EDGES",
                    "CHANNEL", "OPS", "BYTES", "KEYS", "OPS/S 1m"
                );
                let channels = v["channels"].as_array().cloned().unwrap_or_default();
                if channels.is_empty() {
                    println!("no channels held in memory here");
                }
                for c in channels {
                    println!(
                        "{:<32} {:>8} {:>10} {:>6} {:>9.2}  {}",
                        c["channel"].as_str().unwrap_or(""),
                        c["ops"].as_u64().unwrap_or(0),
                        c["bytes"].as_u64().unwrap_or(0),
                        c["keys"].as_u64().unwrap_or(0),
                        c["ops_per_sec_1m"].as_f64().unwrap_or(0.0),
                        c["edges"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default(),
                    );
                }
            }
        }
        Cmd::Timeline { last_secs } => {
            let since = now_ms().saturating_sub(last_secs * 1000);
            let v = get(&http, &cli, &format!("/v1/admin/timeline?since_ms={since}")).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let events = v["events"].as_array().cloned().unwrap_or_default();
                if events.is_empty() {
                    println!("no fleet events in the last {last_secs} s");
                }
                for e in events {
                    println!(
                        "{:>9}  {:<12} {:<9} {}",
                        ago(e["time_ms"].as_u64().unwrap_or(0)),
                        e["edge"].as_str().unwrap_or(""),
                        e["kind"].as_str().unwrap_or(""),
                        e["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Conflicts { channel, last_secs } => {
            let from = now_ms().saturating_sub(last_secs * 1000);
            let mut path = format!("/v1/admin/conflicts?from_ms={from}");
            if let Some(c) = channel {
                path.push_str(&format!("&channel={c}"));
            }
            let v = get(&http, &cli, &path).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let conflicts = v["conflicts"].as_array().cloned().unwrap_or_default();
                if conflicts.is_empty() {
                    println!("none: no concurrent writes recorded in the last {last_secs} s");
                }
                for c in conflicts {
                    let who = |w: &Value| {
                        format!(
                            "{} ({} at {}{})",
                            w["dot"].as_str().unwrap_or(""),
                            w["origin_edge"].as_str().unwrap_or("cloud/unknown"),
                            w["hlc"].as_str().unwrap_or(""),
                            if w["deleted"] == true { ", delete" } else { "" }
                        )
                    };
                    let losers: Vec<String> = c["losers"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .map(who)
                        .collect();
                    println!(
                        "{:>9}  {} {:?}: won {}; lost {}",
                        ago(c["time_ms"].as_u64().unwrap_or(0)),
                        c["channel"].as_str().unwrap_or(""),
                        c["key"].as_str().unwrap_or(""),
                        who(&c["winner"]),
                        losers.join(", ")
                    );
                }
            }
        }
        Cmd::Drain { edge } | Cmd::Revoke { edge } => {
            let action = if matches!(cli.cmd, Cmd::Drain { .. }) {
                "drain"
            } else {
                "revoke"
            };
            let key = cli
                .operator_key
                .as_deref()
                .context("needs --operator-key or OUTPOST_OPERATOR_KEY")?;
            let v = post(
                &http,
                &cli,
                &format!("/v1/admin/edges/{edge}/{action}"),
                key,
                json!({}),
            )
            .await?;
            println!("{v}");
        }
        Cmd::Evict { channel } => {
            let key = cli
                .operator_key
                .as_deref()
                .context("needs --operator-key or OUTPOST_OPERATOR_KEY")?;
            let v = post(
                &http,
                &cli,
                &format!("/v1/admin/channels/{channel}/evict"),
                key,
                json!({}),
            )
            .await?;
            println!("{v}");
        }
        Cmd::Tail {
            channel,
            since,
            live,
            count,
        } => tail(&http, &cli, channel, since.clone(), *live, *count).await?,
        Cmd::Publish {
            channel,
            event,
            data,
            key,
        } => {
            let token = client_token(&cli)?;
            let data: Value = serde_json::from_str(data)
                .context("the data argument must be JSON (quote strings: '\"text\"')")?;
            let v = post(
                &http,
                &cli,
                &format!("/v1/channels/{channel}/events"),
                token,
                json!({"event": event, "data": data, "key": key}),
            )
            .await?;
            println!("{}", v["dot"].as_str().unwrap_or_default());
        }
        Cmd::Gentoken(args) => println!("{}", args.mint().map_err(anyhow::Error::msg)?),
        Cmd::Export { data_dir, out } => export(data_dir, out)?,
        Cmd::BulkLoad {
            data_dir,
            channels,
            ops_per_channel,
            payload_bytes,
            prefix,
        } => bulk_load(
            data_dir,
            *channels,
            *ops_per_channel,
            *payload_bytes,
            prefix,
        )?,
        Cmd::Import { data_dir, input } => import(data_dir, input)?,
        Cmd::Genconfig => print!(
            "{}",
            edge::config::generated_toml()
                .map_err(|e| anyhow::anyhow!("no randomness for the secret: {e}"))?
        ),
        Cmd::Checkconfig { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            EdgeConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{}: ok", file.display());
        }
    }
    Ok(())
}
