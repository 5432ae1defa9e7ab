"""A FastAPI service that runs ingest jobs, agent runs and workflows for projects and
pushes their progress to the browsers of each project through Outpost.

    uvicorn --app-dir examples/job-events app:app --port 8000

POST /projects/{project}/jobs starts a job (an ingest, then an agent run over what was
ingested, then a workflow node's state); every step is a durable event on the
channel `project:{project}`, in order. GET /projects/{project}/token gives the
project's page a short-lived token that may only subscribe to that project's channel
(the service mints it with the fleet's HS256 secret, as your own backend would for a
signed-in user). GET / serves the page.

OUTPOST_ENDPOINTS   where the service publishes (default: scripts/start's edges and cloud)
OUTPOST_API_KEY or OUTPOST_TOKEN   the service's credential
OUTPOST_JWT_SECRET  the fleet's HS256 secret, to mint page tokens
OUTPOST_PAGE_ENDPOINT  the endpoint pages connect to (default http://127.0.0.1:7701)
JOB_STEP_SECONDS    pause between steps (default 0.3: a job takes a few seconds)
"""

import asyncio
import contextlib
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List

import jwt
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse

# Run from a checkout without installing the SDK.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "src"))

import outpost  # noqa: E402

ENDPOINTS = os.environ.get("OUTPOST_ENDPOINTS", "http://127.0.0.1:7701,http://127.0.0.1:7702,http://127.0.0.1:7700").split(",")
STEP = float(os.environ.get("JOB_STEP_SECONDS", "0.3"))
PAGE = (Path(__file__).parent / "page.html").read_text()


def steps(job: str) -> List["tuple[str, Dict[str, Any]]"]:
    """What one job reports, in order."""
    out: List["tuple[str, Dict[str, Any]]"] = [("ingest.job.created", {"job": job, "source": "s3://bucket/docs"})]
    out += [("ingest.job.updated", {"job": job, "progress": p}) for p in (25, 50, 75, 100)]
    out.append(("ingest.job.completed", {"job": job, "documents": 12}))
    run = f"{job}-run"
    out.append(("agent.run.started", {"job": job, "run": run}))
    out += [("agent.step.updated", {"job": job, "run": run, "step": s, "state": "done"}) for s in ("plan", "retrieve", "answer")]
    out.append(("agent.run.completed", {"job": job, "run": run}))
    out += [("workflow.node_state.updated", {"job": job, "node": "summarize", "state": st}) for st in ("running", "done")]
    return out


def credential() -> Dict[str, str]:
    key, token = os.environ.get("OUTPOST_API_KEY"), os.environ.get("OUTPOST_TOKEN")
    if not (key or token):
        raise SystemExit("set OUTPOST_API_KEY or OUTPOST_TOKEN")
    return {"api_key": key} if key else {"token": token}  # type: ignore[dict-item]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One client for the service's lifetime: writes made while no endpoint answers are
    # kept and sent in order once one does.
    async with outpost.AsyncClient(ENDPOINTS, backoff=(0.05, 1.0), **credential()) as client:
        app.state.outpost = client
        app.state.jobs = set()
        yield
        for t in list(app.state.jobs):
            await t


app = FastAPI(lifespan=lifespan)


async def run_job(client: outpost.AsyncClient, project: str, job: str) -> None:
    channel = f"project:{project}"
    for i, (event, data) in enumerate(steps(job)):
        # Durable, acknowledged once stored; the key makes a resend publish it once.
        await client.publish(channel, event, data, key=f"{job}:{i}")
        await asyncio.sleep(STEP)


@app.post("/projects/{project}/jobs")
async def start_job(project: str) -> Dict[str, Any]:
    if not project.isalnum():
        raise HTTPException(400, "project ids are letters and digits")
    job = f"job-{uuid.uuid4().hex[:8]}"
    task = asyncio.create_task(run_job(app.state.outpost, project, job))
    app.state.jobs.add(task)
    task.add_done_callback(app.state.jobs.discard)
    return {"job": job, "channel": f"project:{project}", "events": len(steps(job))}


@app.get("/projects/{project}/token")
async def page_token(project: str) -> Dict[str, Any]:
    secret = os.environ.get("OUTPOST_JWT_SECRET")
    if not secret:
        raise HTTPException(503, "OUTPOST_JWT_SECRET is not set")
    now = int(time.time())
    claims = {"sub": f"viewer-of-{project}", "exp": now + 3600, "rights": [{"channels": f"project:{project}", "actions": ["subscribe"]}]}
    return {"token": jwt.encode(claims, secret, algorithm="HS256"), "endpoint": os.environ.get("OUTPOST_PAGE_ENDPOINT", "http://127.0.0.1:7701")}


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE
