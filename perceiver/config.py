"""Typed configuration: the model, the training run, and the masking plan, serialised as one JSON file.

:class:`RunConfig` is what is written as ``config.json`` beside every checkpoint; ``RunConfig.from_json``
reads it back (unknown keys are an error, missing keys take their defaults, so old configs stay readable
when a field is added).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datasets.format import ElementSet
from datasets.loader.batches import modality_names, segment_ids
from datasets.loader.masking import MaskingConfig

CONFIG_VERSION = 1


@dataclass
class ModelConfig:
    """Sizes of the encoder-decoder and the scales of its Fourier features.

    The channel vocabulary (``channel_names``, ``modalities``, ``channel_modality``) and the time / coord
    scales are data statistics: :func:`fit_data_statistics` fills them from the training split.
    """

    #: channel names in channel-table order, the modality names, and each channel's modality index
    channel_names: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    channel_modality: list[int] = field(default_factory=list)

    #: width of an element token (encoder input and decoder query encodings), and its per-element MLP
    d_input: int = 64
    input_mlp_ratio: float = 1.0
    #: latent array: n_latents x d_latent
    n_latents: int = 64
    d_latent: int = 128
    #: latent self-attention blocks, their heads and MLP widening; share_weights reuses one block
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    share_weights: bool = False
    #: encoder cross-attention (latents -> elements): heads and per-head width (0 = d_input)
    cross_heads: int = 1
    cross_head_dim: int = 0
    cross_mlp_ratio: float = 4.0
    #: decoder: query width, cross-attention heads and per-head width (0 = d_query / heads), MLP widening
    d_query: int = 128
    decoder_heads: int = 1
    decoder_head_dim: int = 0
    decoder_mlp_ratio: float = 4.0
    #: decoder: queries also attend to a bounded neighbourhood of their record's visible element tokens (local
    #: evidence beside the latents' summary, e.g. the same hour's other vitals; :mod:`perceiver.local_attention`):
    #: heads of that attention (0 = latents only), visible elements read on each side of the query in time
    #: (any channel), and of the query's own channel on each side. Cost per query is fixed: linear in queries.
    decoder_local_heads: int = 4
    decoder_local_time: int = 8
    decoder_local_channel: int = 4
    #: decoder: queries also carry their channel's previous / next visible values in the record and the gaps
    #: to them (the interpolation baselines' evidence, :mod:`perceiver.neighbours`)
    decoder_neighbours: bool = True
    #: ... and the same for every channel of the table: the record's state around the query's time
    decoder_snapshot: bool = True
    #: Fourier features: number of frequencies and the shortest / longest period (data units)
    n_time_freqs: int = 16
    time_min_period: float = 1.0
    time_max_period: float = 100.0
    n_coord_freqs: int = 16
    coord_min_period: float = 1.0
    coord_max_period: float = 10000.0
    coord_center: float = 0.0
    coord_scale: float = 1.0
    #: floor on the predicted sigma (normalised units)
    min_sigma: float = 1e-3
    #: variable-length attention: "auto" (length-grouped padded SDPA), "padded" (pad to max), "loop"
    varlen: str = "auto"

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """Named sizes: ``tiny`` (tests, ~30 k parameters), ``small`` (the default, ~1.2 M, trains on a CPU in
        minutes), ``bench`` (the peer-comparison shape: 256 x 256 latents, 6 layers of 8 heads, ~5.1 M; a pure
        Perceiver IO decoder, as the peers have)."""
        sizes = {
            "tiny": dict(d_input=16, n_latents=8, d_latent=32, n_layers=2, n_heads=2, mlp_ratio=2.0,
                         cross_mlp_ratio=2.0, d_query=32, decoder_mlp_ratio=2.0, n_time_freqs=8,
                         n_coord_freqs=4),
            "small": {},
            "bench": dict(d_input=64, n_latents=256, d_latent=256, n_layers=6, n_heads=8, mlp_ratio=4.0,
                          cross_heads=1, cross_head_dim=64, cross_mlp_ratio=1.0, d_query=128, decoder_heads=1,
                          decoder_head_dim=64, decoder_mlp_ratio=2.0, decoder_local_heads=0,
                          decoder_neighbours=False),
        }
        if name not in sizes:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(sizes)}")
        return cls(**{**sizes[name], **overrides})

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)


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
    #: beta-NLL exponent: each element's NLL is weighted by its (detached) predictive variance ** nll_beta;
    #: 0 = plain NLL
    nll_beta: float = 0.5
    #: token budget per batch (elements + record_cost per record), cap on records per batch, crop length
    batch_tokens: int = 4096
    max_records: int = 64
    record_cost: int = 32
    max_record_elements: int = 4096
    seed: int = 0
    #: "auto" (bf16 autocast where the hardware has native bf16), "bf16" or "fp32"
    precision: str = "auto"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 200
    #: torch intra-op threads per process (0 = torch's default)
    threads: int = 0


@dataclass
class RunConfig:
    """Everything needed to rebuild a model and continue its training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            from perceiver.checkpoint import atomic_write_text

            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        model = data.get("model")
        if isinstance(model, dict) and "decoder_element_heads" in model:
            # the decoder's attention to *every* visible element of a record (O(queries x elements)) is retired
            model = dict(model)
            if model.pop("decoder_element_heads"):
                raise ValueError("this checkpoint's decoder attends to every element of a record (the retired "
                                 "O(N^2) decoder_element_heads); retrain it with the bounded local decoder")
            data = {**data, "model": model}
        return _build(cls, data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> RunConfig:
        p = Path(path_or_text)
        text = p.read_text() if not str(path_or_text).lstrip().startswith("{") else str(path_or_text)
        return cls.from_dict(json.loads(text))


def _build(cls: type, data: dict):
    """A dataclass from a dict, recursing into dataclass-typed fields; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for k, v in data.items():
        hint = hints[k]
        if dataclasses.is_dataclass(hint) and isinstance(v, dict):
            v = _build(hint, v)
        elif typing.get_origin(hint) is tuple and isinstance(v, list):
            v = tuple(v)
        elif hint in (int, float, str, bool) and not _fits(v, hint):
            raise ValueError(f"{cls.__name__}.{k} must be {hint.__name__}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def _fits(value, kind: type) -> bool:
    """JSON's view of a scalar field: an int is a float too; a bool is not a number."""
    if kind is bool or isinstance(value, bool):
        return isinstance(value, bool) and kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def _positive_gaps(values: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Differences between consecutive distinct values within each record (values sorted per record)."""
    order = np.lexsort((values, seg))
    v, s = values[order], seg[order]
    d = np.diff(v)
    same = s[1:] == s[:-1]
    d = d[same]
    return d[d > 0]


def fit_data_statistics(config: ModelConfig, elements: ElementSet, channels: pd.DataFrame,
                        records: np.ndarray | None = None) -> ModelConfig:
    """Fill the channel vocabulary and the Fourier scales of ``config`` from data (the train records).

    Time periods span the shortest time scale (1st percentile of the gaps between consecutive distinct times
    of a record) to twice the longest (the largest record time span); coord periods likewise span the
    smallest gap between distinct coords within a record to twice the coord range.
    """
    config = dataclasses.replace(config)
    config.channel_names = [str(x) for x in channels["name"]]
    config.modalities = modality_names(channels)
    config.channel_modality = [config.modalities.index(str(m)) for m in channels["modality"]]
    offsets = elements.offsets
    if records is None:
        records = np.arange(elements.n_records)
    from datasets.loader.batches import ranges

    lengths = np.asarray(elements.row_size, np.int64)[records]
    idx = ranges(offsets[records], lengths)
    seg = segment_ids(np.concatenate([[0], np.cumsum(lengths)]))
    time = elements.time[idx].astype(np.float64)
    ok = np.isfinite(time)
    if ok.sum() >= 2:
        gaps = _positive_gaps(time[ok], seg[ok])
        tmin = np.full(len(records), np.inf)
        tmax = np.full(len(records), -np.inf)
        np.minimum.at(tmin, seg[ok], time[ok])
        np.maximum.at(tmax, seg[ok], time[ok])
        span = tmax - tmin
        longest = float(np.max(span[np.isfinite(span)], initial=0.0))
        shortest = float(np.percentile(gaps, 1)) if len(gaps) else longest
        if longest > 0:
            config.time_max_period = 2.0 * longest
            config.time_min_period = max(shortest, longest * 1e-6)
    coord = elements.coord[idx].astype(np.float64)
    ok = np.isfinite(coord)
    if ok.any():
        lo, hi = float(coord[ok].min()), float(coord[ok].max())
        gaps = _positive_gaps(coord[ok], seg[ok])
        rng = hi - lo
        config.coord_center = 0.5 * (lo + hi)
        config.coord_scale = max(0.5 * rng, 1e-6 * max(abs(lo), abs(hi), 1.0), 1e-12)
        if rng > 0:
            config.coord_max_period = 2.0 * rng
            config.coord_min_period = float(np.min(gaps)) if len(gaps) else rng
            config.coord_min_period = max(config.coord_min_period, rng * 1e-6)
        else:
            config.coord_max_period = config.coord_min_period = max(abs(lo), 1.0)
    for name in ("time_min_period", "time_max_period", "coord_min_period", "coord_max_period"):
        if not math.isfinite(getattr(config, name)) or getattr(config, name) <= 0:
            raise ValueError(f"bad data statistic {name}={getattr(config, name)}")
    return config
