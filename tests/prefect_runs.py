"""What a flow run left in the test's Prefect API: its run, its task names, its artifacts."""

from __future__ import annotations

import asyncio

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
