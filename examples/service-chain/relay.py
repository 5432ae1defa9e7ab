"""Service B: reacts to every workflow event of a project and publishes a report to
`<channel>/reports`, in order. It keeps its position (the resume token) in a file, so
a restart — even after kill -9 — resumes exactly after the last event it handled; a
report it published but had not yet recorded is published again with the same
idempotency key (derived from the source event's dot), so it is stored once.

    python examples/service-chain/relay.py project:42 /tmp/relay.position
"""

import asyncio
import os
import sys
from pathlib import Path

from common import client, outpost


def load(path: Path):
    return path.read_text().strip() or None if path.exists() else None


def save(path: Path, token: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(token)
    os.replace(tmp, path)  # atomic: the file holds the old or the new position


async def main(channel: str, position: Path) -> None:
    async with client() as c:
        sub = await c.subscribe(channel, since=load(position))
        print(f"relaying {channel} from {'the start' if sub.token is None else 'the saved position'}", flush=True)
        async for op in sub:
            if isinstance(op, outpost.Truncated):
                print("history was compacted past our position: some events were skipped", flush=True)
            elif op.event and op.event.startswith("workflow."):
                step = op.data["step"]
                await c.publish(f"{channel}/reports", "report.step", {"step": step, "source": op.dot}, key=f"report-{op.dot}")
                print(f"reported step {step}", flush=True)
            save(position, sub.token)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
