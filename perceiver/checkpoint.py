"""Checkpoints: ``config.json`` + ``model.safetensors`` (+ ``training_state.pt`` while training).

``config.json`` holds the model's configuration with its data contract (``"model"``) beside whatever sections
the code that trained it adds (the run layer writes ``"train"`` and ``"masking"``); :func:`load` needs only
the model section. Checkpoints written before the sectioned config and the data contract (``"version": 1``)
are migrated on read: their flat model fields are sectioned (:func:`perceiver.config.migrate_flat`), their
weight names renamed (:data:`RENAMED_WEIGHTS`), and their contract lacks the normalisation statistics
(``DataContract.complete`` is false): the loader then takes them from the store, with a warning.

Every file is written atomically (temporary file in the same directory, fsync, ``os.replace``), so a reader
or a resumed run never sees a half-written file. ``training_state.pt`` is self-contained (model weights,
optimizer, scheduler, RNG state, data position) and is loaded with ``torch.load(weights_only=True)``; it is
what a resumed run reads. ``model.safetensors`` is the published weights for inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from perceiver.config import ModelConfig
from perceiver.model import Percival

#: the config.json layout: 2 = sectioned model config with its data contract
CONFIG_VERSION = 2
#: weight names of version-1 checkpoints -> today's (the Gaussian head became a module of its own)
RENAMED_WEIGHTS = {"head_norm.weight": "head.norm.weight", "head_norm.bias": "head.norm.bias",
                   "head.weight": "head.proj.weight", "head.bias": "head.proj.bias"}
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


def save(out_dir: str | Path, model: Percival, sections: dict | None = None, training_state: dict | None = None,
         step: int | None = None) -> Path:
    """Write ``config.json`` (the model section, ``sections`` beside it), ``model.safetensors`` and (if given)
    ``training_state.pt`` into ``out_dir``.

    The training state is written first: a crash between the two writes leaves a resumable state and the
    previous published weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, model.config, sections)
    if training_state is not None:
        atomic_write(out / STATE, lambda tmp: torch.save(training_state, tmp))
    meta = {"format": "percival", "config_version": str(CONFIG_VERSION), "head": model.config.head.name}
    if step is not None:
        meta["step"] = str(step)
    save_weights(model, out / WEIGHTS, meta)
    return out


def write_config(out_dir: str | Path, model_config: ModelConfig, sections: dict | None = None) -> None:
    """``config.json``: ``{"model": ..., **sections, "version": CONFIG_VERSION}``, atomically."""
    data = {"model": model_config.to_dict(), **(sections or {}), "version": CONFIG_VERSION}
    atomic_write_text(Path(out_dir) / CONFIG, json.dumps(data, indent=2) + "\n")


def read_config(out_dir: str | Path) -> dict:
    """The raw ``config.json`` of a checkpoint directory (a clear error where there is none)."""
    path = Path(out_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{out_dir}: not a checkpoint (no {CONFIG})")
    return json.loads(path.read_text())


def read_model_config(out_dir: str | Path) -> ModelConfig:
    """A checkpoint's model configuration with its data contract, without building the model or reading its
    weights (old checkpoints migrated)."""
    return ModelConfig.from_dict(read_config(out_dir)["model"])


def load(out_dir: str | Path, device: str | torch.device = "cpu") -> Percival:
    """The trained model (in eval mode) of a checkpoint directory; ``model.config`` is its configuration
    with its data contract. Old checkpoints are migrated (see the module docstring)."""
    out = Path(out_dir)
    model = Percival(read_model_config(out))
    state = load_file(out / WEIGHTS, device="cpu")
    state = {RENAMED_WEIGHTS.get(k, k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


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


def weights_sha256(out_dir: str | Path) -> str | None:
    """SHA-256 of a checkpoint's ``model.safetensors`` (its identity in provenance), None where absent."""
    path = Path(out_dir) / WEIGHTS
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
