"""A subscriber at the end of the chain: every report once, in order.

    python examples/service-chain/check.py project:42 200
"""

import asyncio
import sys

from common import client, outpost


async def main(channel: str, n: int, timeout: float) -> int:
    steps = []
    async with client() as c:
        sub = await c.subscribe(f"{channel}/reports")
        try:
            while len(steps) < n:
                op = await sub.get(timeout=timeout)
                if isinstance(op, outpost.Op):
                    steps.append(op.data["step"])
        except asyncio.TimeoutError:
            pass
    ok = steps == list(range(n))
    dups = len(steps) - len(set(steps))
    print(f"{len(steps)} reports, {dups} duplicates, {'in order, none missing' if ok else 'NOT in order or missing some'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 30)))
