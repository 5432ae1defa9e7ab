"""TLS on the client listener (`[tls]`), tried with clients we did not write: httpx
over HTTP/2 (REST and two SSE streams on one connection), `websockets` over WSS, and
Python's own `ssl` for what certificate a new connection is given after a renewal
(SIGHUP, and a file change) while open connections stay up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from .conftest import API_KEY, COMMON, Proc, start_node

CHANNEL = "project:tls"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path) -> Path:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=outpost test CA")
    return d / "ca.pem"


def make_leaf(d: Path, name: str) -> "tuple[Path, Path]":
    """A certificate for localhost and 127.0.0.1 signed by the test CA: (cert, key)."""
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


def presented(port: int, ca: Path) -> bytes:
    """The certificate a new TLS connection is given (DER)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            der = s.getpeercert(binary_form=True)
            assert der is not None
            return der


def trust(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


class TlsEdge(Proc):
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture
def tls_edge(tmp_path: Path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make the test CA")
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = make_ca(certs)
    cert, key = make_leaf(certs, "first")
    live_cert, live_key = certs / "live.pem", certs / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    p = start_node(tmp_path, "tls-edge", "outpost-edge", f'[tls]\ncert = "{live_cert}"\nkey = "{live_key}"\nreload_secs = 1\n' + COMMON, TlsEdge)
    deadline = time.monotonic() + 30
    while True:
        assert p.popen is not None and p.popen.poll() is None, p.log_tail()
        try:
            if httpx.get(p.url + "/readyz", verify=trust(ca), timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, p.log_tail()
        time.sleep(0.05)
    try:
        yield p, ca, certs
    finally:
        p.stop()


async def wss(p: TlsEdge, ca: Path) -> Any:
    ctx = ssl.create_default_context(cafile=str(ca))
    ws = await websockets.connect(f"wss://localhost:{p.port}/v1/ws", ssl=ctx, additional_headers={"X-Api-Key": API_KEY})
    assert json.loads(await ws.recv())["type"] == "connected"
    return ws


async def next_op(ws: Any) -> Any:
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if m["type"] == "op":
            return m


async def test_https_wss_and_sse_over_http2(tls_edge: Any) -> None:
    p, ca, _ = tls_edge
    assert "listening on https://" in (p.workdir / "stdout").read_text()
    ws = await wss(p, ca)
    await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": CHANNEL}))
    while json.loads(await ws.recv()).get("id") != 1:
        pass
    headers = {"X-Api-Key": API_KEY}
    async with httpx.AsyncClient(http2=True, verify=trust(ca), base_url=p.url, headers=headers, timeout=10) as http:
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.http_version) == (200, "HTTP/2")
        sse_url = f"/v1/channels/{CHANNEL}/events"
        async with http.stream("GET", sse_url, headers={"Accept": "text/event-stream"}) as one, http.stream("GET", sse_url, headers={"Accept": "text/event-stream"}) as two:
            assert one.http_version == two.http_version == "HTTP/2"
            r = await http.post(f"/v1/channels/{CHANNEL}/events", json={"event": "over-h2", "data": 1})
            assert (r.status_code, r.http_version) == (200, "HTTP/2"), r.text

            async def first_op(stream: httpx.Response) -> Any:
                event = None
                async for line in stream.aiter_lines():
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and event == "op":
                        return json.loads(line.split(":", 1)[1])

            a, b = await asyncio.wait_for(asyncio.gather(first_op(one), first_op(two)), 10)
            assert a["event"] == b["event"] == "over-h2"
    assert (await next_op(ws))["event"] == "over-h2"
    await ws.close()
    # A client that does not trust the CA is refused.
    with pytest.raises(httpx.ConnectError):
        httpx.get(p.url + "/readyz", timeout=5)


async def test_a_renewed_certificate_is_served_without_a_restart(tls_edge: Any) -> None:
    p, ca, certs = tls_edge
    assert presented(p.port, ca) == der_of(certs / "first.pem")
    ws = await wss(p, ca)  # opened with the first certificate; stays open
    await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": CHANNEL + "-renew"}))
    while json.loads(await ws.recv()).get("id") != 1:
        pass
    for name, how in (("second", "sighup"), ("third", "file change")):
        cert, key = make_leaf(certs, name)
        for src, dst in ((key, certs / "live.key"), (cert, certs / "live.pem")):
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, dst)
        if how == "sighup":
            p.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while presented(p.port, ca) != der_of(cert):
            assert time.monotonic() < deadline, f"{name} ({how}) not served: {p.log_tail()}"
            await asyncio.sleep(0.1)
        r = httpx.post(f"{p.url}/v1/channels/{CHANNEL}-renew/events", json={"event": name}, headers={"X-Api-Key": API_KEY}, verify=trust(ca), timeout=5)
        assert r.status_code == 200, r.text
        assert (await next_op(ws))["event"] == name, "the connection opened before the renewal stopped receiving"
    # A broken pair is refused and the certificate in use stays.
    (certs / "live.key").write_text("not a key")
    p.signal(signal.SIGHUP)
    await asyncio.sleep(1.5)
    assert presented(p.port, ca) == der_of(certs / "third.pem")
    assert "TLS certificate not reloaded" in p.log_tail()
    await ws.close()


def test_a_browser_loads_the_page_and_connects_over_https_wss_and_http2(tls_edge: Any) -> None:
    """Headless Chromium with its own fetch, WebSocket and EventSource."""
    import base64
    import hashlib
    import shutil

    from .conftest import REPO, token

    p, ca, certs = tls_edge
    node = shutil.which("node")
    if node is None or not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists() or not (REPO / "tests" / "browser" / "node_modules" / "playwright-core").exists():
        pytest.skip("needs node, Chromium and tests/browser/node_modules (scripts/test installs them)")
    spki = subprocess.run(["openssl", "x509", "-in", str(certs / "first.pem"), "-pubkey", "-noout"], check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=spki, check=True, capture_output=True).stdout
    cfg = {
        "origin": f"https://localhost:{p.port}",
        "token": token(["*"]),
        "channel": CHANNEL + "-browser",
        "spki": base64.b64encode(hashlib.sha256(der).digest()).decode(),
    }
    out = subprocess.run([node, str(REPO / "tests" / "browser" / "tls.mjs"), json.dumps(cfg)], capture_output=True, text=True, timeout=90)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ok"], (r, out.stderr)
    assert (r["page"], r["protocol"], r["ready"]) == (200, "h2", 200), r
    assert r["ws"] == "connected" and r["streams"] == ["subscribed", "subscribed"], r
    assert r["protocols"] and all(x == "h2" for x in r["protocols"]), r
