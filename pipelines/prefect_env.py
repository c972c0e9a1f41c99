"""Prefect settings that must be in place before ``prefect`` is imported, and the command line's API server.

The ephemeral API server (used when no ``PREFECT_API_URL`` is configured) needs 9-13 s for a cold first flow
on these machines, longer than Prefect's default start-up timeout; analytics calls would try the network.
Values the user has set are kept: with ``PREFECT_API_URL`` pointing at a running server, flows use it.

Also how the flows run without Prefect (``--no-prefect``): inside :func:`without_prefect` a flow's plain
function calls its tasks and subflows as plain functions (:func:`run`, :func:`run_flow`), logs through the
``percival`` logger (:func:`run_logger`) and publishes no artifacts; and :func:`quiet_failures`, which keeps a
failed run's traceback out of Prefect's log lines on the command line.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def configure() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


class _TemporaryServer:
    """Prefect's temporary API server (the same uvicorn command Prefect's ephemeral mode runs), started before
    ``prefect`` is imported so that it comes up on the other core while the command imports its flow."""

    def __init__(self) -> None:
        self.port = _free_port()
        package = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])  # no import
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"})
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect API server on port {self.port} exited with code "
                                   f"{self.process.returncode}; set PREFECT_API_URL to a running server instead")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the temporary Prefect API server did not answer within {timeout_s:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_server: _TemporaryServer | None = None


def start_api_early() -> None:
    """Start a temporary API server now, unless ``PREFECT_API_URL`` is in the environment.

    A flow would start one itself on its first call (about 4 s after ``prefect.server`` is imported, another
    2.5 s); started first thing, it comes up while the command imports its modules. :func:`api` uses it.
    """
    global _server
    if _server is None and not os.environ.get("PREFECT_API_URL"):
        _server = _TemporaryServer()


@contextlib.contextmanager
def api() -> Iterator[None]:
    """Flows run inside this block use the server of :func:`start_api_early`, unless the user's Prefect
    profile names one (then that server is used and the temporary one is stopped)."""
    global _server
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if _server is None:
        yield
        return
    if get_current_settings().api.url:  # set in the user's profile: theirs wins
        _server.stop()
        _server = None
        yield
        return
    _server.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    os.environ["PREFECT_API_URL"] = _server.api_url  # spawned workers report here too
    try:
        with temporary_settings(updates={PREFECT_API_URL: _server.api_url}):
            yield
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):  # send what is queued while the server is still up
            worker.drain_all(timeout=10)
        os.environ.pop("PREFECT_API_URL", None)
        _server.stop()
        _server = None


@contextlib.contextmanager
def workers_share_api() -> Iterator[None]:
    """Processes started inside this block report to this process's Prefect API.

    Without ``PREFECT_API_URL``, every spawned task-runner process (and every Dask worker) would start a
    temporary API server of its own: seconds each, and runs that the user's API never sees.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    os.environ["PREFECT_API_URL"] = str(get_client(sync_client=True).api_url)
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def dask_task_runner(workers: int, address: str | None = None):
    """Prefect's Dask task runner: on the scheduler at ``address``, else on a local cluster of ``workers``
    single-threaded processes (no dashboard)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": max(workers, 1), "threads_per_worker": 1, "processes": True,
                                         "dashboard_address": None})


class _WithoutTraceback(logging.Filter):
    """Drops the traceback from a log record (its message, one line, stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_failures() -> None:
    """Prefect's run loggers print a failed run's whole traceback; the command line prints the error as one line
    instead (``percival --debug`` keeps the traceback)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_WithoutTraceback())


# ----------------------------------------------------------------------------------- flows without Prefect

_WITHOUT_PREFECT: contextvars.ContextVar[bool] = contextvars.ContextVar("percival_without_prefect", default=False)


@contextlib.contextmanager
def without_prefect() -> Iterator[None]:
    """A flow's plain function (``flow.fn(...)``) called inside this block runs its tasks as plain functions:
    no API server, no task runs, no artifacts; logs go to the ``percival`` logger (``--no-prefect``)."""
    token = _WITHOUT_PREFECT.set(True)
    try:
        yield
    finally:
        _WITHOUT_PREFECT.reset(token)


def prefect_off() -> bool:
    """Whether this code runs inside :func:`without_prefect`."""
    return _WITHOUT_PREFECT.get()


def run(task, *args, **kwargs):
    """Call the Prefect task ``task``: a task run inside a flow run, its plain function inside
    :func:`without_prefect`."""
    return task.fn(*args, **kwargs) if prefect_off() else task(*args, **kwargs)


def run_logger():
    """The flow or task run's logger; the ``percival`` logger inside :func:`without_prefect`."""
    if prefect_off():
        return logging.getLogger("percival")
    from prefect import get_run_logger

    return get_run_logger()


def markdown_artifact(markdown: str, key: str) -> None:
    """Publish ``markdown`` as the run's artifact ``key`` (nothing inside :func:`without_prefect`)."""
    if not prefect_off():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=key)


def run_flow(flow, *args, **kwargs):
    """Call the Prefect flow ``flow``: a subflow run inside a flow run, its plain function inside
    :func:`without_prefect`."""
    return flow.fn(*args, **kwargs) if prefect_off() else flow(*args, **kwargs)
