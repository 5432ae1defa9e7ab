//! The sled store and the simulator's in-memory store are two implementations of one
//! seam: the same storage actions, produced by a real node (writes, acks, a new
//! upstream that lacks acked ops, compaction, eviction and re-opening), leave them
//! holding the same channels, outbox, retired marks and upstream.

use shared::op::Payload;
use shared::replica::LocalWrite;
use shared::store::{MemStore, Store};
use shared::sync::{Input, Node, Output, Role, SyncConfig};
use shared::wire::SyncMsg;
use shared::{ChannelName, ReplicaId, Retention, VersionVector};

fn rid(n: u64) -> ReplicaId {
    ReplicaId::new(n).expect("non-zero")
}

fn same<A: Store, B: Store>(a: &A, b: &B) {
    let names = a.channel_names().expect("names");
    assert_eq!(names, b.channel_names().expect("names"));
    for n in &names {
        let (x, y) = (
            a.load_channel(n).expect("load").expect("held"),
            b.load_channel(n).expect("load").expect("held"),
        );
        assert_eq!(x, y, "channel {n}");
    }
    let mut oa = a.outbox_channels().expect("outbox");
    let mut ob = b.outbox_channels().expect("outbox");
    oa.sort();
    ob.sort();
    assert_eq!(oa, ob);
    assert_eq!(a.retired().expect("retired"), b.retired().expect("retired"));
    assert_eq!(a.upstream().expect("up"), b.upstream().expect("up"));
}

#[test]
fn sled_and_memory_stores_hold_the_same_after_the_same_actions() {
    let dir = tempfile::tempdir().expect("tmp");
    let sled = edge::storage::Storage::open(dir.path(), 8).expect("open");
    sled.outbox_channels().expect("index");
    let mem = MemStore::default();
    let (me, cloud, restored) = (rid(1), rid(2), rid(3));
    let cfg = SyncConfig {
        retention: Retention {
            max_ops: Some(5),
            max_age_ms: None,
        },
        ..SyncConfig::default()
    };
    let mut node = Node::new(me, Role::Edge, cfg, 0);
    let mut now = 0;
    let step = |node: &mut Node| {
        while let Some(out) = node.poll() {
            if let Output::Persist(p) = out {
                Store::apply(&sled, &p).expect("sled");
                mem.apply(&p).expect("mem");
            }
        }
    };
    let chans: Vec<ChannelName> = (0..3)
        .map(|i| ChannelName::new(format!("project:p{i}")).expect("name"))
        .collect();
    node.handle(now, Input::LinkUp(cloud));
    for round in 0..4u64 {
        for (i, c) in chans.iter().enumerate() {
            for n in 0..4 {
                let write = if n % 2 == 0 {
                    LocalWrite::Event {
                        kind: "e".into(),
                        data: Payload::from_value(&(round, n)),
                        idempotency_key: None,
                        by: None,
                    }
                } else {
                    LocalWrite::Set {
                        key: format!("k{n}"),
                        value: Payload::from_value(&round),
                        context: VersionVector::new(),
                        by: None,
                    }
                };
                node.local(now, c, write).expect("write");
            }
            // The cloud acks all of the first channel, part of the second.
            let mut vv = VersionVector::new();
            vv.set(
                me,
                node.channel(c).map_or(0, |r| r.vv().get(me)) / (i as u64 + 1),
            );
            node.handle(
                now,
                Input::Msg(
                    cloud,
                    SyncMsg::Ack {
                        channel: c.clone(),
                        vv,
                    },
                ),
            );
            step(&mut node);
        }
        now += 1_000;
        node.handle(now, Input::Timeout);
        step(&mut node);
        same(&sled, &mem);
    }
    // Evict the fully acked channel, then write to it again.
    assert!(node.evict(&chans[0]));
    step(&mut node);
    same(&sled, &mem);
    node.local(
        now,
        &chans[0],
        LocalWrite::Event {
            kind: "again".into(),
            data: Payload::null(),
            idempotency_key: None,
            by: None,
        },
    )
    .expect("write");
    step(&mut node);
    same(&sled, &mem);
    // A restored cloud with a new id that lacks everything: acked marks go down.
    node.handle(now, Input::LinkDown(cloud));
    node.handle(now, Input::LinkUp(restored));
    for c in &chans[1..] {
        node.handle(
            now,
            Input::Msg(
                restored,
                SyncMsg::Sync {
                    channel: c.clone(),
                    vv: VersionVector::new(),
                    subscribe: false,
                    reply: false,
                    full: false,
                },
            ),
        );
    }
    step(&mut node);
    same(&sled, &mem);
    assert!(!mem.outbox_channels().expect("outbox").is_empty());
}
