"""Checkpoints: ``config.json`` + ``model.safetensors`` (+ ``training_state.pt`` while training).

Every file is written atomically (temporary file in the same directory, fsync, ``os.replace``), so a reader
or a resumed run never sees a half-written file. ``training_state.pt`` is self-contained (model weights,
optimizer, scheduler, RNG state, data position) and is loaded with ``torch.load(weights_only=True)``; it is
what a resumed run reads. ``model.safetensors`` is the published weights for inference.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from perceiver.config import RunConfig
from perceiver.model import Percival

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "training_state.pt"
METRICS = "metrics.jsonl"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata or {}))


def save(out_dir: str | Path, model: Percival, config: RunConfig, training_state: dict | None = None,
         step: int | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (if given) ``training_state.pt`` into ``out_dir``.

    The training state is written first: a crash between the two writes leaves a resumable state and the
    previous published weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / CONFIG)
    if training_state is not None:
        atomic_write(out / STATE, lambda tmp: torch.save(training_state, tmp))
    meta = {"format": "percival", "config_version": str(config.version)}
    if step is not None:
        meta["step"] = str(step)
    save_weights(model, out / WEIGHTS, meta)
    return out


def load(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Percival, RunConfig]:
    """The trained model (in eval mode) and its :class:`RunConfig` from a checkpoint directory."""
    out = Path(out_dir)
    config = RunConfig.from_json(out / CONFIG)
    model = Percival(config.model)
    model.load_state_dict(load_file(out / WEIGHTS, device="cpu"), strict=True)
    return model.to(device).eval(), config


def load_training_state(out_dir: str | Path) -> dict | None:
    """The resumable training state, or None when the directory has none."""
    p = Path(out_dir) / STATE
    if not p.exists():
        return None
    return torch.load(p, map_location="cpu", weights_only=True)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The lines of ``metrics.jsonl`` as dicts."""
    p = Path(out_dir) / METRICS
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
