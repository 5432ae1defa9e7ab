//! Cache eviction and the fan-out: an edge that evicts a channel must not count ops it
//! no longer holds as delivered, or a subscriber resuming there later is moved past
//! them without getting them (the clustered fault schedules found this as a subscriber
//! 45 ops short: a delivery waiting for its flush ran after the channel was evicted).

use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use std::time::Duration;

use edge::config::{Durability, EdgeConfig};
use edge::core::Core;
use edge::fanout::{ConnHandle, SendQueue};
use shared::op::Payload;
use shared::replica::LocalWrite;
use shared::sync::{Input, Node, Output, Persist, Role, SyncConfig};
use shared::wire::SyncMsg;
use shared::{token, ChannelName, Op, ReplicaId, VersionVector};
use tokio_util::sync::CancellationToken;

fn rid(n: u64) -> ReplicaId {
    ReplicaId::new(n).expect("non-zero")
}

/// `n` events written on `channel` by another replica, as it would send them.
fn ops_from_elsewhere(origin: ReplicaId, channel: &ChannelName, n: u64) -> Vec<Op> {
    let mut node = Node::new(origin, Role::Edge, SyncConfig::default(), 0);
    for i in 0..n {
        node.local(
            0,
            channel,
            LocalWrite::Event {
                kind: "e".into(),
                data: Payload::from_value(&i),
                idempotency_key: None,
                by: None,
            },
        )
        .expect("write");
    }
    let mut ops = Vec::new();
    while let Some(out) = node.poll() {
        if let Output::Persist(Persist::Op { op, .. }) = out {
            ops.push(op);
        }
    }
    assert_eq!(ops.len() as u64, n);
    ops
}

fn conn(id: u64) -> ConnHandle {
    let (tx, _rx) = SendQueue::new(1024);
    ConnHandle {
        id,
        client: format!("c{id}").into(),
        subject: "tester".into(),
        tx,
        kill: CancellationToken::new(),
        kill_reason: Arc::new(AtomicU8::new(0)),
    }
}

/// Waits (up to 30 s: a loaded machine's fsync can be slow) until the fan-out counts
/// `seq` of `origin` as delivered.
async fn delivered(core: &Core, channel: &ChannelName, origin: ReplicaId, seq: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while core.fanout.delivered(channel).get(origin) < seq {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {seq} delivered after 30 s",
            core.fanout.delivered(channel).get(origin)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(core.fanout.delivered(channel).get(origin), seq);
}

#[tokio::test]
async fn a_delivery_waiting_for_its_flush_keeps_the_channel_from_eviction() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = EdgeConfig {
        data_dir: dir.path().to_path_buf(),
        ..EdgeConfig::default()
    };
    cfg.storage.durability = Durability::Fsync;
    // Flushes wait this long for company: the window in which a delivery is pending.
    cfg.storage.commit_window_ms = 400;
    // Residency (unloading idle channels) is not what this test is about.
    cfg.storage.resident_idle_secs = 3600;
    let core = Core::open(&cfg, Role::Edge, None).expect("open");
    let stop = CancellationToken::new();
    core.spawn_background(stop.clone());

    let channel = ChannelName::new("project:evicted").expect("name");
    let (cloud, origin) = (rid(2), rid(7));
    let ops = ops_from_elsewhere(origin, &channel, 76);
    core.handle(Input::LinkUp(cloud));
    // The edge holds the channel (a subscriber came and went: the channel counts as
    // used now, so the residency sweep leaves it in memory) ...
    core.subscribe(&channel, &conn(9), &VersionVector::new());
    core.unsubscribe(&channel, 9);
    let ops_msg = |ops: &[Op]| {
        Input::Msg(
            cloud,
            SyncMsg::Ops {
                channel: channel.clone(),
                ops: ops.to_vec(),
            },
        )
    };
    // ... and has the first 30 ops delivered,
    core.handle(ops_msg(&ops[..30]));
    delivered(&core, &channel, origin, 30).await;
    // then receives 46 more: stored, their deliveries wait for the flush.
    core.handle(ops_msg(&ops[30..]));
    assert!(
        !core.evict_channel(&channel),
        "evicted while deliveries of its ops wait for a flush"
    );
    delivered(&core, &channel, origin, 76).await;
    // Once they ran, the channel may go, and the fan-out forgets it with them.
    assert!(core.evict_channel(&channel), "not evicted once idle");
    assert_eq!(core.fanout.delivered(&channel), VersionVector::new());

    // A client resuming from op 30 on this edge is not moved past ops it never got.
    let mut since = VersionVector::new();
    since.raise(origin, 30);
    let replay = core.subscribe(&channel, &conn(1), &since);
    assert!(replay.ops.is_empty());
    assert_eq!(
        token::decode(&replay.token).expect("token"),
        since,
        "the resume token claims ops this edge does not hold"
    );
    stop.cancel();
    core.tasks.close();
    core.tasks.wait().await;
}
