"""A real fleet for the SDK's tests: an `outpost-cloud` and two `outpost-edge` processes
on loopback (the debug binaries of this checkout, or `OUTPOST_BIN`), each with its own
sled data dir, the edges linked to the cloud over QUIC with the cloud's dev
certificate pinned. Tokens are minted with PyJWT (not with Outpost's own code) and a
service authenticates with an API key.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import jwt
import pytest

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("OUTPOST_BIN", REPO / "target" / "debug"))
SECRET = "python-sdk-test-secret-0123456789abcdef"
API_KEY = "opk_python_sdk_service_key_0123456789"
LIMITED_KEY = "opk_python_sdk_limited_key_0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def token(channels: List[str] = ["*"], actions: Optional[List[str]] = None, sub: str = "user-1", ttl: int = 3600) -> str:
    """A JWT as an application's auth service would mint it (PyJWT, HS256)."""
    now = int(time.time())
    acts = actions or ["subscribe", "publish", "state", "presence"]
    return jwt.encode(
        {"sub": sub, "exp": now + ttl, "nbf": now - 5, "rights": [{"channels": c, "actions": acts} for c in channels]},
        SECRET,
        algorithm="HS256",
    )


COMMON = f"""
[auth]
hs256_secret = "{SECRET}"
[[auth.api_keys]]
name = "service"
sha256 = "{sha256(API_KEY)}"
rights = [{{ channels = "*", actions = ["subscribe", "publish", "state", "presence"] }}]
[[auth.api_keys]]
name = "limited"
sha256 = "{sha256(LIMITED_KEY)}"
rights = [{{ channels = "project:1", actions = ["subscribe", "publish"] }}]
[history.namespaces.short]
max_ops = 5
"""


class Proc:
    def __init__(self, name: str, args: List[str], workdir: Path, port: int):
        self.name, self.args, self.workdir, self.port = name, args, workdir, port
        self.popen: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.popen = subprocess.Popen(
            self.args,
            stdout=open(self.workdir / "stdout", "ab"),
            stderr=open(self.workdir / "log", "ab"),
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout} s: {self.log_tail()}")

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """kill -9, and wait for it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log_tail(self) -> str:
        try:
            return (self.workdir / "log").read_text()[-2000:]
        except OSError:
            return ""


def start_node(root: Path, name: str, binary: str, config: str, proc: type = Proc) -> Proc:
    """Starts `binary` in `root/name` with its own data dir and HTTP port and the rest
    of `config` (not waiting for it to be ready)."""
    d = root / name
    d.mkdir()
    port = free_port()
    (d / "node.toml").write_text(f'listen = "127.0.0.1:{port}"\ndata_dir = "{d}"\n' + config)
    p = proc(name, [str(BIN / binary), "--config", str(d / "node.toml")], d, port)
    p.start()
    return p


class Fleet:
    """cloud, edge a and edge b."""

    def __init__(self, root: Path):
        for b in ("outpost-cloud", "outpost-edge"):
            if not (BIN / b).exists():
                raise RuntimeError(f"{BIN / b} is missing: run `cargo build --workspace --bins` first (or set OUTPOST_BIN)")
        self.root = root
        self.procs: Dict[str, Proc] = {}
        quic = free_udp_port()
        links = {e: f"uplink-token-{e}-0123456789abcdef" for e in ("a", "b")}
        cloud = self.node(
            "cloud",
            "outpost-cloud",
            'region = "cloud"\ndev = true\n'
            + COMMON
            + f'[hub]\nlisten = "127.0.0.1:{quic}"\n'
            + "".join(f'[[hub.edges]]\nname = "edge-{e}"\ntoken_sha256 = "{sha256(t)}"\n' for e, t in links.items()),
        )
        cloud_dir = cloud.workdir
        pin = ""
        deadline = time.monotonic() + 30
        while not pin and time.monotonic() < deadline:
            for line in (cloud_dir / "stdout").read_text().splitlines() if (cloud_dir / "stdout").exists() else []:
                if line.startswith("outpost-cloud certificate sha256 "):
                    pin = line.split()[-1]
            time.sleep(0.05)
        if not pin:
            raise RuntimeError(f"the cloud printed no certificate: {cloud.log_tail()}")
        cloud.wait_ready()
        self.procs["cloud"] = cloud
        for e, t in links.items():
            p = self.node(
                f"edge-{e}",
                "outpost-edge",
                f'region = "region-{e}"\n'
                + COMMON
                + f'[uplink]\nendpoints = ["127.0.0.1:{quic}"]\ntoken = "{t}"\npin_sha256 = "{pin}"\n',
            )
            p.wait_ready()
            self.procs[e] = p
        for e in ("a", "b"):
            self.wait_linked(e)

    def node(self, name: str, binary: str, config: str) -> Proc:
        return start_node(self.root, name, binary, config)

    def __getitem__(self, name: str) -> Proc:
        return self.procs[name]

    def wait_linked(self, edge: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.procs[edge].metric("outpost_uplink_connected") != 1.0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"edge {edge} did not link to the cloud: {self.procs[edge].log_tail()}")
            time.sleep(0.05)

    def restart(self, name: str) -> None:
        p = self.procs[name]
        p.kill()
        p.start()
        p.wait_ready()

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def channel(request: pytest.FixtureRequest) -> str:
    """A channel of its own for each test."""
    return f"project:{request.node.name.replace('_', '-')[:60]}-{time.monotonic_ns() % 10**9}"
