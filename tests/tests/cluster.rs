//! The clustered cloud tier between real processes: a 3-node NATS JetStream cluster
//! (R3 stream, `sync_interval: always`), two `outpost-cloud` coordinators on it and two
//! edges, each edge listing both coordinators.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use edge::auth::Action;
use outpost_tests::fleet::{connected, OPERATOR_KEY, TOKEN_A, TOKEN_B};
use outpost_tests::nats::NatsCluster;
use outpost_tests::{eventually, free_udp_port, metric, publish, token, Cloud, Edge, Ws, API_KEY};
use serde_json::{json, Value};

const CHANNEL: &str = "project:cluster";

/// An edge's `[uplink]` listing coordinators in order (they share one certificate), by
/// host name (resolved at each dial).
fn uplink(coords: &[&Cloud], token: &str) -> String {
    let eps: Vec<String> = coords
        .iter()
        .map(|c| format!("\"localhost:{}\"", c.quic.port()))
        .collect();
    format!(
        "[uplink]\nendpoints = [{}]\ntoken = \"{token}\"\npin_sha256 = \"{}\"\nbackoff_min_ms = 50\nbackoff_max_ms = 300\nkeepalive_ms = 300\nidle_timeout_ms = 1500\n",
        eps.join(", "),
        coords[0].fingerprint
    )
}

/// Starts coordinator `name`; every coordinator after the first gets the first one's
/// dev certificate, so edges pin one fingerprint for all.
fn coordinator(dir: &Path, name: &str, nats: &NatsCluster, first: Option<&Cloud>) -> Result<Cloud> {
    let cdir = dir.join(name);
    if let Some(first) = first {
        let data = cdir.join("data");
        std::fs::create_dir_all(&data)?;
        for f in [
            edge::link::tls::DEV_CERT_FILE,
            edge::link::tls::DEV_KEY_FILE,
        ] {
            std::fs::copy(first.dir.join("data").join(f), data.join(f))?;
        }
    }
    Cloud::start(
        &cdir,
        free_udp_port()?,
        &[("edge-a", TOKEN_A), ("edge-b", TOKEN_B)],
        &format!(
            "{}\n[auth]\noperator_keys = [{{ name = \"ops\", sha256 = \"{}\" }}]\n",
            nats.jetstream_toml(3),
            edge::auth::api_key_hash(OPERATOR_KEY)
        ),
    )
}

async fn history_bodies(http: &reqwest::Client, c: &Cloud) -> Result<BTreeSet<u64>> {
    let v: Value = http
        .get(c.url(&format!("/v1/channels/{CHANNEL}/history?limit=1000")))
        .bearer_auth(token("reader", "project:*", &[Action::Subscribe], 600))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["ops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["data"]["n"].as_u64())
        .collect())
}

/// Waits until coordinator `c` serves `n` distinct events of the channel.
async fn holds(
    http: &reqwest::Client,
    c: &Cloud,
    n: usize,
    within: Duration,
    what: &str,
) -> Result<()> {
    eventually(within, what, || async move {
        Ok((history_bodies(http, c).await?.len() == n).then_some(()))
    })
    .await
}

/// Publishes events `n` for every `n` in `ns` on edge `a`; each must be acked.
async fn publish_range(
    http: &reqwest::Client,
    a: &Edge,
    ns: std::ops::Range<u64>,
    when: &str,
) -> Result<()> {
    for n in ns {
        let (status, body) = publish(
            http,
            a,
            API_KEY,
            CHANNEL,
            json!({"event": "e", "data": {"n": n}}),
        )
        .await?;
        if status != 200 {
            bail!("publish {n} {when}: {status} {body}");
        }
    }
    Ok(())
}

/// The next events on `sub` are exactly `ns`, in order.
async fn expect_received(sub: &mut Ws, ns: std::ops::Range<u64>, when: &str) -> Result<()> {
    let got = receive(sub, ns.clone().count()).await?;
    if got != ns.collect::<Vec<_>>() {
        bail!("edge B got {got:?} {when}");
    }
    Ok(())
}

/// Reads `want` more ops for the channel from `ws`; returns their `n`s in order.
async fn receive(ws: &mut Ws, want: usize) -> Result<Vec<u64>> {
    let mut got = Vec::new();
    while got.len() < want {
        let v = ws.recv_within(Duration::from_secs(20)).await?;
        if v["type"] == "op" && v["channel"] == CHANNEL {
            if let Some(n) = v["data"]["n"].as_u64() {
                got.push(n);
            }
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_on_jetstream_share_ops_and_survive_a_coordinator_and_quorum_loss(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nats = NatsCluster::start(dir.path(), 3).await?;
    let mut c1 = coordinator(dir.path(), "c1", &nats, None)?;
    let mut c2 = coordinator(dir.path(), "c2", &nats, Some(&c1))?;
    let a = Edge::start(&dir.path().join("a"), &uplink(&[&c1, &c2], TOKEN_A))?;
    let b = Edge::start(&dir.path().join("b"), &uplink(&[&c2, &c1], TOKEN_B))?;
    let r = scenario(&mut nats, &mut c1, &mut c2, &a, &b).await;
    r.map_err(|e| {
        let tail = |s: String| {
            let l: Vec<&str> = s.lines().collect();
            l[l.len().saturating_sub(40)..].join("\n")
        };
        e.context(format!(
            "--- c1\n{}\n--- c2\n{}\n--- edge A\n{}\n--- edge B\n{}\n{}",
            tail(c1.log()),
            tail(c2.log()),
            tail(a.log()),
            tail(b.log()),
            nats.logs()
        ))
    })
}

async fn scenario(
    nats: &mut NatsCluster,
    c1: &mut Cloud,
    c2: &mut Cloud,
    a: &Edge,
    b: &Edge,
) -> Result<()> {
    let http = reqwest::Client::new();
    // Each edge on its first coordinator.
    connected(&http, c1, 1.0).await?;
    connected(&http, c2, 1.0).await?;
    let tok = token("reader", "project:*", &[Action::Subscribe], 600);
    let mut sub = Ws::connect(b, &tok).await?;
    sub.subscribe(CHANNEL, None).await?;
    // A service on c2 with a namespace subscription (c2 holds the channel, empty,
    // since edge B's subscriber asked it for the channel).
    let mut service = Ws::connect_url(&format!("ws://{}/v1/ws?token={tok}", c2.addr)).await?;
    let started = service
        .request(
            json!({"type": "subscribe_pattern", "pattern": "project:*"}),
            1,
        )
        .await?;
    if started["type"] != "subscribed_pattern" || started["channels"] != 1 {
        bail!("subscribe_pattern on a coordinator: {started}");
    }

    // 1. Edge A (on c1) -> JetStream -> c2 -> edge B, in order; and to the service on
    // c2.
    publish_range(&http, a, 0..50, "").await?;
    expect_received(&mut sub, 0..50, "").await?;
    let got = receive(&mut service, 50).await?;
    if got != (0..50).collect::<Vec<_>>() {
        bail!("the service on c2 got {got:?}");
    }
    // Both coordinators hold them (c2 only through the shared log), and the stream
    // has them once each.
    for c in [&*c1, &*c2] {
        holds(
            &http,
            c,
            50,
            Duration::from_secs(10),
            "both coordinators to hold the ops",
        )
        .await?;
    }
    let stored = nats.stream_messages(0, "OUTPOST_OPS").await?;
    if stored != 50 {
        bail!("the stream holds {stored} messages, not 50");
    }

    // 2. kill -9 of c1: edge A moves to c2 and keeps delivering to B.
    c1.kill9();
    // Edge A moves to c2.
    connected(&http, c2, 2.0).await?;
    publish_range(&http, a, 50..80, "").await?;
    expect_received(&mut sub, 50..80, "after the move").await?;

    // 3. Quorum lost (2 of 3 NATS nodes down): edges keep accepting writes, the
    // coordinator acks and delivers nothing and says why; all of it arrives after.
    nats.kill9(1);
    nats.kill9(2);
    publish_range(&http, a, 80..100, "during the NATS outage").await?;
    let ready = c2.url("/readyz");
    eventually(
        Duration::from_secs(20),
        "c2's /readyz to report the shared log",
        || {
            let (http, ready) = (http.clone(), ready.clone());
            async move {
                let r = http.get(&ready).send().await?;
                let code = r.status().as_u16();
                let text = r.text().await?;
                Ok((code == 503 && text.contains("shared log")).then_some(()))
            }
        },
    )
    .await?;
    let a_metrics = a.url("/metrics");
    let outbox = metric(&http, &a_metrics, "outpost_outbox_ops").await?;
    if outbox < 1.0 {
        bail!("edge A's outbox is empty while JetStream has no quorum: acked without the log");
    }
    if let Ok(v) = sub.recv_within(Duration::from_millis(500)).await {
        if v["type"] == "op" {
            bail!("edge B got {v} while JetStream had no quorum");
        }
    }
    // c2 dies holding ops the stream has not stored (they are only in its own store):
    // restarted, it must not ack them from there, and must send them to the stream.
    c2.kill9();
    c2.restart()?;
    nats.restart(1)?;
    nats.restart(2)?;
    expect_received(&mut sub, 80..100, "after quorum came back").await?;
    eventually(Duration::from_secs(20), "edge A's outbox to drain", || {
        let (http, url) = (http.clone(), a_metrics.clone());
        async move { Ok((metric(&http, &url, "outpost_outbox_ops").await? == 0.0).then_some(())) }
    })
    .await?;

    // 4. c1 comes back and catches up from the stream: it serves all 100.
    c1.restart()?;
    holds(
        &http,
        c1,
        100,
        Duration::from_secs(20),
        "c1 to catch up from the stream",
    )
    .await?;
    let stored = nats.stream_messages(0, "OUTPOST_OPS").await?;
    if stored != 100 {
        bail!("the stream holds {stored} messages, not 100");
    }

    // 5. kill -9 of the stream's leader while edge A writes: a new leader takes over,
    // every op arrives once.
    let leader = match nats.stream_leader(0, "OUTPOST_OPS").await? {
        Some(l) => l,
        None => bail!("the stream has no leader"),
    };
    nats.kill9(leader);
    publish_range(&http, a, 100..120, "after the leader died").await?;
    expect_received(&mut sub, 100..120, "after the stream leader died").await?;
    nats.restart(leader)?;
    let alive = (leader + 1) % 3;
    let stored = nats.stream_messages(alive, "OUTPOST_OPS").await?;
    if stored != 120 {
        bail!("the stream holds {stored} messages, not 120");
    }
    Ok(())
}

/// Sends an operator request (with the operator key) and returns its JSON answer.
async fn admin(req: reqwest::RequestBuilder) -> Result<Value> {
    Ok(req
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// `GET` an operator endpoint of coordinator `c`.
async fn admin_get(http: &reqwest::Client, c: &Cloud, path: &str) -> Result<Value> {
    admin(http.get(c.url(path))).await
}

/// `POST` an operator action to coordinator `c`; it must have reached the whole fleet.
async fn admin_post(http: &reqwest::Client, c: &Cloud, path: &str) -> Result<()> {
    let r = admin(http.post(c.url(path))).await?;
    if r["fleet_wide"] != true {
        bail!("{path}: {r}");
    }
    Ok(())
}

/// `(connected, coordinator)` of the edge named `name` in `c`'s fleet view.
async fn edge_view(
    http: &reqwest::Client,
    c: &Cloud,
    name: &str,
) -> Result<Option<(bool, String)>> {
    let v = admin_get(http, c, "/v1/admin/edges").await?;
    Ok(v["edges"].as_array().into_iter().flatten().find_map(|e| {
        (e["name"] == name).then(|| {
            (
                e["connected"].as_bool().unwrap_or(false),
                e["coordinator"].as_str().unwrap_or_default().to_owned(),
            )
        })
    }))
}

/// Whether `c`'s timeline has an event `kind` about edge `name`.
async fn has_event(http: &reqwest::Client, c: &Cloud, name: &str, kind: &str) -> Result<bool> {
    let v = admin_get(http, c, "/v1/admin/timeline").await?;
    Ok(v["events"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["edge"] == name && e["kind"] == kind))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_and_act_on_the_whole_fleet_from_any_coordinator() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = NatsCluster::start(dir.path(), 3).await?;
    let c1 = coordinator(dir.path(), "c1", &nats, None)?;
    let mut c2 = coordinator(dir.path(), "c2", &nats, Some(&c1))?;
    let a = Edge::start(&dir.path().join("a"), &uplink(&[&c1, &c2], TOKEN_A))?;
    let b = Edge::start(&dir.path().join("b"), &uplink(&[&c2, &c1], TOKEN_B))?;
    let r = fleet_scenario(&c1, &mut c2, &a).await;
    r.map_err(|e| {
        let tail = |s: String| {
            let l: Vec<&str> = s.lines().collect();
            l[l.len().saturating_sub(40)..].join("\n")
        };
        e.context(format!(
            "--- c1\n{}\n--- c2\n{}\n--- edge A\n{}\n--- edge B\n{}\n{}",
            tail(c1.log()),
            tail(c2.log()),
            tail(a.log()),
            tail(b.log()),
            nats.logs()
        ))
    })
}

async fn fleet_scenario(c1: &Cloud, c2: &mut Cloud, a: &Edge) -> Result<()> {
    let http = &reqwest::Client::new();
    connected(http, c1, 1.0).await?;
    connected(http, c2, 1.0).await?;
    let within = Duration::from_secs(20);

    // 1. Each coordinator lists both edges as connected, each with its own
    // coordinator, and has the other's "joined" event in its timeline.
    for (c, who) in [(c1, "c1"), (&*c2, "c2")] {
        eventually(
            within,
            &format!("{who} to list both edges"),
            || async move {
                let (ea, eb) = (
                    edge_view(http, c, "edge-a").await?,
                    edge_view(http, c, "edge-b").await?,
                );
                Ok(match (ea, eb) {
                    (Some((true, ca)), Some((true, cb))) if !ca.is_empty() && ca != cb => Some(()),
                    _ => None,
                })
            },
        )
        .await?;
        eventually(within, &format!("{who}'s timeline"), || async move {
            Ok((has_event(http, c, "edge-a", "joined").await?
                && has_event(http, c, "edge-b", "joined").await?)
                .then_some(()))
        })
        .await?;
    }

    // 2. Drain edge A (linked to c1) through c2: edge A hears it.
    admin_post(http, c2, "/v1/admin/edges/edge-a/drain").await?;
    let ready = a.url("/readyz");
    eventually(within, "edge A to be drained", || async {
        let s = http.get(&ready).send().await?.status();
        Ok((s == 503).then_some(()))
    })
    .await?;

    // 3. Revoke edge B (linked to c2) through c1: c2 drops it, neither takes it back.
    admin_post(http, c1, "/v1/admin/edges/edge-b/revoke").await?;
    eventually(within, "edge B refused by both coordinators", || async {
        let m1 = metric(
            http,
            &c1.url("/metrics"),
            "outpost_edge_auth_failures_total",
        )
        .await?;
        let m2 = metric(
            http,
            &c2.url("/metrics"),
            "outpost_edge_auth_failures_total",
        )
        .await?;
        let down = matches!(edge_view(http, c1, "edge-b").await?, Some((false, _)));
        Ok((m1 >= 1.0 && m2 >= 1.0 && down).then_some(()))
    })
    .await?;
    let m = metric(http, &c2.url("/metrics"), "outpost_edges_connected").await?;
    if m != 0.0 {
        bail!("c2 still holds {m} edge links after edge B's revocation");
    }

    // 4. The timeline outlives a coordinator's restart: c2 reads it back from the
    // stream, with c1's revocation in it.
    c2.restart()?;
    eventually(within, "c2's timeline after its restart", || async {
        Ok((has_event(http, c2, "edge-b", "revoked").await?
            && has_event(http, c2, "edge-a", "joined").await?)
            .then_some(()))
    })
    .await?;
    Ok(())
}
