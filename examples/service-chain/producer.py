"""Service A: a workflow engine publishing node-state events for one run.

    python examples/service-chain/producer.py project:42 200
"""

import asyncio
import sys

from common import client


async def main(channel: str, n: int, pause: float) -> None:
    async with client() as c:
        for i in range(n):
            ack = await c.publish(
                channel,
                "workflow.node_state.updated",
                {"run": 9, "step": i, "state": "done"},
                key=f"run-9-step-{i}",  # a retry after a lost answer is stored once
            )
            print(f"published step {i} as {ack.dot}", flush=True)
            await asyncio.sleep(pause)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.01))
