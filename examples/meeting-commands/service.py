"""A meeting service: acts on the commands participants send from their browsers.

Every meeting's commands arrive through one namespace subscription on the cloud
(`meeting:*/commands`, meetings created later included), each with the identity the
edge authenticated (`op.by`). The service answers by writing the meeting's state
(`status`, `config`), which every participant's page shows. Its positions (one token
per meeting) are saved after each command, so a restart — even after kill -9 — acts
on each command once and misses none.

    python3 examples/meeting-commands/service.py [positions-file]

OUTPOST_ENDPOINTS  the cloud or coordinators (default http://127.0.0.1:7700, scripts/start's cloud)
OUTPOST_TOKEN      a JWT whose rights cover meeting:* (scripts/start prints one), or
OUTPOST_API_KEY    an API key from [[auth.api_keys]]
"""

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

# Run from a checkout without installing the SDK.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "src"))

import outpost  # noqa: E402

STATES = {"pause": "paused", "resume": "live", "stop": "ended"}


def load(path: Path) -> Optional[Dict[str, str]]:
    return json.loads(path.read_text()) if path.exists() else None


def save(path: Path, tokens: Dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tokens))
    os.replace(tmp, path)  # atomic: a kill leaves the old positions or the new ones


async def act(client: outpost.AsyncClient, op: outpost.Op) -> str:
    meeting = op.channel.rsplit("/", 1)[0]  # meeting:7/commands -> meeting:7
    if op.event in STATES:
        await client.set(meeting, "status", {"state": STATES[op.event], "by": op.by})
        return f"{meeting} {op.event} by {op.by} -> {STATES[op.event]}"
    if op.event == "configure" and isinstance(op.data, dict):
        await client.set(meeting, "config", {**op.data, "by": op.by})
        return f"{meeting} configure by {op.by} -> {op.data}"
    await client.publish(meeting, "command.rejected", {"event": op.event, "by": op.by})
    return f"{meeting} {op.event} by {op.by} -> rejected"


async def main(positions: Path) -> None:
    endpoints = os.environ.get("OUTPOST_ENDPOINTS", "http://127.0.0.1:7700").split(",")
    key, token = os.environ.get("OUTPOST_API_KEY"), os.environ.get("OUTPOST_TOKEN")
    if not (key or token):
        sys.exit("set OUTPOST_TOKEN (scripts/start prints one) or OUTPOST_API_KEY")
    cred: Dict[str, Any] = {"api_key": key} if key else {"token": token}
    saved = load(positions)
    async with outpost.AsyncClient(endpoints, backoff=(0.05, 1.0), **cred) as client:
        commands = await client.subscribe_pattern("meeting:*/commands", since=saved)
        print(f"listening on {commands.channels} meetings" + (" from the saved positions" if saved else ""), flush=True)
        async for op in commands:
            if isinstance(op, outpost.Op):
                print(await act(client, op), flush=True)
            save(positions, commands.tokens)


if __name__ == "__main__":
    try:
        asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "meeting-service.positions")))
    except KeyboardInterrupt:
        pass
