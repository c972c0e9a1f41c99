"""Prefect settings that must be in place before ``prefect`` is imported.

The ephemeral API server (used when ``PREFECT_API_URL`` is unset) needs 9-13 s for a cold first flow on
these machines, longer than Prefect's default start-up timeout; analytics calls would try the network.
Values the user has set are kept: with ``PREFECT_API_URL`` pointing at a running server, flows use it.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def configure() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


configure()
