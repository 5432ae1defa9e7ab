//! Property tests for the merge algebra, the clock, the codecs and the channel replica.
//! proptest prints the minimal failing input and persists its seed on failure.

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use shared::hlc::{Hlc, HlcClock};
use shared::ids::{ChannelName, Dot, ReplicaId};
use shared::op::{Op, OpBody, Payload};
use shared::replica::{ChannelReplica, LocalOutcome, LocalWrite, ReplicaConfig};
use shared::token;
use shared::vv::VersionVector;
use shared::wire::{self, DecodeError, Frame, SyncMsg, Versioned};

/// Cases per property: `PROPTEST_CASES` when set, else the given default.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rid(n: u64) -> ReplicaId {
    ReplicaId::new(n + 1).expect("non-zero")
}

fn vv_strategy() -> impl Strategy<Value = VersionVector> {
    prop::collection::btree_map(0u64..6, 0u64..20, 0..6)
        .prop_map(|m| m.into_iter().map(|(r, s)| (rid(r), s)).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn vv_merge_is_a_join(a in vv_strategy(), b in vv_strategy(), c in vv_strategy()) {
        let mut ab = a.clone(); ab.merge(&b);
        let mut ba = b.clone(); ba.merge(&a);
        prop_assert_eq!(&ab, &ba);
        let mut ab_c = ab.clone(); ab_c.merge(&c);
        let mut bc = b.clone(); bc.merge(&c);
        let mut a_bc = a.clone(); a_bc.merge(&bc);
        prop_assert_eq!(&ab_c, &a_bc);
        let mut aa = a.clone(); aa.merge(&a);
        prop_assert_eq!(&aa, &a);
        prop_assert!(ab.dominates(&a) && ab.dominates(&b));
        let m = a.meet(&b);
        prop_assert!(a.dominates(&m) && b.dominates(&m));
        prop_assert_eq!(a.dominates(&b) && b.dominates(&a), a == b);
        prop_assert_eq!(a.concurrent(&b), !a.dominates(&b) && !b.dominates(&a));
    }

    #[test]
    fn vv_missing_ranges_are_exact(a in vv_strategy(), b in vv_strategy()) {
        let mut filled = a.clone();
        for (r, range) in a.missing_from(&b) {
            prop_assert_eq!(*range.start(), a.get(r) + 1);
            for s in range.clone() {
                prop_assert!(!a.covers(Dot::new(r, s)) && b.covers(Dot::new(r, s)));
            }
            filled.raise(r, *range.end());
        }
        prop_assert!(filled.dominates(&b));
        let mut merged = a.clone(); merged.merge(&b);
        prop_assert_eq!(filled, merged);
    }

    #[test]
    fn resume_token_round_trips(a in vv_strategy()) {
        let t = token::encode(&a);
        prop_assert!(t.len() < 200);
        prop_assert_eq!(token::decode(&t), Ok(a));
    }

    #[test]
    fn resume_token_decoder_never_panics(s in ".{0,300}", bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = token::decode(&s);
        use base64::Engine;
        let _ = token::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes));
    }

    #[test]
    fn hlc_is_strictly_monotonic(events in prop::collection::vec((0u64..1_000, prop::option::of((0u64..2_000, 0u32..5))), 1..100)) {
        let mut clock = HlcClock::new(500);
        let mut last = Hlc::ZERO;
        for (physical, remote) in events {
            if let Some((w, l)) = remote {
                let r = Hlc::new(w, l);
                if clock.observe(r, physical).is_ok() {
                    let next = clock.now(physical);
                    prop_assert!(next > r);
                    prop_assert!(next > last);
                    last = next;
                } else {
                    prop_assert!(w > physical + 500);
                }
            }
            let t = clock.now(physical);
            prop_assert!(t > last);
            prop_assert!(t.wall_ms >= physical);
            last = t;
        }
    }
}

/// One step of a multi-writer script.
#[derive(Clone, Debug)]
enum Step {
    /// Replica `r` writes; `kind` picks event/set/delete; `ctx` whether it read first.
    Write {
        r: usize,
        key: u8,
        kind: u8,
        ctx: bool,
    },
    /// Replica `from` sends all its ops to `to`, in a shuffled order.
    Gossip {
        from: usize,
        to: usize,
        shuffle: u64,
    },
}

fn step_strategy(writers: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..writers, 0u8..3, 0u8..3, any::<bool>()).prop_map(|(r, key, kind, ctx)| Step::Write { r, key, kind, ctx }),
        1 => (0..writers, 0..writers, any::<u64>()).prop_map(|(from, to, shuffle)| Step::Gossip { from, to, shuffle }),
    ]
}

fn channel() -> ChannelName {
    ChannelName::new("project:1").expect("valid")
}

fn cfg(cap: usize) -> ReplicaConfig {
    ReplicaConfig {
        sibling_cap: cap,
        max_pending: 10_000,
    }
}

/// Runs a script over `writers` replicas; returns them and every op made.
fn run_script(
    steps: &[Step],
    writers: usize,
    cap: usize,
) -> Result<(Vec<ChannelReplica>, Vec<Op>), TestCaseError> {
    let mut reps: Vec<ChannelReplica> = (0..writers)
        .map(|i| ChannelReplica::new(channel(), rid(i as u64), cfg(cap)))
        .collect();
    let mut all = Vec::new();
    let mut wall = 1_000u64;
    for step in steps {
        wall += 1;
        match step {
            Step::Write { r, key, kind, ctx } => {
                let key = format!("k{key}");
                let rep = &mut reps[*r];
                let context = if *ctx {
                    rep.register(&key)
                        .map(|g| g.context().clone())
                        .unwrap_or_default()
                } else {
                    VersionVector::new()
                };
                let w = match kind {
                    0 => LocalWrite::Event {
                        kind: "e".into(),
                        data: Payload::from_value(&wall),
                        idempotency_key: None,
                        by: None,
                    },
                    1 => LocalWrite::Set {
                        key: key.clone(),
                        value: Payload::from_value(&wall),
                        context,
                        by: None,
                    },
                    _ => LocalWrite::Delete {
                        key: key.clone(),
                        context,
                        by: None,
                    },
                };
                // A coarse clock, so that writes of different replicas tie on HLC
                // and the origin must break the tie.
                let hlc = Hlc::new(wall / 4, 0);
                match rep
                    .local(hlc, w)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                {
                    LocalOutcome::Applied(a) => {
                        if let Some(reg) = rep.register(&key).filter(|_| *kind != 0) {
                            prop_assert!(
                                reg.siblings().len() <= cap,
                                "sibling cap {} exceeded: {}",
                                cap,
                                reg.siblings().len()
                            );
                        }
                        all.push(a.op);
                    }
                    LocalOutcome::Duplicate(_) => {}
                }
            }
            Step::Gossip { from, to, shuffle } => {
                let mut ops: Vec<Op> = reps[*from].log().cloned().collect();
                ops.shuffle(&mut SmallRng::seed_from_u64(*shuffle));
                for op in ops {
                    reps[*to]
                        .receive(op)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
        }
    }
    Ok((reps, all))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), ..ProptestConfig::default() })]

    /// Any interleaving, duplication and reordering of the same ops gives the same
    /// state on every replica, and every op is applied exactly once.
    #[test]
    fn any_delivery_order_converges(
        steps in prop::collection::vec(step_strategy(3), 1..60),
        orders in prop::collection::vec(any::<u64>(), 3),
        cap in 1usize..4,
    ) {
        let (_, all) = run_script(&steps, 3, cap)?;
        let mut results = Vec::new();
        for (n, seed) in orders.iter().enumerate() {
            let mut rng = SmallRng::seed_from_u64(*seed);
            let mut ops = all.clone();
            // Duplicate some ops, then shuffle everything.
            let dups: Vec<Op> = ops.iter().filter(|_| rand::RngExt::random_bool(&mut rng, 0.3)).cloned().collect();
            ops.extend(dups);
            ops.shuffle(&mut rng);
            let mut r = ChannelReplica::new(channel(), rid(100 + n as u64), cfg(cap));
            let mut applied = 0;
            for op in ops {
                applied += r.receive(op).map_err(|e| TestCaseError::fail(e.to_string()))?.len();
            }
            prop_assert_eq!(applied, all.len(), "every op applied exactly once");
            prop_assert_eq!(r.pending_len(), 0);
            results.push((r.vv().clone(), r.state().clone()));
        }
        for w in results.windows(2) {
            prop_assert_eq!(&w[0], &w[1]);
        }
        // Nothing acked is lost: every op made is covered.
        for op in &all {
            prop_assert!(results[0].0.covers(op.dot));
        }
    }

    /// Writers that end with a full exchange converge, and a snapshot (state-based
    /// merge) gives the same state as replaying ops.
    #[test]
    fn gossip_and_snapshots_agree(
        steps in prop::collection::vec(step_strategy(3), 1..60),
        cap in 1usize..4,
    ) {
        let (mut reps, all) = run_script(&steps, 3, cap)?;
        let mut snap_target = ChannelReplica::new(channel(), rid(50), cfg(cap));
        for r in &reps {
            let (_, _) = snap_target.install_snapshot(&r.snapshot());
        }
        for from in 0..3 {
            for to in 0..3 {
                let ops: Vec<Op> = reps[from].log().cloned().collect();
                for op in ops {
                    reps[to].receive(op).map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
        }
        for r in &reps {
            prop_assert_eq!(r.state(), reps[0].state());
            prop_assert_eq!(r.vv(), reps[0].vv());
        }
        prop_assert_eq!(snap_target.state(), reps[0].state());
        prop_assert_eq!(snap_target.vv(), reps[0].vv());
        for op in &all {
            prop_assert!(reps[0].vv().covers(op.dot));
        }
    }

    /// Frames round-trip; truncations are `Incomplete`; random bytes never panic.
    #[test]
    fn frames_round_trip(steps in prop::collection::vec(step_strategy(2), 1..20), cut in any::<prop::sample::Index>()) {
        let (_, all) = run_script(&steps, 2, 3)?;
        let frame = Frame::Sync(SyncMsg::Ops { channel: channel(), ops: all });
        let bytes = wire::encode_to_vec(&frame, wire::DEFAULT_MAX_FRAME).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded = wire::decode(&bytes, wire::DEFAULT_MAX_FRAME);
        prop_assert_eq!(decoded, Ok((Versioned::V1(frame), bytes.len())));
        let at = cut.index(bytes.len());
        let truncated = matches!(wire::decode(&bytes[..at], wire::DEFAULT_MAX_FRAME), Err(DecodeError::Incomplete { .. }));
        prop_assert!(truncated, "a prefix of {} bytes must be incomplete", at);
    }

    #[test]
    fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), flip in any::<(prop::sample::Index, u8)>()) {
        let _ = wire::decode(&bytes, wire::DEFAULT_MAX_FRAME);
        // A valid frame with one byte changed must decode or fail, never panic.
        let frame = Frame::Sync(SyncMsg::Sync { channel: channel(), vv: VersionVector::from(Dot::new(rid(1), 3)), subscribe: true, reply: false, full: false });
        let mut good = wire::encode_to_vec(&frame, wire::DEFAULT_MAX_FRAME).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let i = flip.0.index(good.len());
        good[i] ^= flip.1;
        let _ = wire::decode(&good, wire::DEFAULT_MAX_FRAME);
    }
}

#[test]
fn concurrent_writes_keep_siblings_and_lww_winner() {
    let mut a = ChannelReplica::new(channel(), rid(1), cfg(4));
    let mut b = ChannelReplica::new(channel(), rid(2), cfg(4));
    let set = |v: u32| LocalWrite::Set {
        key: "k".into(),
        value: Payload::from_value(&v),
        context: VersionVector::new(),
        by: None,
    };
    let LocalOutcome::Applied(x) = a.local(Hlc::new(10, 0), set(1)).expect("a") else {
        panic!("dup")
    };
    let LocalOutcome::Applied(y) = b.local(Hlc::new(20, 0), set(2)).expect("b") else {
        panic!("dup")
    };
    let ra = a.receive(y.op.clone()).expect("recv");
    assert!(ra[0].conflict.is_some(), "concurrent write is recorded");
    b.receive(x.op.clone()).expect("recv");
    for r in [&a, &b] {
        let reg = r.register("k").expect("key");
        assert_eq!(reg.siblings().len(), 2);
        assert_eq!(
            reg.winner().and_then(|s| s.value.clone()),
            Some(Payload::from_value(&2u32))
        );
    }
    // A write that read both siblings supersedes them.
    let ctx = a.register("k").expect("key").context().clone();
    let LocalOutcome::Applied(z) = a
        .local(
            Hlc::new(30, 0),
            LocalWrite::Set {
                key: "k".into(),
                value: Payload::from_value(&3u32),
                context: ctx,
                by: None,
            },
        )
        .expect("a")
    else {
        panic!("dup")
    };
    b.receive(z.op).expect("recv");
    assert_eq!(b.register("k").expect("key").siblings().len(), 1);
    assert_eq!(a.state(), b.state());
}

#[test]
fn idempotency_key_returns_first_dot() {
    let mut a = ChannelReplica::new(channel(), rid(1), cfg(4));
    let ev = || LocalWrite::Event {
        kind: "ingest.job.created".into(),
        data: Payload::null(),
        idempotency_key: Some("job-7".into()),
        by: None,
    };
    let LocalOutcome::Applied(first) = a.local(Hlc::new(1, 0), ev()).expect("first") else {
        panic!("dup")
    };
    assert_eq!(
        a.local(Hlc::new(2, 0), ev()).expect("second"),
        LocalOutcome::Duplicate(first.op.dot)
    );
}

#[test]
fn causal_buffering_holds_ops_until_deps_arrive() {
    let mut a = ChannelReplica::new(channel(), rid(1), cfg(4));
    let mut b = ChannelReplica::new(channel(), rid(2), cfg(4));
    let ev = |n: u32| LocalWrite::Event {
        kind: "e".into(),
        data: Payload::from_value(&n),
        idempotency_key: None,
        by: None,
    };
    let LocalOutcome::Applied(a1) = a.local(Hlc::new(1, 0), ev(1)).expect("a1") else {
        panic!()
    };
    b.receive(a1.op.clone()).expect("b gets a1");
    let LocalOutcome::Applied(b1) = b.local(Hlc::new(2, 0), ev(2)).expect("b1") else {
        panic!()
    };
    assert_eq!(b1.op.deps, VersionVector::from(a1.op.dot));
    let mut c = ChannelReplica::new(channel(), rid(3), cfg(4));
    assert!(c.receive(b1.op.clone()).expect("buffered").is_empty());
    assert_eq!(c.pending_len(), 1);
    let applied = c.receive(a1.op.clone()).expect("unblocks");
    let order: Vec<Dot> = applied.iter().map(|x| x.op.dot).collect();
    assert_eq!(order, vec![a1.op.dot, b1.op.dot]);
    // A malformed op from a peer is refused, not applied.
    let mut bad = a1.op.clone();
    bad.dot = Dot::new(rid(9), 1);
    bad.body = OpBody::Set {
        key: String::new(),
        value: Payload::null(),
        context: VersionVector::new(),
        by: None,
    };
    assert!(c.receive(bad).is_err());
}
