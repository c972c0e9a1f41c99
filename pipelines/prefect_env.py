"""Prefect settings that must be in place before ``prefect`` is imported.

The ephemeral API server (used when ``PREFECT_API_URL`` is unset) needs 9-13 s for a cold first flow on
these machines, longer than Prefect's default start-up timeout; analytics calls would try the network.
Values the user has set are kept: with ``PREFECT_API_URL`` pointing at a running server, flows use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def configure() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)



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
