"""What a flow run left in the test's Prefect API: its run, its task names, its artifacts; a real Prefect server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from prefect.client.orchestration import get_client


def flow_run_record(flow_run_id) -> tuple:
    """(flow run, names of its task runs, its artifacts)."""

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            tasks = await client.read_task_runs()
            arts = await client.read_artifacts()
        return run, {t.name for t in tasks if t.flow_run_id == run.id}, [a for a in arts if a.flow_run_id == run.id]

    return asyncio.run(read())


def flow_runs_with(parameter: str, value) -> list:
    """Flow runs whose ``parameter`` was ``value`` (e.g. the store a CLI run in a subprocess wrote)."""

    async def read():
        async with get_client() as client:
            return [r for r in await client.read_flow_runs() if r.parameters.get(parameter) == value]

    return asyncio.run(read())


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A real ``prefect server start`` on a free local port, with its own ``home``; yields its API URL and stops
    it (and its children) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Prefect server did not come up in 120 s"
            time.sleep(1)
        yield api
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
