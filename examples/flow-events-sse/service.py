"""The service side of a flow editor: publishes the canvas, execution updates and a
streamed LLM answer (LOG_STREAM chunks) to `flow:<id>`, as a backend that used to
write to Firebase would.

    python examples/flow-events-sse/service.py flow:7
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service-chain"))
from common import client  # noqa: E402

NODES = [{"id": "n1", "label": "fetch"}, {"id": "n2", "label": "summarize"}, {"id": "n3", "label": "publish"}]
ANSWER = "Outpost keeps serving when the cloud is away, and nothing acknowledged is lost. " * 3


def chunks(text: str, size: int = 7):
    return [text[i : i + size] for i in range(0, len(text), size)]


async def main(channel: str, pause: float) -> None:
    async with client() as c:
        await c.publish(channel, "SYNC_CANVAS", {"nodes": NODES})
        for node in NODES:
            await c.publish(channel, "EXECUTION_UPDATE", {"node": node["id"], "state": "running"})
            if node["id"] == "n2":
                for seq, text in enumerate(chunks(ANSWER)):
                    await c.publish(channel, "LOG_STREAM", {"node": "n2", "seq": seq, "text": text})
                    await asyncio.sleep(pause)
            await c.publish(channel, "EXECUTION_UPDATE", {"node": node["id"], "state": "done"})
        print(f"published the flow, {len(chunks(ANSWER))} log chunks", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.02))
