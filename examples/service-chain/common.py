"""What the three services share: where Outpost is and how to authenticate.

OUTPOST_ENDPOINTS  comma-separated endpoints (default: the edges and cloud of scripts/start)
OUTPOST_TOKEN      a JWT (scripts/start prints one), or
OUTPOST_API_KEY    an API key from [[auth.api_keys]]
"""

import os
import sys
from pathlib import Path

# Run from a checkout without installing the SDK.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "src"))

import outpost  # noqa: E402

ENDPOINTS = os.environ.get("OUTPOST_ENDPOINTS", "http://127.0.0.1:7701,http://127.0.0.1:7702,http://127.0.0.1:7700").split(",")


def client(endpoints=None) -> outpost.AsyncClient:
    key = os.environ.get("OUTPOST_API_KEY")
    if key:
        return outpost.AsyncClient(endpoints or ENDPOINTS, api_key=key, backoff=(0.05, 1.0))
    token = os.environ.get("OUTPOST_TOKEN")
    if not token:
        sys.exit("set OUTPOST_TOKEN (scripts/start prints one) or OUTPOST_API_KEY")
    return outpost.AsyncClient(endpoints or ENDPOINTS, token=token, backoff=(0.05, 1.0))
