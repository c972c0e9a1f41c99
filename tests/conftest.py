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


@pytest.fixture(scope="session")
def physionet_sample_store(tmp_path_factory, samples) -> str:
    """The bundled PhysioNet sample ingested once per test session (read-only for tests)."""
    from datasets.ingest import ingest

    path = str(tmp_path_factory.mktemp("shared") / "physionet.zarr")
    ingest("physionet2019", str(samples / "physionet2019"), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, physionet_sample_store) -> str:
    """A tiny model trained for a few steps on the PhysioNet sample (read-only for tests)."""
    from datasets.store import open_store
    from perceiver.config import ModelConfig
    from pipelines.run.config import RunConfig, TrainConfig
    from pipelines.run.training import train

    out = str(tmp_path_factory.mktemp("shared") / "tiny-checkpoint")
    store = open_store(physionet_sample_store)
    config = RunConfig(model=ModelConfig.preset("tiny"),
                       train=TrainConfig(steps=12, warmup_steps=2, log_every=4, eval_every=6, eval_batches=2,
                                         checkpoint_every=6, batch_tokens=4096, precision="fp32"))
    return str(train(config, store.read(), store.channels, out))


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto, server mode) for the session, with the standard AWS_* environment
    pointing at it (see ``tests/object_store.py``)."""
    from object_store import running_server

    with running_server() as server:
        yield server
