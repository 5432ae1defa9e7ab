"""Token keys as identity providers issue them (`[[auth.jwt_keys]]`): RS256 and ES256
tokens made by PyJWT, several keys at once chosen by `kid` (overlapping rotation), and
the refusals: a `kid` that names another key, an unknown `kid`, a token re-signed with
HS256 using the public key as the secret, `alg: none`."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import httpx
import jwt
import pytest

from .conftest import SECRET, Proc, start_node


def openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout


def keypair(d: Path, name: str, *algo: str) -> "tuple[str, Path]":
    """(private PEM text, public PEM file)."""
    private = openssl("genpkey", *algo).decode()
    (d / f"{name}.key").write_text(private)
    pub = d / f"{name}.pub"
    pub.write_bytes(openssl("pkey", "-in", str(d / f"{name}.key"), "-pubout"))
    return private, pub


def hs256_by_hand(payload: Dict[str, Any], secret: bytes) -> str:
    """An HS256 token signed with any bytes (PyJWT refuses a PEM key as a secret)."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())


def claims(sub: str) -> Dict[str, Any]:
    return {"sub": sub, "exp": int(time.time()) + 600, "rights": [{"channels": "*", "actions": ["subscribe", "publish"]}]}


@pytest.fixture
def edge(tmp_path: Path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make the test keys")
    keys = tmp_path / "keys"
    keys.mkdir()
    rsa_old, rsa_pub = keypair(keys, "rsa-old", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048")
    ec_new, ec_pub = keypair(keys, "ec-new", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    p = start_node(
        tmp_path,
        "jwt-edge",
        "outpost-edge",
        f'[auth]\nhs256_secret = "{SECRET}"\n'
        f'[[auth.jwt_keys]]\nkid = "2026-11"\nalg = "RS256"\nkey = "{rsa_pub}"\n'
        f'[[auth.jwt_keys]]\nkid = "2026-12"\nalg = "ES256"\nkey = """{ec_pub.read_text()}"""\n',
    )
    p.wait_ready()
    try:
        yield p, {"rsa": rsa_old, "ec": ec_new, "rsa_pub": rsa_pub.read_text()}
    finally:
        p.stop()


def publish(p: Proc, token: str) -> httpx.Response:
    return httpx.post(p.url + "/v1/channels/project:jwt/events", json={"event": "e"}, headers={"Authorization": f"Bearer {token}"}, timeout=5)


def test_rs256_and_es256_keys_rotate_by_kid(edge: Any) -> None:
    p, k = edge
    ok = [
        jwt.encode(claims("ada"), k["rsa"], algorithm="RS256", headers={"kid": "2026-11"}),
        jwt.encode(claims("grace"), k["ec"], algorithm="ES256", headers={"kid": "2026-12"}),
        jwt.encode(claims("noor"), k["rsa"], algorithm="RS256"),  # no kid: tried on the RS256 keys
        jwt.encode(claims("lin"), SECRET, algorithm="HS256", headers={"kid": "anything"}),  # legacy secret
    ]
    for t in ok:
        r = publish(p, t)
        assert r.status_code == 200, (jwt.get_unverified_header(t), r.text)
    page = httpx.get(p.url + "/v1/channels/project:jwt/history", headers={"Authorization": f"Bearer {ok[0]}"}).json()
    assert [o["by"] for o in page["ops"]] == ["ada", "grace", "noor", "lin"]

    refused: List["tuple[str, Optional[str]]"] = [
        # Signed by the RS256 key but naming the ES256 key's id: no RS256 key has it.
        (jwt.encode(claims("x"), k["rsa"], algorithm="RS256", headers={"kid": "2026-12"}), "key id"),
        # An id nobody configured, for an algorithm only named keys have.
        (jwt.encode(claims("x"), k["ec"], algorithm="ES256", headers={"kid": "2027-01"}), "key id"),
        # The public key used as an HMAC secret (algorithm confusion).
        (hs256_by_hand(claims("x"), k["rsa_pub"].encode()), "signature"),
        (jwt.encode(claims("x"), None, algorithm="none"), None),
    ]
    for t, why in refused:
        r = publish(p, t)
        assert r.status_code == 401, (jwt.get_unverified_header(t), r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        if why:
            assert why in r.json()["error"]["message"], r.text


async def test_an_api_key_with_an_expiry_ends_its_connections_then(tmp_path: Path) -> None:
    import json as _json

    import websockets

    from .conftest import sha256

    key = "opk_expiring_service_key_0123456789"
    expires = int(time.time()) + 3
    p = start_node(
        tmp_path,
        "key-edge",
        "outpost-edge",
        f'[auth]\n[[auth.api_keys]]\nname = "batch"\nsha256 = "{sha256(key)}"\nexpires_at = {expires}\n'
        'rights = [{ channels = "*", actions = ["subscribe", "publish"] }]\n',
    )
    port = p.port
    try:
        p.wait_ready()
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", additional_headers={"X-Api-Key": key}) as ws:
            assert _json.loads(await ws.recv())["type"] == "connected"
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001, closed.value
        assert time.time() >= expires - 1
        r = httpx.post(p.url + "/v1/channels/project:1/events", json={"event": "late"}, headers={"X-Api-Key": key})
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired", r.text
    finally:
        p.stop()


def test_keys_from_a_jwks_url_rotate_and_survive_an_unreachable_provider(tmp_path: Path) -> None:
    """An identity provider's JWKS document (a local HTTP server): its keys verify
    PyJWT-made tokens; a token naming a new `kid` makes the edge fetch the document
    again (rotation); when the provider is unreachable the last keys stay in use."""
    import http.server
    import json as _json
    import threading

    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk_rsa = {**_json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "k1", "alg": "RS256", "use": "sig"}
    jwk_ec = {**_json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "k2"}  # no alg: told by the curve
    served: Dict[str, Any] = {"keys": [jwk_rsa]}

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = _json.dumps(served).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    p = start_node(
        tmp_path,
        "jwks-edge",
        "outpost-edge",
        f'[auth]\njwks_url = "http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"\njwks_refresh_secs = 3600\n',
    )

    def accepted_within(token: str, secs: float) -> bool:
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            if publish(p, token).status_code == 200:
                return True
            time.sleep(0.3)
        return False

    try:
        p.wait_ready()
        t1 = jwt.encode(claims("ada"), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        assert accepted_within(t1, 10), p.log_tail()
        # Rotation: the provider now publishes k2 only.
        served["keys"] = [jwk_ec]
        t2 = jwt.encode(claims("grace"), ec_key, algorithm="ES256", headers={"kid": "k2"})
        assert accepted_within(t2, 15), f"a token naming the new kid was never accepted: {p.log_tail()}"
        assert publish(p, t1).status_code == 401, "a key the provider dropped still verifies"
        # The provider goes away: the keys of the last good fetch stay.
        server.shutdown()
        server.server_close()
        t3 = jwt.encode(claims("x"), ec_key, algorithm="ES256", headers={"kid": "k3"})
        assert publish(p, t3).status_code == 401  # unknown kid: asks for a fetch, which fails
        deadline = time.monotonic() + 15
        while "JWKS not refreshed" not in p.log_tail():
            assert time.monotonic() < deadline, p.log_tail()
            time.sleep(0.3)
        assert publish(p, t2).status_code == 200
    finally:
        p.stop()
        server.server_close()
