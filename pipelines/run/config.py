"""A training run's configuration: the model (:class:`perceiver.ModelConfig`), the training loop and the masking
plan, serialised as the checkpoint's ``config.json``; and the ``SECTION.FIELD=VALUE`` overrides of the CLI.

``RunConfig.from_json`` reads it back: unknown keys are an error, missing keys take their defaults, and configs
written before the sectioned model config (``"version": 1``) are migrated (the model section by
:func:`perceiver.config.migrate_flat`; ``train.nll_beta`` moved to ``model.head.nll_beta``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets.loader.blocks import DEFAULT_BLOCK_ELEMENTS
from datasets.loader.masking import MaskingConfig
from perceiver.checkpoint import CONFIG_VERSION, atomic_write_text, load, read_config
from perceiver.config import FLAT_FIELDS, ModelConfig, build_dataclass
from perceiver.model import Percival
from pipelines.options import parse_value


@dataclass
class TrainConfig:
    """The training loop: optimiser, schedule, batching, precision, logging and checkpoint cadence."""

    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    #: token budget per batch (elements + record_cost per record), cap on records per batch, crop length
    batch_tokens: int = 4096
    max_records: int = 64
    record_cost: int = 32
    max_record_elements: int = 4096
    seed: int = 0
    #: "auto" (bf16 autocast where the hardware has native bf16), "bf16" or "fp32"
    precision: str = "auto"
    #: "cpu", "cuda", "cuda:N" or "auto" (the first GPU where torch sees one, else the CPU)
    device: str = "auto"
    #: elements of the train split one process holds at a time: a larger split is read from the store in blocks
    #: of this many (about 60 B each in memory), and validation uses a sample of a quarter of it
    block_elements: int = DEFAULT_BLOCK_ELEMENTS
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 200
    #: checkpoint selection on the validation split (:mod:`pipelines.run.selection`: per-channel median absolute
    #: error, averaged over channels): publish the best evaluation's weights as ``model.safetensors`` at the end
    #: (they are kept in ``best.safetensors`` meanwhile), and stop after this many evaluations without a better
    #: score (0 = never)
    select_best: bool = False
    early_stop_patience: int = 0
    #: torch intra-op threads per process (0 = OMP_NUM_THREADS where set, else the CPUs shared between processes)
    threads: int = 0


@dataclass
class RunConfig:
    """Everything needed to rebuild a model and continue its training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    version: int = CONFIG_VERSION

    def sections(self) -> dict:
        """The sections beside ``model`` in ``config.json``."""
        return {"train": dataclasses.asdict(self.train), "masking": dataclasses.asdict(self.masking)}

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), **self.sections(), "version": self.version}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        data = dict(data)
        train = dict(data.get("train", {}))
        if "nll_beta" in train:  # version 1 kept the Gaussian head's loss setting in the training loop
            beta = train.pop("nll_beta")
            model = dict(data.get("model", {}))
            if "head" in model:
                model["head"] = {**model["head"], "nll_beta": beta}
            else:
                model["head"] = {"nll_beta": beta}
            data["model"], data["train"] = model, train
        data["version"] = CONFIG_VERSION
        return build_dataclass(cls, data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> RunConfig:
        text = str(path_or_text)
        text = text if text.lstrip().startswith("{") else Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))


def apply_overrides(config: RunConfig, items: list[str] | None) -> RunConfig:
    """``SECTION.FIELD=VALUE`` overrides (value read as JSON where it parses). Model fields may be named by
    their section (``model.decoder.local_heads=0``) or by their flat name (``model.decoder_local_heads=0``,
    ``model.d_latent=64``); ``model.head=NAME`` picks the output head."""
    if not items:
        return config
    data = config.to_dict()
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        path = key.split(".")
        if path[:2] == ["model", "head"] and len(path) == 2:
            path = ["model", "head", "name"]
        elif path[0] == "model" and len(path) == 2 and path[1] in FLAT_FIELDS:
            path = ["model", *FLAT_FIELDS[path[1]]]
        node = data
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unknown config field {key!r}")
            node = node[part]
        if not isinstance(node, dict) or (path[-1] not in node and node is not data["model"]["head"]["options"]):
            raise ValueError(f"unknown config field {key!r}")
        node[path[-1]] = parse_value(raw)
    return RunConfig.from_dict(data)


def load_run(out_dir: str | Path, device: str = "cpu") -> tuple[Percival, RunConfig]:
    """The trained model (eval mode) of a checkpoint directory and its whole run configuration (old
    checkpoints migrated)."""
    model = load(out_dir, device)
    config = RunConfig.from_dict(read_config(out_dir))
    return model, dataclasses.replace(config, model=model.config)
