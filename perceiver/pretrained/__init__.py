"""Models that ship with Percival, trained on the full shared PhysioNet 2019 and PLAsTiCC training splits.

``--checkpoint physionet2019`` (or ``plasticc``) names one wherever a checkpoint directory is accepted;
``percival models`` lists them. Each is a checkpoint directory (``config.json``: configuration and data contract;
``model.safetensors``: weights) with a ``card.json``: training data, licence and attribution, the command and
commit that made it, and its quality on the test split. ``bench/pretrained.py`` makes them.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
CARD = "card.json"


def shipped_models() -> dict[str, Path]:
    """Name -> checkpoint directory of every shipped model."""
    return {p.name: p for p in sorted(HERE.iterdir()) if (p / "config.json").is_file() and (p / CARD).is_file()}


def model_card(name: str) -> dict:
    """The card of shipped model ``name`` (see the module docstring)."""
    return json.loads((HERE / name / CARD).read_text())


def resolve_checkpoint(checkpoint: str | Path) -> str:
    """``checkpoint`` if it is a checkpoint directory, else the directory of the shipped model of that name.

    Raises FileNotFoundError naming the path and the shipped models where it is neither."""
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        return str(checkpoint)
    models = shipped_models()
    if str(checkpoint) in models:
        return str(models[str(checkpoint)])
    if path.exists():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint (no config.json)")
    raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory, nor a shipped model (shipped: "
                            f"{', '.join(models) or 'none'}; see `percival models`)")


__all__ = ["model_card", "resolve_checkpoint", "shipped_models"]
