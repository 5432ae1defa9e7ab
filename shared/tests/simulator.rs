//! Seeded simulations of the cloud tier (one cloud, or 2–3 coordinators sharing a log)
//! and several edges under faults.
//! `SEED=n cargo test -p shared --test simulator` replays one seed;
//! `SIM_SEEDS=n` changes how many seeds the sweep runs (default 500).

use shared::sim::{run_seed, SimReport};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn simulated_fleet_converges_and_loses_nothing() {
    let seeds: Vec<u64> = match env_u64("SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("SIM_SEEDS").unwrap_or(500)).collect(),
    };
    let mut failures = Vec::new();
    let mut total = SimReport::default();
    for &seed in &seeds {
        match run_seed(seed) {
            Ok(r) => {
                total.acked_ops += r.acked_ops;
                total.deliveries += r.deliveries;
                total.conflicts += r.conflicts;
                total.snapshots += r.snapshots;
                total.snapshot_parts += r.snapshot_parts;
                total.unloads += r.unloads;
                total.loads += r.loads;
                total.crashes += r.crashes;
                total.torn_writes += r.torn_writes;
                total.evictions += r.evictions;
                total.partitions += r.partitions;
                total.dropped += r.dropped;
                total.messages += r.messages;
                if r.coordinators > 1 {
                    total.coordinators += 1;
                }
                total.logged += r.logged;
                total.log_outages += r.log_outages;
                total.requeued += r.requeued;
                total.moves += r.moves;
                total.converged_after_ms = total.converged_after_ms.max(r.converged_after_ms);
            }
            Err(f) => {
                eprintln!("{f}");
                failures.push(f.seed);
            }
        }
    }
    eprintln!(
        "{} seeds with 2-3 coordinators sharing a log: {} ops stored in it, {} log outages, {} ops queued again after a coordinator crash, {} edge moves between coordinators",
        total.coordinators, total.logged, total.log_outages, total.requeued, total.moves
    );
    eprintln!(
        "{} seeds: {} acked ops checked, {} deliveries, {} conflicts, {} snapshots ({} parts of snapshots sent in parts), {} crashes ({} with a torn register write), {} evictions, {} channels unloaded and {} loaded from disk, {} partition flips, {}/{} frames dropped, slowest convergence {} ms",
        seeds.len(),
        total.acked_ops,
        total.deliveries,
        total.conflicts,
        total.snapshots,
        total.snapshot_parts,
        total.crashes,
        total.torn_writes,
        total.evictions,
        total.unloads,
        total.loads,
        total.partitions,
        total.dropped,
        total.messages,
        total.converged_after_ms
    );
    assert!(
        failures.is_empty(),
        "failing seeds (replay each with SEED=n): {failures:?}"
    );
    if seeds.len() > 20 {
        assert!(
            total.conflicts > 0,
            "the sweep never produced a concurrent write"
        );
        assert!(
            total.crashes > 0 && total.partitions > 0,
            "the sweep injected no faults"
        );
        assert!(
            total.coordinators > 0
                && total.log_outages > 0
                && total.requeued > 0
                && total.moves > 0,
            "the sweep never exercised the clustered tier's faults"
        );
    }
}
