#!/usr/bin/env python3
"""Turns bench/run's results.jsonl into the tables for BENCHMARKS.md (REPORT.md) and a
PNG of latency percentiles. With --quick it only checks that nothing was lost."""
import json
import os
import platform
import subprocess
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def machine():
    try:
        cpu = next(
            l.split(":", 1)[1].strip()
            for l in open("/proc/cpuinfo")
            if l.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    cores = os.cpu_count()
    mem = 0
    try:
        mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) // 1024 // 1024
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {cores} cores, {mem} GiB, Linux {platform.release()}; servers pinned to CPU 0, load to CPU 1"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def user_per_1m(r):
    """Server CPU in user space per 1M deliveries (the rest is the kernel's)."""
    u = r.get("server_user_s")
    if u is None or not r.get("delivered"):
        return "n/a"
    return f"{u / r['delivered'] * 1e6:.2f}"


def lost(r):
    return r.get("delivered", 0) != r.get("expected", 0)


def main():
    path, out = sys.argv[1], sys.argv[2]
    quick = "--quick" in sys.argv
    rs = load(path)
    losses = [r for r in rs if "expected" in r and lost(r)]
    for r in rs:
        if "expected" in r:
            print(
                f"{r['workload']} {r['label']:<20} subs {r['subs']:>6} rate {r['rate']:>5}: "
                f"delivered {r['delivered']}/{r['expected']} p99 {r['p99_ms']:.2f} ms"
            )
        elif "kib_per_conn" in r:
            print(f"A {r['label']:<20} {r['kib_per_conn']:.2f} KiB/conn")
        elif "converged_s" in r:
            print(f"F heal: {r['converged_s']:.2f} s for {r['expect']} ops")
    if losses:
        print(f"lost deliveries in {len(losses)} runs: " + ", ".join(
            f"{r['workload']} {r['label']} {r['subs']}x{r['rate']}" for r in losses), file=sys.stderr)
        if quick:
            sys.exit(1)
    if quick:
        print("quick run: every expected delivery arrived (speed is not checked in quick mode)")
        return

    md = []
    md.append(f"Machine: {machine()}.\n")
    md.append("Command: `bench/run` (one run, every peer on the same machine, same load tool).\n")

    idle = {r["label"]: r for r in rs if r.get("workload") == "A"}
    o = idle.get("outpost-fsync", {}).get("kib_per_conn")
    md.append("### A — idle connections: server memory per connection\n")
    md.append("| server | connections | KiB per connection | ÷ Outpost |")
    md.append("| --- | ---: | ---: | ---: |")
    for k, r in idle.items():
        md.append(f"| {k} | {r['conns']} | {r['kib_per_conn']:.2f} | {ratio(r['kib_per_conn'], o)} |")
    md.append("")

    def table(work, title):
        runs = [r for r in rs if r.get("workload") == work]
        if not runs:
            return
        md.append(f"### {title}\n")
        md.append("| server | subscribers | topics | msg/s | delivered | deliveries/s | p50 ms | p99 ms | p99.9 ms | server CPU s / 1M deliveries | of which user | CPU ÷ Outpost | slow consumers |")
        md.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        base = {}
        for r in runs:
            if r["label"].startswith("outpost"):
                base.setdefault((r["subs"], r["topics"], r["rate"]), r.get("cpu_s_per_1m"))
        for r in runs:
            b = base.get((r["subs"], r["topics"], r["rate"]))
            md.append(
                f"| {r['label']} | {r['subs']} | {r['topics']} | {r['rate']} | {r['delivered']}/{r['expected']} | "
                f"{r['deliveries_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | "
                f"{(r.get('cpu_s_per_1m') or 0):.2f} | {user_per_1m(r)} | {ratio(r.get('cpu_s_per_1m'), b)} | {r.get('slow_consumers', 0)} |"
            )
        md.append("")

    table("B", "B — fan-out, one publisher, 128 B messages")
    table("C", "C — many channels")
    table("D", "D — Outpost durability modes")
    table("G", "G — publish → deliver at 10k msg/s: 1,000 channels, one subscriber each")
    table("E", "E — cross-edge latency (edge A → cloud → edge B)")
    table("H", "H — durable publish below JetStream's saturation (a fifth of G's rate)")
    pairs = [("outpost-os", "jetstream", "written, fsync left to the OS / on a timer"),
             ("outpost-fsync", "jetstream-always", "fsync before the ack")]
    for w in ("G", "H"):
        g = {r["label"]: r for r in rs if r.get("workload") == w}
        if not any(js in g for _, js, _ in pairs):
            continue
        md.append(f"### Durable publish: Outpost vs NATS JetStream (file storage), workload {w}\n")
        md.append("| fsync policy | Outpost CPU s / 1M | JetStream CPU s / 1M | JetStream ÷ Outpost CPU | Outpost p99 ms | JetStream p99 ms | JetStream ÷ Outpost p99 |")
        md.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for o, js, policy in pairs:
            a_, b_ = g.get(o, {}), g.get(js, {})
            md.append(
                f"| {policy} ({o} / {js}) | {(a_.get('cpu_s_per_1m') or 0):.2f} | {(b_.get('cpu_s_per_1m') or 0):.2f} | "
                f"{ratio(b_.get('cpu_s_per_1m'), a_.get('cpu_s_per_1m'))} | {a_.get('p99_ms', 0):.2f} | {b_.get('p99_ms', 0):.2f} | "
                f"{ratio(b_.get('p99_ms'), a_.get('p99_ms'))} |"
            )
        md.append("")
    table("J", "J — cross-edge latency through the clustered tier (3 NATS nodes, R3, sync_interval: always; server CPU = coordinator 1)")
    def heal(work, title, down, back):
        runs = [r for r in rs if r.get("workload") == work]
        if runs:
            r = runs[0]
            md.append(f"### {title}\n")
            md.append(
                f"{r['ops_per_edge']} ops written at each of two edges while {down}; "
                f"after {back}, both edges held all {r['expect']} ops after **{r['converged_s']:.2f} s**.\n"
            )

    heal("JF", "J — heal, clustered tier", "both coordinators were down", "they came back")
    heal("F", "F — partition heal", "the cloud was down", "the cloud came back")

    # Summary ratios.
    md.append("### Summary (peer ÷ Outpost; above 1 means Outpost is ahead, except for deliveries/s)\n")
    md.append("| peer | server CPU per 1M deliveries (B, largest load) | same, lowest–highest over B's loads | KiB per idle connection | p99 at matched load (B, largest) | G, 10k msg/s: p99 ÷ Outpost not stored / os / fsync | G: CPU ÷ Outpost not stored / os / fsync | max deliveries/s with p99 < 50 ms (B, C, G) |")
    md.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    b = [r for r in rs if r.get("workload") == "B"]
    if b:
        top = max((r["subs"] * r["rate"] for r in b))
        heavy = {r["label"]: r for r in b if r["subs"] * r["rate"] == top}
        best = {}
        for r in rs:
            if r.get("workload") in ("B", "C", "G") and r["p99_ms"] < 50 and not lost(r):
                best[r["label"]] = max(best.get(r["label"], 0), r["deliveries_per_s"])
        g = {r["label"]: r for r in rs if r.get("workload") == "G"}
        ob = heavy.get("outpost-fsync", {})
        outposts = [g.get(k, {}) for k in ("outpost-ephemeral", "outpost-os", "outpost-fsync")]
        for peer in ["nats", "socketio", "ws"]:
            h = heavy.get(peer, {})
            span = []
            for r in b:
                if r["label"] != peer:
                    continue
                o_r = next((x for x in b if x["label"] == "outpost-fsync" and x["subs"] == r["subs"] and x["rate"] == r["rate"]), None)
                if o_r and o_r.get("cpu_s_per_1m") and r.get("cpu_s_per_1m"):
                    span.append(r["cpu_s_per_1m"] / o_r["cpu_s_per_1m"])
            span_s = f"{min(span):.2f}–{max(span):.2f}" if span else "n/a"
            md.append(
                f"| {peer} | {ratio(h.get('cpu_s_per_1m'), ob.get('cpu_s_per_1m'))} | {span_s} | "
                f"{ratio(idle.get(peer, {}).get('kib_per_conn'), o)} | {ratio(h.get('p99_ms'), ob.get('p99_ms'))} | "
                f"{' / '.join(ratio(g.get(peer, {}).get('p99_ms'), x.get('p99_ms')) for x in outposts)} | "
                f"{' / '.join(ratio(g.get(peer, {}).get('cpu_s_per_1m'), x.get('cpu_s_per_1m')) for x in outposts)} | "
                f"{best.get(peer, 0):.0f} vs Outpost {best.get('outpost-fsync', 0):.0f} |"
            )
    md.append("")
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(out, 'REPORT.md')}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    runs = [r for r in rs if "p99_ms" in r]
    fig, ax = plt.subplots(figsize=(12, 6))
    labels = [f"{r['workload']} {r['label']}\n{r['subs']}s/{r['rate']}/s" for r in runs]
    xs = range(len(runs))
    for q, key in [("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")]:
        ax.scatter(xs, [max(r[key], 0.01) for r in runs], label=q)
    ax.set_yscale("log")
    ax.set_ylabel("publish → deliver latency, ms (log)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.legend()
    ax.set_title("Latency percentiles per server and workload (bench/run)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency.png"), dpi=110)
    print(f"wrote {os.path.join(out, 'latency.png')}")


if __name__ == "__main__":
    main()
