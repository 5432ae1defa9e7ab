//! The sync machine's frames stay under the batch budget whatever the backlog, a
//! snapshot larger than a batch travels in parts and is installed only when every
//! part came, and an edge that links to a new upstream (a cloud restored from a
//! backup under a new id) sends back the acked ops it lacks.

use shared::op::Payload;
use shared::replica::LocalWrite;
use shared::sync::{Input, Node, Output, Persist, Role, SyncConfig};
use shared::wire::{self, Frame, SyncMsg};
use shared::{ChannelName, ReplicaId, VersionVector};

fn rid(n: u64) -> ReplicaId {
    ReplicaId::new(n).expect("non-zero")
}

fn ch(name: &str) -> ChannelName {
    ChannelName::new(name).expect("valid name")
}

fn config(batch_bytes: usize) -> SyncConfig {
    SyncConfig {
        batch_bytes,
        ..SyncConfig::default()
    }
}

fn drain(n: &mut Node) -> Vec<Output> {
    std::iter::from_fn(|| n.poll()).collect()
}

fn sends(out: &[Output]) -> Vec<SyncMsg> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { msg, .. } => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn event(size: usize) -> LocalWrite {
    LocalWrite::Event {
        kind: "blob".into(),
        data: Payload::from_value(&"x".repeat(size)),
        idempotency_key: None,
        by: None,
    }
}

fn set(key: &str, size: usize) -> LocalWrite {
    LocalWrite::Set {
        key: key.into(),
        value: Payload::from_value(&"y".repeat(size)),
        context: VersionVector::new(),
        by: None,
    }
}

/// Delivers every message in `msgs` from `from` to `to`, returning `to`'s outputs.
fn deliver(to: &mut Node, from: ReplicaId, msgs: Vec<SyncMsg>, now: u64) -> Vec<Output> {
    for m in msgs {
        to.handle(now, Input::Msg(from, m));
    }
    drain(to)
}

#[test]
fn a_backlog_of_large_ops_goes_in_frames_under_the_batch_budget() {
    let (edge_id, cloud_id) = (rid(1), rid(2));
    let budget = 256 << 10;
    let mut edge = Node::new(edge_id, Role::Edge, config(budget), 0);
    let c = ch("project:big");
    for _ in 0..300 {
        edge.local(0, &c, event(61_000)).expect("write");
    }
    drain(&mut edge);
    edge.handle(1, Input::LinkUp(cloud_id));
    edge.handle(3_000, Input::Timeout);
    let msgs = sends(&drain(&mut edge));
    let ops: Vec<&SyncMsg> = msgs
        .iter()
        .filter(|m| matches!(m, SyncMsg::Ops { .. }))
        .collect();
    let total: usize = ops
        .iter()
        .map(|m| match m {
            SyncMsg::Ops { ops, .. } => ops.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(total, 300, "every unacked op is resent");
    assert!(ops.len() >= 70, "{} frames for 18 MB at 256 KiB", ops.len());
    for m in &ops {
        let bytes = wire::encode_to_vec(&Frame::Sync((*m).clone()), wire::DEFAULT_MAX_FRAME)
            .expect("every frame fits the default frame limit");
        assert!(
            bytes.len() <= budget + 4096,
            "frame of {} bytes",
            bytes.len()
        );
    }
}

#[test]
fn a_snapshot_larger_than_a_batch_travels_in_parts_and_needs_all_of_them() {
    let (edge_id, cloud_id) = (rid(1), rid(2));
    let budget = 64 << 10;
    let mut cloud = Node::new(cloud_id, Role::Cloud, config(budget), 0);
    let c = ch("project:doc");
    for i in 0..40 {
        cloud
            .local(0, &c, set(&format!("k{i}"), 10_000))
            .expect("write");
    }
    drain(&mut cloud);
    cloud.handle(1, Input::LinkUp(edge_id));
    // An edge that evicted the channel and wrote again asks with `full`.
    let ask = SyncMsg::Sync {
        channel: c.clone(),
        vv: VersionVector::new(),
        subscribe: true,
        reply: false,
        full: true,
    };
    let msgs = sends(&deliver(&mut cloud, edge_id, vec![ask], 2));
    let parts = msgs
        .iter()
        .filter(|m| matches!(m, SyncMsg::SnapshotPart { .. }))
        .count();
    assert!(parts >= 6, "400 KB of state in 64 KiB parts: {parts}");
    assert!(matches!(
        msgs.iter().rfind(|m| matches!(m, SyncMsg::SnapshotEnd { .. })),
        Some(SyncMsg::SnapshotEnd { parts: p, rebase: Some(_), .. }) if *p as usize == parts
    ));
    for m in &msgs {
        wire::encode_to_vec(&Frame::Sync(m.clone()), 2 * budget).expect("fits");
    }

    // The same parts closed as a plain snapshot, to an edge that holds the channel:
    // with one part missing nothing is installed; with all of them, everything.
    let mut edge = Node::new(edge_id, Role::Edge, config(budget), 0);
    edge.handle(0, Input::Interest(c.clone(), true));
    edge.handle(0, Input::LinkUp(cloud_id));
    drain(&mut edge);
    let xfer_msgs: Vec<SyncMsg> = msgs
        .iter()
        .filter_map(|m| match m {
            SyncMsg::SnapshotPart { .. } => Some(m.clone()),
            SyncMsg::SnapshotEnd {
                channel,
                xfer,
                parts,
                vv,
                ..
            } => Some(SyncMsg::SnapshotEnd {
                channel: channel.clone(),
                xfer: *xfer,
                parts: *parts,
                vv: vv.clone(),
                rebase: None,
            }),
            _ => None,
        })
        .collect();
    let mut lossy = xfer_msgs.clone();
    lossy.remove(1);
    let out = deliver(&mut edge, cloud_id, lossy, 3);
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::SnapshotInstalled { .. })),
        "a transfer missing a part must not be installed"
    );
    assert_eq!(edge.channel(&c).map(|r| r.vv().get(cloud_id)), Some(0));
    let mut reordered = xfer_msgs.clone();
    reordered.swap(0, 1);
    let out = deliver(&mut edge, cloud_id, reordered, 3);
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::SnapshotInstalled { .. })),
        "a transfer whose parts came out of order must not be installed"
    );
    let out = deliver(&mut edge, cloud_id, xfer_msgs, 4);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::SnapshotInstalled { .. })));
    let r = edge.channel(&c).expect("held");
    assert_eq!(r.vv().get(cloud_id), 40);
    assert_eq!(r.state().len(), 40);
}

#[test]
fn an_edge_resends_acked_ops_that_a_new_upstream_lacks() {
    let (edge_id, old_cloud, new_cloud) = (rid(1), rid(2), rid(3));
    let mut edge = Node::new(edge_id, Role::Edge, SyncConfig::default(), 0);
    let c = ch("project:r");
    edge.handle(0, Input::LinkUp(old_cloud));
    for _ in 0..5 {
        edge.local(0, &c, event(10)).expect("write");
    }
    let mut acked = VersionVector::new();
    acked.set(edge_id, 5);
    edge.handle(
        1,
        Input::Msg(
            old_cloud,
            SyncMsg::Ack {
                channel: c.clone(),
                vv: acked,
            },
        ),
    );
    let out = drain(&mut edge);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Persist(Persist::Upstream { id }) if *id == old_cloud)));
    assert_eq!(edge.acked(&c), 5);
    edge.handle(2, Input::LinkDown(old_cloud));

    // The same cloud again: only channels in use or with unacked ops are synced.
    edge.handle(3, Input::LinkUp(old_cloud));
    assert!(sends(&drain(&mut edge)).is_empty());
    edge.handle(4, Input::LinkDown(old_cloud));

    // A restored cloud (new id) that has the edge's ops only up to 2.
    edge.handle(5, Input::LinkUp(new_cloud));
    let asked = sends(&drain(&mut edge));
    assert!(
        asked
            .iter()
            .any(|m| matches!(m, SyncMsg::Sync { channel, reply: true, .. } if *channel == c)),
        "a new upstream is asked about every held channel: {asked:?}"
    );
    let mut theirs = VersionVector::new();
    theirs.set(edge_id, 2);
    edge.handle(
        6,
        Input::Msg(
            new_cloud,
            SyncMsg::Sync {
                channel: c.clone(),
                vv: theirs,
                subscribe: false,
                reply: false,
                full: false,
            },
        ),
    );
    let out = drain(&mut edge);
    assert_eq!(
        edge.acked(&c),
        2,
        "acked again only what the new upstream has"
    );
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Persist(Persist::Unacked { seq: 2, .. }))));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Persist(Persist::Upstream { id }) if *id == new_cloud)));
    let resent: Vec<u64> = sends(&out)
        .iter()
        .flat_map(|m| match m {
            SyncMsg::Ops { ops, .. } => ops.iter().map(|op| op.dot.seq).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(resent, vec![3, 4, 5]);
    assert_eq!(edge.outbox_len(), 3);
    assert!(
        !edge.can_evict(&c),
        "ops the upstream lacks keep the channel"
    );
}
