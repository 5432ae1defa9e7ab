import subprocess, sys
breaks = {
 "drop-concurrent-siblings": ("shared/src/state.rs", "        if fresh {\n            self.siblings.push(sibling);", "        if fresh {\n            self.siblings.clear();\n            self.siblings.push(sibling);"),
 "skip-gap-check": ("shared/src/replica.rs", "        self.vv.is_next(op.dot) && self.vv.dominates(&op.deps)", "        let _ = op; true"),
 "skip-causal-deps-check": ("shared/src/replica.rs", "        self.vv.is_next(op.dot) && self.vv.dominates(&op.deps)", "        self.vv.is_next(op.dot)"),
 "no-sibling-cap": ("shared/src/replica.rs", "        for w in &absorbed {\n            context.raise(w.dot.origin, w.dot.seq);\n        }\n        absorbed", "        let _ = absorbed; Vec::new()"),
 "lww-ignores-origin": ("shared/src/state.rs", "        (self.hlc, self.dot.origin, self.dot.seq)", "        (self.hlc, crate::ids::ReplicaId::new(1).unwrap_or(self.dot.origin), 0)"),
 "ack-before-persist-cloud-forgets": ("shared/src/sync.rs", "        for a in &applied_all {\n            self.emit_applied(&channel, a);\n        }", "        for a in &applied_all {\n            if self.role == Role::Edge { self.emit_applied(&channel, a); }\n        }"),
 "no-outbox-resend": ("shared/src/sync.rs", "                if resend {", "                if resend && false {"),
 "no-anti-entropy": ("shared/src/sync.rs", "                if resync {", "                if resync && false {"),
}
only = sys.argv[1:] or list(breaks)
for name in only:
    path, old, new = breaks[name]
    src = open(path).read()
    assert old in src, name
    open(path, "w").write(src.replace(old, new, 1))
    try:
        r = subprocess.run(["cargo", "test", "-p", "shared", "--no-fail-fast", "--tests"], capture_output=True, text=True, env={**__import__("os").environ, "PROPTEST_CASES": "128"})
        out = r.stdout + r.stderr
        failed = [l.strip() for l in out.splitlines() if l.strip().endswith("... FAILED")]
        seeds = [l for l in out.splitlines() if "failing seeds" in l]
        print(f"{name}: exit {r.returncode}; failed: {failed}; {seeds[:1]}")
    finally:
        open(path, "w").write(src)
