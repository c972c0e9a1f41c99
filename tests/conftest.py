"""Shared test set-up: a private Prefect home (ephemeral API server), the bundled samples."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Prefect reads its settings at import: set them before any test module imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="percival-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"  # the server's shutdown message races pytest's capture

import pytest  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "datasets" / "samples"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES
