//! Jepsen-style fault schedules between real processes.
//!
//! A cloud and two edges run as processes; each edge reaches the cloud through a UDP
//! fault proxy (drop, delay/reorder, duplicate, cut). Writers publish events and set
//! state keys over WebSocket on any endpoint and record what was acknowledged;
//! subscribers follow every channel, moving between endpoints with their resume
//! tokens. A seeded controller mixes link faults, partitions and kill -9/restart of
//! edges and of the cloud; some writes are large events (40 KB), and about a third of
//! the schedules back the cloud up (`outpost export`) and later restore that older
//! backup (`outpost import`) while the edges hold newer writes. Every node runs with
//! a one-byte residency budget, so channels are unloaded and loaded from disk all
//! the time. After the schedule
//! heals, a checker verifies:
//!
//! - every acknowledged op is in the history of every replica;
//! - all replicas hold the same ops and the same state;
//! - every subscriber saw, per channel and per origin, exactly the history's sequence:
//!   in order, without duplicates and without a gap (resume tokens skipped nothing);
//! - nothing was delivered or stored that no writer sent, and no write was applied twice.
//!
//! The clustered variant runs the same writers, subscribers and checker over a 3-node
//! NATS JetStream cluster, two coordinators and two edges (four replicas to compare),
//! and its controller also kills coordinators and NATS servers — one at a time (the
//! stream leader among them) and sometimes two (a quorum loss).
//!
//! `SCHEDULES=n` runs n schedules (default 20); `SEED=n` replays schedule n alone (the
//! faults and actions are the same, process timing is not); `SEED_BASE=n` starts the
//! sweep elsewhere; `CLUSTER_SCHEDULES=n` sets the clustered count (default 20, seeds
//! from 2001). Every schedule prints its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use outpost_tests::nats::NatsCluster;
use outpost_tests::netns::Region;
use outpost_tests::proxy::{Faults, UdpProxy};
use outpost_tests::{admin_token, free_udp_port, Cloud, Edge, Ws};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};

const CHANNELS: [&str; 2] = ["project:j1", "project:j2"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const WRITERS: usize = 4;
const SUBSCRIBERS: usize = 3;
const TOKENS: [&str; 2] = [
    "edge-a-uplink-token-0123456789",
    "edge-b-uplink-token-0123456789",
];

/// Edges evict every channel they may (no subscribers, everything acked) each second,
/// so schedules also cover channels dropped and opened again.
const CACHE: &str = "[cache]\nttl_secs = 1\nmax_bytes = 1\nsweep_secs = 1\n";

/// Every node unloads every channel it may each second (a one-byte budget), so
/// schedules also cover channels loaded from disk again and again.
const RESIDENCY: &str = "[storage]\nresident_bytes = 1\nresident_idle_secs = 1\n";

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_schedules_lose_no_acknowledged_op() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let seeds: Vec<u64> = match env_u64("SEED") {
        Some(s) => vec![s],
        None => {
            let base = env_u64("SEED_BASE").unwrap_or(1);
            (base..base + env_u64("SCHEDULES").unwrap_or(20)).collect()
        }
    };
    let mut total = Totals::default();
    let started = Instant::now();
    for seed in seeds.iter().copied() {
        let t = Instant::now();
        match schedule(seed).await {
            Ok(s) => {
                eprintln!(
                    "schedule seed={seed} ok in {:.1} s: {} actions ({}), {} writes acked of {} sent, {} deliveries checked, proxies dropped {} duplicated {} delayed {} datagrams",
                    t.elapsed().as_secs_f64(),
                    s.actions.len(),
                    s.actions.join(" "),
                    s.acked,
                    s.attempted,
                    s.deliveries,
                    s.dropped,
                    s.duplicated,
                    s.delayed,
                );
                total.add(&s);
            }
            Err(e) => {
                return Err(e.context(format!(
                    "schedule seed={seed} FAILED (replay: SEED={seed} cargo test -p outpost-tests --test faults)"
                )))
            }
        }
    }
    eprintln!(
        "{} schedules in {:.0} s: {} acknowledged ops checked on 3 replicas, {} deliveries checked, {} kills, {} partitions",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        total.acked,
        total.deliveries,
        total.kills,
        total.cuts
    );
    Ok(())
}

/// The same schedules with the cloud in its own network namespace, behind a veth link
/// with `tc netem` latency and loss (needs root; skips with a message elsewhere).
/// `NETNS_SCHEDULES=n` (default 3) schedules, seeds from 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_across_regions_with_netem_latency_and_loss() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let region = match Region::create(7, NETEM)? {
        Ok(r) => r,
        Err(why) => {
            eprintln!("SKIPPED: network namespaces unavailable ({why})");
            return Ok(());
        }
    };
    let n = env_u64("NETNS_SCHEDULES").unwrap_or(3);
    for seed in 1001..1001 + n {
        let t = Instant::now();
        let s = schedule_in(seed, Some(&region)).await.map_err(|e| {
            e.context(format!(
                "netem schedule seed={seed} FAILED (replay: SEED={seed} cargo test -p outpost-tests --test faults regions)"
            ))
        })?;
        eprintln!(
            "netns schedule seed={seed} ok in {:.1} s ({}): {} ({}), {} writes acked of {} sent, {} deliveries checked",
            t.elapsed().as_secs_f64(),
            if region.netem { NETEM } else { "no netem in this kernel: link cuts only" },
            s.actions.len(),
            s.actions.join(" "),
            s.acked,
            s.attempted,
            s.deliveries
        );
    }
    Ok(())
}

/// The same checker over the clustered cloud tier: a 3-node NATS JetStream cluster
/// (R3, `sync_interval: always`), 2 coordinators and 2 edges, each edge listing both
/// coordinators through fault proxies. The controller also kills coordinators and
/// NATS servers (one at a time, and sometimes two: a quorum loss).
/// `CLUSTER_SCHEDULES=n` (default 20), seeds from 2001; `SEED=n` replays one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clustered_fault_schedules_lose_no_acknowledged_op() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let seeds: Vec<u64> = match env_u64("SEED") {
        Some(s) => vec![s],
        None => (2001..2001 + env_u64("CLUSTER_SCHEDULES").unwrap_or(20)).collect(),
    };
    let mut total = Totals::default();
    let started = Instant::now();
    for seed in seeds.iter().copied() {
        let t = Instant::now();
        let s = cluster_schedule(seed).await.map_err(|e| {
            e.context(format!(
                "clustered schedule seed={seed} FAILED (replay: SEED={seed} cargo test -p outpost-tests --test faults clustered)"
            ))
        })?;
        eprintln!(
            "clustered schedule seed={seed} ok in {:.1} s: {} actions ({}), {} writes acked of {} sent, {} deliveries checked",
            t.elapsed().as_secs_f64(),
            s.actions.len(),
            s.actions.join(" "),
            s.acked,
            s.attempted,
            s.deliveries
        );
        total.add(&s);
    }
    eprintln!(
        "{} clustered schedules in {:.0} s: {} acknowledged ops checked on 4 replicas, {} deliveries checked, {} kills, {} partitions",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        total.acked,
        total.deliveries,
        total.kills,
        total.cuts
    );
    Ok(())
}

/// One clustered schedule.
async fn cluster_schedule(seed: u64) -> Result<Summary> {
    let dir = match std::env::var("TEST_KEEP_DIR") {
        Ok(p) => tempfile::Builder::new()
            .prefix(&format!("cluster-{seed}-"))
            .disable_cleanup(true)
            .tempdir_in(p)?,
        Err(_) => tempfile::tempdir()?,
    };
    let mut nats = NatsCluster::start(dir.path(), 3).await?;
    let allowed = [("edge-a", TOKENS[0]), ("edge-b", TOKENS[1])];
    let js = nats.jetstream_toml(3);
    let c1 = Cloud::start(
        &dir.path().join("c1"),
        free_udp_port()?,
        &allowed,
        &format!("{js}\n{RESIDENCY}"),
    )?;
    // The second coordinator serves the first one's certificate: edges pin one.
    let data2 = dir.path().join("c2").join("data");
    std::fs::create_dir_all(&data2)?;
    for f in [
        edge::link::tls::DEV_CERT_FILE,
        edge::link::tls::DEV_KEY_FILE,
    ] {
        std::fs::copy(c1.dir.join("data").join(f), data2.join(f))?;
    }
    let c2 = Cloud::start(
        &dir.path().join("c2"),
        free_udp_port()?,
        &allowed,
        &format!("{js}\n{RESIDENCY}"),
    )?;
    let mut coords = [c1, c2];
    // Proxies: edge x to coordinator k is proxies[2 * x + k].
    let mut proxies = Vec::new();
    for x in 0..2u64 {
        for (k, c) in coords.iter().enumerate() {
            proxies
                .push(UdpProxy::start(c.quic, seed.wrapping_mul(1000) + 10 * x + k as u64).await?);
        }
    }
    let mut edges = Vec::new();
    for (x, name) in ["a", "b"].iter().enumerate() {
        // Edge A prefers coordinator 1, edge B coordinator 2.
        let order = if x == 0 { [0, 1] } else { [1, 0] };
        let eps: Vec<String> = order
            .iter()
            .map(|k| format!("\"{}\"", proxies[2 * x + k].addr))
            .collect();
        edges.push(Edge::start(
            &dir.path().join(name),
            &format!(
                "[uplink]\nendpoints = [{}]\ntoken = \"{}\"\npin_sha256 = \"{}\"\nbackoff_min_ms = 50\nbackoff_max_ms = 500\nkeepalive_ms = 300\nidle_timeout_ms = 1500\n\n{CACHE}\n{RESIDENCY}",
                eps.join(", "),
                TOKENS[x],
                coords[0].fingerprint
            ),
        )?);
    }
    let r = run_cluster_schedule(seed, &mut nats, &mut coords, &mut edges, &proxies).await;
    r.inspect_err(|_| {
        print_log_tails(&[
            ("coordinator 1", coords[0].log()),
            ("coordinator 2", coords[1].log()),
            ("edge A", edges[0].log()),
            ("edge B", edges[1].log()),
            ("nats", nats.logs()),
        ])
    })
}

async fn run_cluster_schedule(
    seed: u64,
    nats: &mut NatsCluster,
    coords: &mut [Cloud; 2],
    edges: &mut [Edge],
    proxies: &[UdpProxy],
) -> Result<Summary> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let eps = Arc::new(Endpoints::new(4));
    eps.set(0, Some(edges[0].addr));
    eps.set(1, Some(edges[1].addr));
    eps.set(2, Some(coords[0].addr));
    eps.set(3, Some(coords[1].addr));
    let clients = Clients::start(seed, &eps, 4);
    let mut actions = Vec::new();
    let steps = rng.random_range(8..=14);
    for _ in 0..steps {
        let x = rng.random_range(0..2usize);
        let name = ["a", "b"][x];
        match rng.random_range(0..12u32) {
            0..=1 => {
                for k in 0..2 {
                    proxies[2 * x + k].set(Faults {
                        drop: rng.random_range(0.0..0.3),
                        dup: rng.random_range(0.0..0.2),
                        delay_ms: rng.random_range(0..40),
                        cut: false,
                    });
                }
                actions.push(format!("lossy-{name}"));
            }
            2 => {
                // Cut the edge from its preferred coordinator only: it moves.
                let k = x;
                proxies[2 * x + k].cut();
                actions.push(format!("cut-{name}-from-c{}", k + 1));
            }
            3 => {
                for k in 0..2 {
                    proxies[2 * x + k].heal();
                }
                actions.push(format!("heal-{name}"));
            }
            4..=5 => {
                edges[x].kill9();
                eps.set(x, None);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                tokio::task::block_in_place(|| edges[x].restart())
                    .with_context(|| format!("restarting edge {name}"))?;
                eps.set(x, Some(edges[x].addr));
                actions.push(format!("kill-{name}"));
            }
            6..=7 => {
                let k = rng.random_range(0..2usize);
                coords[k].kill9();
                eps.set(2 + k, None);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
                tokio::task::block_in_place(|| coords[k].restart())
                    .with_context(|| format!("restarting coordinator {}", k + 1))?;
                eps.set(2 + k, Some(coords[k].addr));
                actions.push(format!("kill-c{}", k + 1));
            }
            8..=9 => {
                let n = rng.random_range(0..3usize);
                nats.kill9(n);
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                nats.restart(n)?;
                actions.push(format!("kill-nats{n}"));
            }
            10 => {
                // Quorum lost for a while: coordinators hold acks, edges keep writing.
                let n = rng.random_range(0..3usize);
                let m = (n + 1) % 3;
                nats.kill9(n);
                nats.kill9(m);
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
                nats.restart(n)?;
                nats.restart(m)?;
                actions.push(format!("kill-nats{n}+{m}"));
            }
            _ => actions.push("calm".to_owned()),
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
    }
    nats.wait_meta_leader().await?;
    check(seed, eps, clients, proxies, actions).await
}

/// Latency and loss between the edges' region and the cloud's.
const NETEM: &str = "delay 15ms 5ms loss 1%";

/// The two schedule tests run one at a time (they time real processes).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Totals {
    acked: usize,
    deliveries: usize,
    kills: usize,
    cuts: usize,
}

impl Totals {
    fn add(&mut self, s: &Summary) {
        self.acked += s.acked;
        self.deliveries += s.deliveries;
        self.kills += s.actions.iter().filter(|a| a.starts_with("kill")).count();
        self.cuts += s.actions.iter().filter(|a| a.starts_with("cut")).count();
    }
}

struct Summary {
    actions: Vec<String>,
    acked: usize,
    attempted: usize,
    deliveries: usize,
    dropped: u64,
    duplicated: u64,
    delayed: u64,
}

/// One delivered op as a subscriber saw it.
#[derive(Debug, Clone)]
struct Delivery {
    channel: String,
    dot: String,
    tag: Option<String>,
}

/// Every write sent: tag -> (channel, key for a set).
type Attempted = HashMap<String, (String, Option<String>)>;

/// The recorded history of one schedule.
#[derive(Default)]
struct Recorder {
    attempted: Attempted,
    /// Every write acknowledged: tag -> dot.
    acked: HashMap<String, String>,
    /// Error replies by code.
    errors: BTreeMap<String, u64>,
    deliveries: Vec<Vec<Delivery>>,
    /// Per subscriber: `(channel, position)` of every `subscribed` with `truncated:
    /// true` — the ops up to that position it may never get one by one (they exist
    /// only as state where it is), as the protocol allows.
    truncations: Vec<Vec<(String, shared::VersionVector)>>,
    /// Per subscriber: the endpoint it is connected to (index into the endpoints).
    endpoint: Vec<usize>,
}

type Rec = Arc<Mutex<Recorder>>;

/// Whether a truncation notice of subscriber `jumps` covers `dot` on `channel`.
fn truncated_over(jumps: &[(String, shared::VersionVector)], channel: &str, dot: &str) -> bool {
    let Some((origin, seq)) = split_dot(dot) else {
        return false;
    };
    let Ok(origin) = origin.parse::<shared::ReplicaId>() else {
        return false;
    };
    jumps
        .iter()
        .any(|(c, vv)| c == channel && vv.get(origin) >= seq)
}

fn lock(r: &Rec) -> std::sync::MutexGuard<'_, Recorder> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// The current address of each endpoint: edge A, edge B, then the cloud or the
/// coordinators (None while down).
struct Endpoints(Mutex<Vec<Option<SocketAddr>>>);

impl Endpoints {
    fn new(n: usize) -> Self {
        Self(Mutex::new(vec![None; n]))
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    fn get(&self, i: usize) -> Option<SocketAddr> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g[i % g.len()]
    }
    fn set(&self, i: usize, a: Option<SocketAddr>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[i] = a;
    }
}

async fn connect(eps: &Endpoints, at: usize) -> Option<Ws> {
    let addr = eps.get(at)?;
    let url = format!("ws://{addr}/v1/ws?token={}", admin_token());
    tokio::time::timeout(Duration::from_secs(2), Ws::connect_url(&url))
        .await
        .ok()?
        .ok()
}

fn tag_of(op: &Value) -> Option<String> {
    match op["op"].as_str() {
        Some("event") => op["data"]["tag"].as_str().map(str::to_owned),
        Some("set") => op["value"].as_str().map(str::to_owned),
        _ => None,
    }
}

/// Sends writes one at a time to whichever endpoint it reaches, recording acks.
/// `endpoints` is 3 (edges and cloud) or 2 (edges only: in schedules that restore the
/// cloud from an older backup, what only the cloud held after the backup is lost by
/// definition, so writes go where they stay held — edges keep what they wrote).
async fn writer(
    i: usize,
    seed: u64,
    endpoints: usize,
    eps: Arc<Endpoints>,
    rec: Rec,
    stop: Arc<AtomicBool>,
) {
    let mut rng = SmallRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(i as u64));
    let mut at = i % endpoints;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect(&eps, at).await else {
            at = rng.random_range(0..endpoints);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let tag = format!("w{i}-{n}");
            let ch = CHANNELS[rng.random_range(0..CHANNELS.len())];
            let (req, key) = if rng.random_bool(0.25) {
                let key = KEYS[rng.random_range(0..KEYS.len())];
                (
                    json!({"type": "set", "channel": ch, "key": key, "value": tag}),
                    Some(key.to_owned()),
                )
            } else if rng.random_bool(0.05) {
                // Large events make backlogs that must cross in byte-bounded batches.
                (
                    json!({"type": "publish", "channel": ch, "event": "blob", "data": {"tag": tag, "blob": "x".repeat(40_000)}}),
                    None,
                )
            } else {
                (
                    json!({"type": "publish", "channel": ch, "event": "job", "data": {"tag": tag}}),
                    None,
                )
            };
            lock(&rec)
                .attempted
                .insert(tag.clone(), (ch.to_owned(), key));
            match tokio::time::timeout(Duration::from_secs(3), ws.request(req, n)).await {
                Ok(Ok(r)) if r["type"] == "ack" => {
                    let dot = r["dot"].as_str().unwrap_or_default().to_owned();
                    lock(&rec).acked.insert(tag, dot);
                }
                Ok(Ok(r)) => {
                    let code = r["code"].as_str().unwrap_or("?").to_owned();
                    *lock(&rec).errors.entry(code).or_default() += 1;
                    break;
                }
                // The connection went away or the reply did not come: the write's
                // fate is unknown (it may or may not exist).
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..30))).await;
        }
        at = rng.random_range(0..endpoints);
    }
}

/// Follows every channel, resuming with its tokens on another endpoint when its own
/// goes away; records every delivered op.
async fn subscriber(j: usize, seed: u64, eps: Arc<Endpoints>, rec: Rec, stop: Arc<AtomicBool>) {
    let mut rng = SmallRng::seed_from_u64(seed.wrapping_mul(37).wrapping_add(100 + j as u64));
    let mut tokens: HashMap<String, String> = HashMap::new();
    let mut at = j;
    'outer: while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect(&eps, at).await else {
            at = rng.random_range(0..eps.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        lock(&rec).endpoint[j] = at;
        for (k, ch) in CHANNELS.iter().enumerate() {
            let mut req = json!({"type": "subscribe", "id": 1000 + k, "channel": ch});
            if let Some(t) = tokens.get(*ch) {
                req["since"] = t.clone().into();
            }
            if ws.send(req).await.is_err() {
                continue 'outer;
            }
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            let m = match tokio::time::timeout(
                Duration::from_millis(200),
                ws.recv_within(Duration::from_secs(3600)),
            )
            .await
            {
                Err(_) => continue,
                Ok(Ok(m)) => m,
                Ok(Err(_)) => break,
            };
            let ch = m["channel"].as_str().unwrap_or_default().to_owned();
            match m["type"].as_str() {
                Some("op") => {
                    lock(&rec).deliveries[j].push(Delivery {
                        channel: ch.clone(),
                        dot: m["dot"].as_str().unwrap_or_default().to_owned(),
                        tag: tag_of(&m),
                    });
                    if let Some(t) = m["token"].as_str() {
                        tokens.insert(ch, t.to_owned());
                    }
                }
                Some("subscribed") => {
                    if let Some(t) = m["token"].as_str() {
                        if m["truncated"] == true {
                            if let Ok(vv) = shared::token::decode(t) {
                                lock(&rec).truncations[j].push((ch.clone(), vv));
                            }
                        }
                        tokens.insert(ch, t.to_owned());
                    }
                }
                Some("error") => {
                    let code = m["code"].as_str().unwrap_or("?").to_owned();
                    *lock(&rec).errors.entry(code).or_default() += 1;
                    break;
                }
                _ => {}
            }
        }
        at = rng.random_range(0..eps.len());
    }
}

/// Every op of `channel` at `addr`, following pages.
async fn full_history(
    http: &reqwest::Client,
    addr: SocketAddr,
    channel: &str,
) -> Result<Vec<Value>> {
    let mut ops = Vec::new();
    let mut since: Option<String> = None;
    loop {
        let mut url = format!("http://{addr}/v1/channels/{channel}/history?limit=1000");
        if let Some(s) = &since {
            url.push_str(&format!("&since={s}"));
        }
        let v: Value = http
            .get(&url)
            .bearer_auth(admin_token())
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if v["truncated"] == true {
            bail!("history of {channel} at {addr} is truncated");
        }
        ops.extend(v["ops"].as_array().cloned().unwrap_or_default());
        since = v["token"].as_str().map(str::to_owned);
        if v["more"] != true {
            return Ok(ops);
        }
    }
}

async fn state(http: &reqwest::Client, addr: SocketAddr, channel: &str) -> Result<Value> {
    Ok(http
        .get(format!(
            "http://{addr}/v1/channels/{channel}/state?siblings=true"
        ))
        .bearer_auth(admin_token())
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Per key, what differs between the replicas' states (siblings and contexts).
fn state_diff(states: &[Value]) -> String {
    let keyed = |v: &Value| -> BTreeMap<String, Value> {
        v["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|k| (k["key"].as_str().unwrap_or_default().to_owned(), k.clone()))
            .collect()
    };
    let all: Vec<BTreeMap<String, Value>> = states.iter().map(keyed).collect();
    let names = ["A", "B", "cloud / coordinator 1", "coordinator 2"];
    let mut out = String::new();
    let keys: BTreeSet<&String> = all.iter().flat_map(|m| m.keys()).collect();
    for key in keys {
        let regs: Vec<Option<&Value>> = all.iter().map(|m| m.get(key)).collect();
        if regs.iter().all(|r| *r == regs[0]) {
            continue;
        }
        let sibs = |r: Option<&Value>| -> BTreeSet<String> {
            r.and_then(|r| r["siblings"].as_array())
                .into_iter()
                .flatten()
                .map(|s| format!("{}={}", s["dot"].as_str().unwrap_or("?"), s["value"]))
                .collect()
        };
        let union: BTreeSet<String> = regs.iter().flat_map(|r| sibs(*r)).collect();
        out.push_str(&format!("key {key}:\n"));
        for (i, r) in regs.iter().enumerate() {
            let mine = sibs(*r);
            let missing: Vec<&String> = union.difference(&mine).collect();
            out.push_str(&format!(
                "  {}: winner {} context {} siblings {}, lacks {:?}\n",
                names[i],
                r.map_or(Value::Null, |r| r["value"].clone()),
                r.map_or(Value::Null, |r| r["context"].clone()),
                mine.len(),
                missing
            ));
        }
    }
    out
}

fn split_dot(dot: &str) -> Option<(&str, u64)> {
    let (o, s) = dot.rsplit_once(':')?;
    Some((o, s.parse().ok()?))
}

/// Dots by origin, in the order given.
fn by_origin<'a>(dots: impl Iterator<Item = &'a str>) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for d in dots {
        if let Some((o, s)) = split_dot(d) {
            m.entry(o.to_owned()).or_default().push(s);
        }
    }
    m
}

async fn schedule(seed: u64) -> Result<Summary> {
    schedule_in(seed, None).await
}

/// One schedule; with a region, the cloud runs inside it (behind netem).
async fn schedule_in(seed: u64, region: Option<&Region>) -> Result<Summary> {
    let dir = match std::env::var("TEST_KEEP_DIR") {
        Ok(p) => tempfile::Builder::new()
            .prefix(&format!("faults-{seed}-"))
            .disable_cleanup(true)
            .tempdir_in(p)?,
        Err(_) => tempfile::tempdir()?,
    };
    let edges_allowed = [("edge-a", TOKENS[0]), ("edge-b", TOKENS[1])];
    // About a third of the schedules back the cloud up and restore it later. Those
    // keep every channel on the edges that wrote it (no cache eviction): a restore
    // loses what only the cloud held, by definition.
    let plan = restore_plan(seed);
    let mut cloud = match region {
        None => Cloud::start(
            &dir.path().join("cloud"),
            free_udp_port()?,
            &edges_allowed,
            RESIDENCY,
        )?,
        Some(r) => Cloud::start_in(
            &dir.path().join("cloud"),
            &r.ns_ip.to_string(),
            &r.exec_prefix(),
            7800,
            &edges_allowed,
            RESIDENCY,
        )?,
    };
    let proxies = [
        UdpProxy::start(cloud.quic, seed.wrapping_mul(1000) + 1).await?,
        UdpProxy::start(cloud.quic, seed.wrapping_mul(1000) + 2).await?,
    ];
    let mut edges = Vec::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let cache = if plan.is_some() { "" } else { CACHE };
        edges.push(Edge::start(
            &dir.path().join(name),
            &format!(
                "{}\n{cache}\n{RESIDENCY}",
                cloud.uplink_toml_via(proxies[i].addr, TOKENS[i])
            ),
        )?);
    }
    let r = run_schedule(seed, &mut cloud, &mut edges, &proxies, region, plan).await;
    let r = r.inspect_err(|_| {
        print_log_tails(&[
            ("cloud", cloud.log()),
            ("edge A", edges[0].log()),
            ("edge B", edges[1].log()),
        ])
    })?;
    let st = |i: usize| {
        (
            proxies[i].stats().dropped.load(Ordering::Relaxed),
            proxies[i].stats().duplicated.load(Ordering::Relaxed),
            proxies[i].stats().delayed.load(Ordering::Relaxed),
        )
    };
    let ((d0, u0, l0), (d1, u1, l1)) = (st(0), st(1));
    Ok(Summary {
        dropped: d0 + d1,
        duplicated: u0 + u1,
        delayed: l0 + l1,
        ..r
    })
}

/// Which steps back the cloud up and restore that backup, if this schedule does.
fn restore_plan(seed: u64) -> Option<(usize, usize)> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xbac0_0b5e);
    rng.random_bool(0.35).then(|| {
        // Within the shortest schedule (8 steps).
        let backup = rng.random_range(1..4);
        (backup, backup + rng.random_range(2..5))
    })
}

async fn run_schedule(
    seed: u64,
    cloud: &mut Cloud,
    edges: &mut [Edge],
    proxies: &[UdpProxy; 2],
    region: Option<&Region>,
    plan: Option<(usize, usize)>,
) -> Result<Summary> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let eps = Arc::new(Endpoints::new(3));
    eps.set(0, Some(edges[0].addr));
    eps.set(1, Some(edges[1].addr));
    eps.set(2, Some(cloud.addr));
    let clients = Clients::start(seed, &eps, if plan.is_some() { 2 } else { 3 });

    // The schedule: a seeded mix of link faults, partitions and crashes.
    let mut actions = Vec::new();
    let steps = rng.random_range(8..=14);
    let backup = cloud.dir.join("backup.jsonl");
    for step in 0..steps {
        if let Some((b, r)) = plan {
            if step == b || step == r {
                eps.set(2, None);
                let what = if step == b {
                    "backup-cloud"
                } else {
                    "restore-cloud"
                };
                tokio::task::block_in_place(|| {
                    if step == b {
                        cloud.backup(&backup)
                    } else {
                        cloud.restore_from(&backup)
                    }
                })
                .context(what)?;
                eps.set(2, Some(cloud.addr));
                actions.push(what.to_owned());
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
                continue;
            }
        }
        let x = rng.random_range(0..2usize);
        let name = ["a", "b"][x];
        match rng.random_range(0..10u32) {
            0..=2 => {
                let f = Faults {
                    drop: rng.random_range(0.0..0.3),
                    dup: rng.random_range(0.0..0.2),
                    delay_ms: rng.random_range(0..40),
                    cut: false,
                };
                proxies[x].set(f);
                actions.push(format!("lossy-{name}"));
            }
            3..=4 => {
                proxies[x].cut();
                actions.push(format!("cut-{name}"));
            }
            5 => {
                proxies[x].heal();
                actions.push(format!("heal-{name}"));
            }
            6..=7 => {
                edges[x].kill9();
                eps.set(x, None);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                tokio::task::block_in_place(|| edges[x].restart())
                    .with_context(|| format!("restarting edge {name}"))?;
                eps.set(x, Some(edges[x].addr));
                actions.push(format!("kill-{name}"));
            }
            8 => {
                cloud.kill9();
                eps.set(2, None);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                tokio::task::block_in_place(|| cloud.restart()).context("restarting the cloud")?;
                eps.set(2, Some(cloud.addr));
                actions.push("kill-cloud".to_owned());
            }
            // With a region: the kernel drops everything between the regions.
            9 if region.is_some() => {
                if let Some(r) = region {
                    r.set("delay 15ms 5ms loss 100%")?;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
                    r.set(NETEM)?;
                }
                actions.push("region-cut".to_owned());
            }
            // Without a region: the edge freezes (SIGSTOP) — its sockets stay open and
            // nothing answers, as after a power loss or a blackholed route — and then
            // goes on as if nothing happened (SIGCONT).
            9 => {
                edges[x]
                    .signal("STOP")
                    .with_context(|| format!("freezing edge {name}"))?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
                edges[x]
                    .signal("CONT")
                    .with_context(|| format!("thawing edge {name}"))?;
                actions.push(format!("freeze-{name}"));
            }
            _ => actions.push("calm".to_owned()),
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
    }

    check(seed, eps, clients, proxies, actions).await
}

/// The writers and subscribers of one schedule, and what they recorded.
struct Clients {
    rec: Rec,
    stop_writers: Arc<AtomicBool>,
    stop_subs: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<()>>,
    subs: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    /// Starts the subscribers (over every endpoint) and the writers (over the first
    /// `writer_endpoints`).
    fn start(seed: u64, eps: &Arc<Endpoints>, writer_endpoints: usize) -> Self {
        let rec: Rec = Arc::new(Mutex::new(Recorder {
            deliveries: vec![Vec::new(); SUBSCRIBERS],
            truncations: vec![Vec::new(); SUBSCRIBERS],
            endpoint: vec![0; SUBSCRIBERS],
            ..Recorder::default()
        }));
        let stop_writers = Arc::new(AtomicBool::new(false));
        let stop_subs = Arc::new(AtomicBool::new(false));
        let subs = (0..SUBSCRIBERS)
            .map(|j| {
                tokio::spawn(subscriber(
                    j,
                    seed,
                    eps.clone(),
                    rec.clone(),
                    stop_subs.clone(),
                ))
            })
            .collect();
        let writers = (0..WRITERS)
            .map(|i| {
                let (eps, rec, stop) = (eps.clone(), rec.clone(), stop_writers.clone());
                tokio::spawn(writer(i, seed, writer_endpoints, eps, rec, stop))
            })
            .collect();
        Self {
            rec,
            stop_writers,
            stop_subs,
            writers,
            subs,
        }
    }
}

/// Heals, runs the checker, and names the schedule's actions in any failure.
async fn check(
    seed: u64,
    eps: Arc<Endpoints>,
    clients: Clients,
    proxies: &[UdpProxy],
    actions: Vec<String>,
) -> Result<Summary> {
    let r = check_history(seed, eps, clients, proxies).await;
    r.map(|mut s| {
        s.actions = actions.clone();
        s
    })
    .with_context(|| format!("after actions {}", actions.join(" ")))
}

async fn check_history(
    seed: u64,
    eps: Arc<Endpoints>,
    clients: Clients,
    proxies: &[UdpProxy],
) -> Result<Summary> {
    let Clients {
        rec,
        stop_writers,
        stop_subs,
        writers,
        subs,
    } = clients;
    // Heal everything and let the writers finish.
    for p in proxies {
        p.heal();
    }
    stop_writers.store(true, Ordering::Relaxed);
    for w in writers {
        w.await?;
    }

    // Make every endpoint hold every channel (an edge answers reads only for channels
    // it holds), then wait for the replicas to converge.
    // Holders read (and drop) everything, or the edge would rightly close them as slow
    // consumers when a channel's history arrives in a burst.
    let stop_holders = Arc::new(AtomicBool::new(false));
    let mut holders = Vec::new();
    let n = eps.len();
    for i in 0..n {
        let (eps, stop) = (eps.clone(), stop_holders.clone());
        holders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(mut ws) = connect(&eps, i).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                for (k, ch) in CHANNELS.iter().enumerate() {
                    let req = json!({"type": "subscribe", "id": 2000 + k, "channel": ch});
                    let _ = ws.send(req).await;
                }
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(
                        Duration::from_millis(200),
                        ws.recv_within(Duration::from_secs(3600)),
                    )
                    .await
                    {
                        Err(_) | Ok(Ok(_)) => {}
                        Ok(Err(_)) => break,
                    }
                }
            }
        }));
    }
    let http = reqwest::Client::new();
    let (acked, attempted): (HashMap<String, String>, Attempted) = {
        let r = lock(&rec);
        (r.acked.clone(), r.attempted.clone())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let histories: BTreeMap<&str, Vec<Value>> = loop {
        let mut problem = None;
        let mut out = BTreeMap::new();
        'check: for ch in CHANNELS {
            let mut sets = Vec::new();
            for i in 0..n {
                let addr = eps.get(i).context("endpoint down")?;
                // Transient while an edge waits for its link to return with the
                // base of a channel it evicted and opened again.
                let ops = match full_history(&http, addr, ch).await {
                    Ok(ops) => ops,
                    Err(e) => {
                        problem = Some(format!("endpoint {i}: {e:#}"));
                        break 'check;
                    }
                };
                // dot -> writer tag: the same dot must carry the same write everywhere.
                let dots: BTreeMap<String, Option<String>> = ops
                    .iter()
                    .filter_map(|o| o["dot"].as_str().map(|d| (d.to_owned(), tag_of(o))))
                    .collect();
                let missing: Vec<&String> = acked
                    .iter()
                    .filter(|(t, d)| {
                        attempted[*t].0 == ch && dots.get(*d) != Some(&Some((*t).clone()))
                    })
                    .map(|(_, d)| d)
                    .collect();
                if !missing.is_empty() {
                    let p = problem.get_or_insert_with(String::new);
                    p.push_str(&format!(
                        "endpoint {i} lacks {} acknowledged ops of {ch} (or holds another write at their dot), e.g. {:?}; ",
                        missing.len(),
                        &missing[..missing.len().min(5)]
                    ));
                    continue;
                }
                if i == 0 {
                    out.insert(ch, ops);
                }
                sets.push(dots);
            }
            if problem.is_some() {
                break;
            }
            if sets.iter().any(|s| *s != sets[0]) {
                let differing: Vec<&String> = sets
                    .iter()
                    .flat_map(|m| m.keys())
                    .filter(|d| sets.iter().any(|s| s.get(*d) != sets[0].get(*d)))
                    .take(5)
                    .collect();
                let show: Vec<String> = differing
                    .iter()
                    .map(|d| {
                        let each: Vec<String> =
                            sets.iter().map(|s| format!("{:?}", s.get(*d))).collect();
                        format!("{d}: {}", each.join(" / "))
                    })
                    .collect();
                let sizes: Vec<String> = sets.iter().map(|s| s.len().to_string()).collect();
                problem = Some(format!(
                    "replicas differ on {ch}: {} ops (A, B, then the cloud tier), e.g. {show:?}",
                    sizes.join(" / ")
                ));
                break;
            }
        }
        match problem {
            None => break out,
            Some(p) if Instant::now() > deadline => bail!("no convergence within 60 s: {p}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };

    // Identical state on every replica, and every value is a write that was sent.
    let mut final_states = BTreeMap::new();
    for ch in CHANNELS {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut states = Vec::new();
            for i in 0..n {
                states.push(state(&http, eps.get(i).context("endpoint down")?, ch).await?);
            }
            if states.iter().all(|s| *s == states[0]) {
                final_states.insert(ch, states.swap_remove(0));
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "state of {ch} differs between replicas:\n{}",
                state_diff(&states)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Nothing stored that was not sent; nothing applied twice; acks name the stored dot.
    let mut stored_tags: HashMap<String, String> = HashMap::new();
    for (ch, ops) in &histories {
        for op in ops {
            let dot = op["dot"].as_str().unwrap_or_default().to_owned();
            let Some(tag) = tag_of(op) else {
                bail!("{ch}: stored op {op} carries no writer tag");
            };
            ensure!(
                attempted.get(&tag).is_some_and(|(c, _)| c == ch),
                "{ch}: stored op {dot} ({tag}) was never sent to {ch}"
            );
            if let Some(prev) = stored_tags.insert(tag.clone(), dot.clone()) {
                bail!("write {tag} was applied twice: {prev} and {dot}");
            }
            if let Some(a) = acked.get(&tag) {
                ensure!(
                    a == &dot,
                    "write {tag} was acked as {a} but stored as {dot}"
                );
            }
        }
    }

    // Every subscriber catches up, then must have seen exactly the history per origin.
    let expected: BTreeMap<&str, BTreeMap<String, Vec<u64>>> = histories
        .iter()
        .map(|(ch, ops)| {
            let mut m = by_origin(ops.iter().filter_map(|o| o["dot"].as_str()));
            for v in m.values_mut() {
                v.sort_unstable();
            }
            (*ch, m)
        })
        .collect();
    let total: usize = histories.values().map(Vec::len).sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (behind, errors): (Vec<(usize, usize, usize, usize)>, _) = {
            let r = lock(&rec);
            let b = r
                .deliveries
                .iter()
                .enumerate()
                .map(|(j, d)| {
                    // Seen, plus what a truncation notice told it it would not see.
                    let per = |ch: &str| {
                        let seen: BTreeSet<&str> = d
                            .iter()
                            .filter(|x| x.channel == ch)
                            .map(|x| x.dot.as_str())
                            .collect();
                        let skipped = histories.get(ch).map_or(0, |ops| {
                            ops.iter()
                                .filter_map(|o| o["dot"].as_str())
                                .filter(|d| {
                                    !seen.contains(d) && truncated_over(&r.truncations[j], ch, d)
                                })
                                .count()
                        });
                        seen.len() + skipped
                    };
                    (j, per(CHANNELS[0]), per(CHANNELS[1]), r.endpoint[j])
                })
                .filter(|(_, a, b, _)| a + b < total)
                .collect();
            (b, r.errors.clone())
        };
        if behind.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "subscribers did not catch up within 30 s (subscriber, distinct ops seen or skipped by a truncation notice per channel, endpoint it is on; history: {:?}): {behind:?}; error replies {errors:?}",
            histories.values().map(Vec::len).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_subs.store(true, Ordering::Relaxed);
    for s in subs {
        s.await?;
    }
    stop_holders.store(true, Ordering::Relaxed);
    for h in holders {
        h.await?;
    }
    let r = lock(&rec);
    let mut deliveries = 0;
    for (j, ds) in r.deliveries.iter().enumerate() {
        deliveries += ds.len();
        for d in ds {
            let Some(tag) = &d.tag else {
                bail!("subscriber {j} got an op without a writer tag: {d:?}");
            };
            ensure!(
                stored_tags.get(tag) == Some(&d.dot),
                "subscriber {j} got {tag} as {} which the history does not hold",
                d.dot
            );
        }
        for ch in CHANNELS {
            let got = by_origin(
                ds.iter()
                    .filter(|d| d.channel == ch)
                    .map(|d| d.dot.as_str()),
            );
            let want = &expected[ch];
            for (origin, seqs) in want {
                let g = got.get(origin).cloned().unwrap_or_default();
                // The history's sequence, less what a truncation notice skipped.
                let seqs: Vec<u64> = seqs
                    .iter()
                    .copied()
                    .filter(|s| {
                        g.contains(s)
                            || !truncated_over(&r.truncations[j], ch, &format!("{origin}:{s}"))
                    })
                    .collect();
                let seqs = &seqs;
                if &g != seqs {
                    let first = g
                        .iter()
                        .zip(seqs.iter())
                        .position(|(a, b)| a != b)
                        .unwrap_or(g.len().min(seqs.len()));
                    bail!(
                        "subscriber {j} on {ch} from origin {origin}: saw {} ops, history has {}; first difference at position {first}: saw {:?}, history {:?}",
                        g.len(),
                        seqs.len(),
                        &g[first.saturating_sub(2)..(first + 3).min(g.len())],
                        &seqs[first.saturating_sub(2)..(first + 3).min(seqs.len())]
                    );
                }
            }
            ensure!(
                got.keys().all(|o| want.contains_key(o)),
                "subscriber {j} on {ch} saw an origin the history does not have"
            );
        }
    }
    if !r.errors.is_empty() {
        eprintln!("seed={seed}: error replies {:?}", r.errors);
    }
    let notices: usize = r.truncations.iter().map(Vec::len).sum();
    if notices > 0 {
        eprintln!("seed={seed}: {notices} truncation notices (a channel re-synced from a snapshot under live subscribers)");
    }
    Ok(Summary {
        actions: Vec::new(),
        acked: acked.len(),
        attempted: attempted.len(),
        deliveries,
        dropped: 0,
        duplicated: 0,
        delayed: 0,
    })
}

/// On a failed schedule: the last lines of every process's log, printed before the
/// error so that the error (what was violated) is the last thing a CI log shows.
fn print_log_tails(logs: &[(&str, String)]) {
    for (name, log) in logs {
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- {name} log (last 40 lines)");
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{l}");
        }
    }
}
