"""The held-out evaluation protocol: the model against five baselines on exactly the same hidden elements.

A *protocol* decides, per record of a split, which elements are hidden from the encoder and must be predicted:

``holdout`` (or ``holdout:FRACTION``)
    a fixed fraction (default 30 %, rounded per record, at least one hidden and one kept) of every record's
    elements, drawn by :func:`datasets.loader.plan_masks` in its ``holdout`` mode only. Records of a single
    element hide nothing and are not scored.
``modality:NAME``
    every element of modality ``NAME`` (e.g. PhysioNet ``labs`` from ``vitals`` + ``static``; DESI
    ``spectrum`` from ``photometry``), in the records that have that modality *and* at least one other; the
    other records are not scored.

The plan of a split is a function of (``seed``, split name, the records evaluated) only: the same seed gives
the same hidden elements on every run. The model (:func:`perceiver.inference.predict`, length-aware batches
of :func:`datasets.loader.token_batches` with ``shuffle=False``) and the baselines of
:mod:`perceiver.baselines` predict the same hidden elements from the same visible ones (:data:`METHODS`; what
each one sees is written into the result, :attr:`ProtocolResult.evidence`):

``channel_mean``
    the channel's mean over the train split;
``per_record_mean``
    the mean of the record's visible values of the channel (the channel mean where none is visible);
``forward_fill`` / ``linear_interpolation``
    from the record's visible elements of the same channel, in time (along wavelength for spectra);
``gradient_boost``
    a ``HistGradientBoostingRegressor`` trained on the *train* split's hidden elements under the same protocol
    (the seeded plan of split ``train``, at most ``gradient_boost_elements`` of them, a seeded subsample) with
    the decoder's evidence about a query and nothing else (:func:`perceiver.baselines.neighbour_features`). A
    seeded :data:`RESERVE_FRACTION` of the train records is left out of its training (see below).

Scoring is in normalised units (``z = (T(v) - location) / scale``, :mod:`datasets.normalise`) with the
formulas of :class:`perceiver.objective.Metrics`: MSE and MAE of the mean, Gaussian NLL of
``N(mu, sigma^2 + e^2)`` (``e`` the normalised measurement error, unknown = 0) and the fraction of hidden
elements inside its 68.27 % / 95.45 % central intervals, per channel, per modality and overall.

The baselines have no uncertainty of their own. Each gets one constant ``sigma`` per channel, fitted by
maximum likelihood on hidden elements of another split than the one scored (same protocol and seed;
:data:`SIGMA_SPLIT`): scoring the *test* split (the default, for reporting), sigma is fitted on the
*validation* split; scoring the *validation* split (``percival evaluate --split val``, for choosing a model or
its settings without looking at test), sigma is fitted on the *train* split instead — on its reserved records
only, those the gradient-boost baseline was not trained on, so that no baseline's interval is fitted on its
own training residuals. Either way no scored element informs its own interval, and no test element is used
when val is scored. The model's ``sigma`` is its own prediction, with the measurement error added in
quadrature exactly as in the training objective.

From a notebook::

    from perceiver.checkpoint import load
    from perceiver.evaluation import evaluate_protocol, train_channel_means
    from datasets.store import open_store

    store = open_store("physionet.zarr")
    model, config = load("runs/physionet")
    means = train_channel_means(store)
    result = evaluate_protocol(store, model, config, "modality:labs", seed=0, means=means)
    result.table()                     # rows: METHODS (model and the five baselines)
    result.evidence                    # method -> what it sees
    evaluate_protocol(store, model, config, "holdout", score_split="val")   # choose on val, sigma from train
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from datasets.loader.batches import Batch, ElementDataset, segment_ids, token_batches
from datasets.loader.masking import MaskingConfig, plan_masks
from datasets.normalise import normalise
from datasets.store.reader import Store, open_store
from perceiver.baselines import GRADIENT_BOOST_MAX_ELEMENTS, GradientBoost, fit_gradient_boost, predict_baseline
from perceiver.config import RunConfig
from perceiver.inference import masked_batch, predict_hidden  # noqa: F401  (masked_batch: used by plots, notebooks)
from perceiver.model import ModelOutput, Percival
from perceiver.objective import Metrics

#: the methods compared, in table order
METHODS = ("model", "channel_mean", "per_record_mean", "forward_fill", "linear_interpolation", "gradient_boost")
BASELINE_METHODS = METHODS[1:]
#: the split used to fit the baselines' constant sigma, and the split scored (by default)
FIT_SPLIT, SCORE_SPLIT = "val", "test"
#: per scored split, the split the baselines' constant sigma is fitted on (never the scored one)
SIGMA_SPLIT = {"test": "val", "val": "train"}
#: fraction of the train split's records (seeded) the gradient-boost baseline is not trained on; the baselines'
#: sigma is fitted on their hidden elements when the validation split is scored
RESERVE_FRACTION = 0.1
#: what each method sees (the gradient-boost line is completed with its training data)
EVIDENCE = {
    "model": "the record's visible elements (encoder, and the decoder's features of them) and each hidden "
             "element's time, channel and coord (its query); trained on the train split",
    "channel_mean": "train-split mean of the channel (nothing of the record)",
    "per_record_mean": "mean of the record's visible values of the same channel (train-split channel mean where "
                       "the record has none visible)",
    "forward_fill": "the record's last visible value of the same channel at or before the element's time (along "
                    "wavelength for spectra); train-split channel mean where none, and for static elements",
    "linear_interpolation": "linear interpolation between the record's visible neighbours of the same channel in "
                            "time (along wavelength for spectra), constant beyond them; train-split channel mean "
                            "where none, and for static elements",
}
#: each split's stream of the seeded generator (the plan of a split never depends on another split)
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
#: central-interval levels of the calibration curve
CALIBRATION_LEVELS = tuple(sorted({*np.round(np.arange(0.05, 1.0, 0.05), 2).tolist(), 0.6827, 0.9545, 0.99}))
#: floor on a fitted constant sigma (normalised units; the model's default ``min_sigma``)
SIGMA_FLOOR = 1e-3
METRIC_COLUMNS = ("mse", "mae", "nll", "coverage68", "coverage95", "n")


# ---------------------------------------------------------------------------------------------------------
# protocols and the hidden-element plan
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    """``kind`` is ``holdout`` (hide ``fraction`` of every record's elements) or ``modality`` (hide
    ``modality`` in the records that have it and another modality)."""

    kind: str
    modality: str | None = None
    fraction: float = 0.3

    @classmethod
    def parse(cls, spec: str | Protocol) -> Protocol:
        """``"holdout"``, ``"holdout:0.3"`` or ``"modality:NAME"``."""
        if isinstance(spec, Protocol):
            return spec
        kind, _, arg = str(spec).partition(":")
        if kind == "holdout":
            fraction = float(arg) if arg else 0.3
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"holdout fraction must be in (0, 1), got {spec!r}")
            return cls("holdout", None, fraction)
        if kind == "modality" and arg:
            return cls("modality", arg)
        raise ValueError(f"unknown protocol {spec!r}: use 'holdout', 'holdout:FRACTION' or 'modality:NAME'")

    @property
    def name(self) -> str:
        if self.kind == "modality":
            return f"modality:{self.modality}"
        return "holdout" if self.fraction == 0.3 else f"holdout:{self.fraction:g}"

    @property
    def slug(self) -> str:
        """A file-name and artifact-key friendly name (lowercase letters, digits, dashes)."""
        text = self.name.replace(":", "-").replace(".", "p").lower()
        return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in text)

    def describe(self) -> str:
        if self.kind == "modality":
            return (f"all `{self.modality}` elements hidden, in records that have `{self.modality}` and at least "
                    "one other modality")
        return f"{self.fraction:.0%} of each record's elements hidden at random (rounded per record)"


def hidden_elements(offsets: np.ndarray, modality: np.ndarray, time: np.ndarray, protocol: Protocol | str,
                    modalities: list[str], rng: np.random.Generator) -> np.ndarray:
    """Boolean per packed element: hidden from the encoder and scored.

    ``offsets`` (B+1), element ``modality`` (index into ``modalities``) and ``time`` describe packed records.
    ``holdout`` uses :func:`~datasets.loader.plan_masks` with its hold-out mode only (``round(fraction * n)``
    elements per record, at least one hidden and one kept; a one-element record hides nothing). ``modality``
    hides the named modality where the record also has another one; ``rng`` is not used there.
    """
    protocol = Protocol.parse(protocol)
    offsets = np.asarray(offsets, np.int64)
    modality = np.asarray(modality, np.int64)
    if protocol.kind == "holdout":
        config = MaskingConfig(holdout=protocol.fraction, modality_dropout=0.0, forecast=0.0, autoencode=0.0)
        plan = plan_masks(offsets, modality, time, rng, config)
        return ~plan.visible
    if protocol.modality not in modalities:
        raise ValueError(f"protocol {protocol.name!r}: no modality {protocol.modality!r} (have {modalities})")
    m = modalities.index(protocol.modality)
    n_rec = len(offsets) - 1
    record = segment_ids(offsets)
    is_m = modality == m
    has_m = np.bincount(record[is_m], minlength=n_rec) > 0
    has_other = np.bincount(record[~is_m], minlength=n_rec) > 0
    return is_m & (has_m & has_other)[record]


def load_split(store: Store, split: str, modalities: list[str] | None = None, max_records: int | None = None
               ) -> ElementDataset:
    """The records of ``split`` (the first ``max_records`` in store order), normalised, as an ElementDataset."""
    positions = np.flatnonzero(store.records["split"].astype(str).to_numpy() == split)
    if max_records is not None:
        positions = positions[:max_records]
    return ElementDataset(store.take(positions), store.channels, split=None, modalities=modalities)


def split_plan(ds: ElementDataset, protocol: Protocol | str, seed: int, split: str) -> np.ndarray:
    """The hidden elements of a split's dataset (packed dataset order) for ``protocol`` and ``seed``."""
    rng = np.random.default_rng([seed, SPLIT_STREAM.get(split, 99)])
    return hidden_elements(ds.offsets, ds.modality, ds.time, protocol, ds.modalities, rng)


# ---------------------------------------------------------------------------------------------------------
# predictions on the hidden elements
# ---------------------------------------------------------------------------------------------------------

def hidden_counts(ds: ElementDataset, hidden: np.ndarray) -> np.ndarray:
    """Hidden elements per record of the dataset."""
    return np.bincount(segment_ids(ds.offsets)[hidden], minlength=len(ds)).astype(np.int64)


def model_predictions(model: Percival, ds: ElementDataset, hidden: np.ndarray, batch_tokens: int = 8192,
                      max_records: int | None = 64, record_cost: int = 32, dtype: torch.dtype | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The model's mean and sigma (normalised) for the hidden elements, in packed dataset order
    (aligned with ``np.flatnonzero(hidden)``). Only records with hidden elements are run, in length-aware
    batches (:func:`~datasets.loader.token_batches`, ``shuffle=False``); every other element is visible."""
    n_hidden = int(hidden.sum())
    mean, sigma = np.full(n_hidden, np.nan), np.full(n_hidden, np.nan)
    counts = hidden_counts(ds, hidden)
    records = np.flatnonzero(counts > 0)
    if not len(records):
        return mean, sigma
    position = np.cumsum(hidden) - 1  # index of each hidden element among the hidden ones
    batches = token_batches(ds.lengths[records], batch_tokens, max_records, shuffle=False, record_cost=record_cost)
    for b in batches:
        q, pred = predict_hidden(model, ds, records[b], hidden, dtype)
        mean[position[q]] = pred.mean.numpy()
        sigma[position[q]] = pred.sigma.numpy()
    return mean, sigma


def baseline_predictions(ds: ElementDataset, hidden: np.ndarray, means: np.ndarray,
                         gradient_boost: GradientBoost | None = None, visible: np.ndarray | None = None
                         ) -> dict[str, np.ndarray]:
    """Each baseline's prediction (normalised) for the hidden elements from the visible ones (``~hidden``
    unless ``visible`` is given), aligned with ``np.flatnonzero(hidden)``. ``means`` is the train-split mean
    normalised value per channel; ``gradient_boost`` the fitted gradient-boost baseline (without it that
    baseline is left out)."""
    time = ds.time.astype(np.float64)
    visible = ~hidden if visible is None else visible & ~hidden
    return {name: np.asarray(predict_baseline(name, ds.offsets, time, ds.channel, ds.value, visible, hidden,
                                              np.asarray(means, np.float64), coord=ds.coord,
                                              gradient_boost=gradient_boost), np.float64)
            for name in BASELINE_METHODS if name != "gradient_boost" or gradient_boost is not None}


def reserved_records(n_records: int, seed: int, fraction: float = RESERVE_FRACTION) -> np.ndarray:
    """Boolean per train record (dataset order): held out of the gradient-boost fit. A seeded
    ``round(fraction * n)`` of them (at least one where there are two or more records)."""
    out = np.zeros(n_records, bool)
    if n_records >= 2 and fraction > 0:
        k = min(max(int(round(fraction * n_records)), 1), n_records - 1)
        out[np.random.default_rng([seed, SPLIT_STREAM["train"], 1]).permutation(n_records)[:k]] = True
    return out


def train_gradient_boost(train: ElementDataset, hidden: np.ndarray, means: np.ndarray, seed: int = 0,
                         reserved: np.ndarray | None = None, max_elements: int | None = GRADIENT_BOOST_MAX_ELEMENTS,
                         **params) -> GradientBoost:
    """The gradient-boost baseline trained on the train split's ``hidden`` elements (its protocol plan,
    :func:`split_plan` with split ``train``), from its visible ones, leaving out the ``reserved`` records
    (boolean per record; :func:`reserved_records` when None). ``params``: HistGradientBoostingRegressor
    settings (:data:`perceiver.baselines.GRADIENT_BOOST_PARAMS`)."""
    if reserved is None:
        reserved = reserved_records(len(train), seed)
    target = hidden & ~np.asarray(reserved, bool)[segment_ids(train.offsets)]
    return fit_gradient_boost(train.offsets, train.time.astype(np.float64), train.channel, train.coord,
                              train.value, ~hidden, target, means, train.channel_modality,
                              max_elements=max_elements, seed=seed, **params)


def train_channel_means(store: Store | str, records_per_chunk: int = 10_000) -> np.ndarray:
    """Mean normalised value per channel over the train split (0 = the normalised location where a channel
    has no train element), read chunk by chunk."""
    store = open_store(store) if isinstance(store, str) else store
    channels = store.channels
    n = len(channels)
    sums, counts = np.zeros(n), np.zeros(n)
    for chunk in store.iter_chunks(records_per_chunk):
        train = np.repeat(chunk.records["split"].astype(str).to_numpy() == "train", chunk.row_size)
        if not train.any():
            continue
        ch = chunk.channel[train].astype(np.int64)
        z, _ = normalise(chunk.value[train], chunk.error[train], ch, channels)
        sums += np.bincount(ch, weights=z.astype(np.float64), minlength=n)
        counts += np.bincount(ch, minlength=n)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


# ---------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------

def fit_constant_sigma(residual: np.ndarray, error: np.ndarray, channel: np.ndarray, n_channels: int,
                       floor: float = SIGMA_FLOOR, iterations: int = 100) -> np.ndarray:
    """Maximum-likelihood constant sigma per channel for residuals ``r ~ N(0, sigma^2 + e^2)``.

    With no measurement errors this is the RMS residual of the channel; with errors it is found by Fisher
    scoring on ``s = sigma^2`` (vectorised over channels). Channels without residuals get the value fitted on
    all residuals pooled; with no residuals at all, 1 (the train-split spread). Result is at least ``floor``.
    """
    r2 = np.asarray(residual, np.float64) ** 2
    e2 = np.nan_to_num(np.asarray(error, np.float64), nan=0.0) ** 2
    channel = np.asarray(channel, np.int64)

    def fit(group: np.ndarray, n_groups: int) -> np.ndarray:
        count = np.bincount(group, minlength=n_groups)
        s = np.maximum(np.bincount(group, weights=r2 - e2, minlength=n_groups) / np.maximum(count, 1), floor**2)
        for _ in range(iterations):
            v = s[group] + e2
            score = np.bincount(group, weights=(r2 - v) / v**2, minlength=n_groups)
            info = np.bincount(group, weights=1.0 / v**2, minlength=n_groups)
            step = np.divide(score, info, out=np.zeros(n_groups), where=info > 0)
            new = np.maximum(s + step, floor**2)
            if np.allclose(new, s, rtol=1e-10, atol=0.0):
                s = new
                break
            s = new
        return np.where(count > 0, np.sqrt(s), np.nan)

    if len(r2) == 0:
        return np.ones(n_channels)
    per_channel = fit(channel, n_channels)
    pooled = float(fit(np.zeros(len(r2), np.int64), 1)[0])
    return np.where(np.isnan(per_channel), pooled, per_channel)


def update_metrics(metrics: Metrics, value: np.ndarray, error: np.ndarray, channel: np.ndarray,
                   mean: np.ndarray, sigma: np.ndarray) -> Metrics:
    """Feed flat arrays (normalised value, error, channel; predicted mean and sigma) to
    :meth:`perceiver.objective.Metrics.update`, so that every method is scored by the objective's formulas."""
    n = len(value)
    t = torch.from_numpy
    channel = np.asarray(channel, np.int64)
    modality = np.asarray(metrics.channel_modality, np.int64)[channel] if n else np.zeros(0, np.int64)
    batch = Batch(offsets=torch.tensor([0, n], dtype=torch.int64), time=torch.zeros(n),
                  channel=t(channel.copy()), modality=t(modality),
                  value=t(np.asarray(value, np.float32).copy()), error=t(np.asarray(error, np.float32).copy()),
                  coord=torch.full((n,), math.nan), visible=torch.zeros(n, dtype=torch.bool),
                  target=torch.ones(n, dtype=torch.bool), record_index=torch.zeros(1, dtype=torch.int64),
                  element_index=torch.arange(n), t_ref=torch.zeros(1, dtype=torch.float64))
    output = ModelOutput(mean=t(np.asarray(mean, np.float32).copy()),
                         log_sigma=torch.log(t(np.asarray(sigma, np.float64).copy())).float(),
                         latents=torch.zeros(0), target_offsets=torch.tensor([0, n], dtype=torch.int64))
    metrics.update(output, batch)
    return metrics


def score(value: np.ndarray, error: np.ndarray, channel: np.ndarray, mean: np.ndarray, sigma: np.ndarray,
          channel_names: list[str], channel_modality: list[int], modalities: list[str]) -> dict:
    """:meth:`Metrics.summary` (overall / per modality / per channel: n, mse, mae, nll, coverage68,
    coverage95) of predictions ``mean``, ``sigma`` for the normalised ``value`` (error ``error``)."""
    metrics = Metrics(list(channel_names), list(channel_modality), list(modalities))
    return update_metrics(metrics, value, error, channel, mean, sigma).summary()


def coverage_curve(value: np.ndarray, error: np.ndarray, mean: np.ndarray, sigma: np.ndarray,
                   levels=CALIBRATION_LEVELS) -> np.ndarray:
    """Observed fraction of values inside the central interval of ``N(mean, sigma^2 + e^2)`` at each nominal
    ``level`` (a calibrated predictor gives ``levels`` back)."""
    var = np.asarray(sigma, np.float64) ** 2 + np.nan_to_num(np.asarray(error, np.float64), nan=0.0) ** 2
    z = np.abs(np.asarray(value, np.float64) - np.asarray(mean, np.float64)) / np.sqrt(var)
    if len(z) == 0:
        return np.full(len(levels), np.nan)
    # smallest central level whose interval contains the value: erf(|z| / sqrt(2))
    needed = np.sort(torch.special.erf(torch.from_numpy(z / math.sqrt(2.0))).numpy())
    return np.searchsorted(needed, np.asarray(levels, np.float64), side="right") / len(z)


# ---------------------------------------------------------------------------------------------------------
# one protocol, end to end
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ProtocolResult:
    """The outcome of one protocol: per method, :meth:`Metrics.summary` on the scored split; the baselines'
    fitted sigma per channel; counts; the calibration curves."""

    protocol: str
    description: str
    seed: int
    fit_split: str
    score_split: str
    metrics: dict[str, dict]
    baseline_sigma: dict[str, dict[str, float]]
    sigma_source: str
    n_records: int
    n_elements: int
    n_fit_records: int
    n_fit_elements: int
    levels: list[float]
    calibration: dict[str, list[float]]
    channel_units: dict[str, str] = field(default_factory=dict)
    #: method -> one line: what it sees (and, for gradient_boost, what it was trained on)
    evidence: dict[str, str] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The methods of :data:`METHODS` this result has (older results lack the newer baselines)."""
        return [m for m in METHODS if m in self.metrics]

    def table(self, level: str = "overall", key: str | None = None) -> pd.DataFrame:
        """One row per method: mse, mae, nll, coverage68, coverage95, n, and ``mse_vs_linear`` (the MSE
        divided by the linear interpolation's). ``level`` is ``overall``, ``modality`` or ``channel`` (then
        ``key`` names which)."""
        rows = {}
        for method in self.methods:
            m = self.metrics[method].get(level, {})
            m = m if level == "overall" else m.get(key, {"n": 0})
            rows[method] = {c: m.get(c, np.nan) for c in METRIC_COLUMNS}
        df = pd.DataFrame.from_dict(rows, orient="index")
        df["n"] = df["n"].fillna(0).astype(int)
        ref = df.loc["linear_interpolation", "mse"]
        df["mse_vs_linear"] = df["mse"] / ref if ref and np.isfinite(ref) and ref > 0 else np.nan
        return df

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProtocolResult:
        return cls(**data)


def check_model_matches_store(config: RunConfig, store: Store) -> None:
    names = [str(x) for x in store.channels["name"]]
    if list(config.model.channel_names) != names:
        raise ValueError(f"{store.url}: the channel table does not match the checkpoint's channels")


def evaluate_protocol(store: Store | str, model: Percival, config: RunConfig, protocol: Protocol | str,
                      seed: int = 0, max_records: int | None = None, means: np.ndarray | None = None,
                      fit_split: str | None = None, score_split: str = SCORE_SPLIT,
                      dtype: torch.dtype | None = None,
                      gradient_boost_elements: int | None = GRADIENT_BOOST_MAX_ELEMENTS,
                      gradient_boost_params: dict | None = None) -> ProtocolResult:
    """Run ``protocol`` on ``store``: train the gradient-boost baseline on the train split, fit the baselines'
    sigma on ``fit_split`` (by default :data:`SIGMA_SPLIT` of the scored split: ``val`` when scoring ``test``,
    the reserved train records when scoring ``val``), score everything on ``score_split`` (the first
    ``max_records`` records of each split). ``means``: train-split channel means (computed with
    :func:`train_channel_means` when None). ``gradient_boost_elements``: at most this many train elements
    train the gradient-boost baseline; ``gradient_boost_params`` override its regressor settings."""
    store = open_store(store) if isinstance(store, str) else store
    protocol = Protocol.parse(protocol)
    check_model_matches_store(config, store)
    fit_split = SIGMA_SPLIT.get(score_split, FIT_SPLIT) if fit_split is None else fit_split
    if fit_split == score_split:
        raise ValueError(f"the baselines' sigma cannot be fitted on the split it is scored on ({score_split!r})")
    if score_split == "train":
        raise ValueError("scoring the train split is not an evaluation (the gradient-boost baseline trains there)")
    mc, tc = config.model, config.train
    channel_names, n_channels = list(mc.channel_names), len(mc.channel_names)
    if means is None:
        means = train_channel_means(store)
    means = np.asarray(means, np.float64)
    batching = dict(batch_tokens=tc.batch_tokens, max_records=tc.max_records, record_cost=tc.record_cost,
                    dtype=dtype)

    # the gradient-boost baseline: trained on the train split's plan, its reserved records left out
    train = load_split(store, "train", mc.modalities, max_records)
    train_hidden = split_plan(train, protocol, seed, "train")
    reserved = reserved_records(len(train), seed)
    gb = train_gradient_boost(train, train_hidden, means, seed, reserved, gradient_boost_elements,
                              **(gradient_boost_params or {}))

    # the baselines' constant sigma: residuals on the fit split's hidden elements
    if fit_split == "train":  # only the reserved records: the gradient boost was not trained on them
        fit_ds, fit_hidden = train, train_hidden & reserved[segment_ids(train.offsets)]
        fit_visible, where = ~train_hidden, "train-split records held out of the gradient-boost fit"
    else:
        fit_ds = load_split(store, fit_split, mc.modalities, max_records)
        fit_hidden, fit_visible = split_plan(fit_ds, protocol, seed, fit_split), None
        where = f"{fit_split}-split records"
    del train, train_hidden
    baseline_sigma = {name: np.ones(n_channels) for name in BASELINE_METHODS}
    n_fit = int((hidden_counts(fit_ds, fit_hidden) > 0).sum())
    if fit_hidden.any():
        sel = np.flatnonzero(fit_hidden)
        for name, pred in baseline_predictions(fit_ds, fit_hidden, means, gb, fit_visible).items():
            baseline_sigma[name] = fit_constant_sigma(fit_ds.value[sel] - pred, fit_ds.error[sel],
                                                      fit_ds.channel[sel], n_channels)
        sigma_source = (f"one constant σ per channel, fitted by maximum likelihood on the {int(fit_hidden.sum()):,} "
                        f"hidden elements of {n_fit:,} {where} (same protocol and seed; pooled over channels for "
                        "a channel with none there)")
    else:
        sigma_source = f"σ = 1 (the {where} have no hidden elements to fit on)"
    n_fit_elements = int(fit_hidden.sum())
    del fit_ds, fit_hidden

    # score
    ds = load_split(store, score_split, mc.modalities, max_records)
    hidden = split_plan(ds, protocol, seed, score_split)
    sel = np.flatnonzero(hidden)
    value, error, channel = ds.value[sel], ds.error[sel], ds.channel[sel]
    preds = {"model": model_predictions(model, ds, hidden, **batching)}
    for name, pred in baseline_predictions(ds, hidden, means, gb).items():
        preds[name] = (pred, baseline_sigma[name][channel])
    metrics, calibration = {}, {}
    for name in METHODS:
        mean, sigma = preds[name]
        metrics[name] = score(value, error, channel, mean, sigma, channel_names, mc.channel_modality,
                              mc.modalities)
        calibration[name] = coverage_curve(value, error, mean, sigma).tolist()
    units = dict(zip(channel_names, store.channels["unit"].astype(str), strict=True))
    evidence = {**EVIDENCE, "gradient_boost": f"{gb.describe('train')}; {int(reserved.sum()):,} train records "
                                              "held out of its training"}
    return ProtocolResult(
        protocol=protocol.name, description=protocol.describe(), seed=seed, fit_split=fit_split,
        score_split=score_split, metrics=metrics,
        baseline_sigma={k: dict(zip(channel_names, map(float, v), strict=True)) for k, v in baseline_sigma.items()},
        sigma_source=sigma_source, n_records=int((hidden_counts(ds, hidden) > 0).sum()), n_elements=len(sel),
        n_fit_records=n_fit, n_fit_elements=n_fit_elements, levels=list(CALIBRATION_LEVELS),
        calibration=calibration, channel_units=units, evidence={m: evidence[m] for m in METHODS})


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------

#: the per-channel MSE table's columns (method -> heading)
PER_CHANNEL_COLUMNS = {"model": "model", "linear_interpolation": "lin. interp.", "forward_fill": "fwd fill",
                       "per_record_mean": "record mean", "channel_mean": "channel mean",
                       "gradient_boost": "grad. boost"}


def _fmt(x) -> str:
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"


def markdown_table(df: pd.DataFrame) -> str:
    """A results table (rows: methods) as GitHub Markdown."""
    cols = {"mse": "MSE", "mae": "MAE", "nll": "NLL", "coverage68": "cov68", "coverage95": "cov95", "n": "n",
            "mse_vs_linear": "MSE / lin. interp."}
    lines = ["| method | " + " | ".join(cols.values()) + " |", "|---|" + "---:|" * len(cols)]
    for method, row in df.iterrows():
        lines.append(f"| {method} | " + " | ".join(_fmt(int(row[c]) if c == "n" else row[c]) for c in cols) + " |")
    return "\n".join(lines)


def table_rows(results: list[ProtocolResult]) -> list[dict]:
    """Flat rows (protocol, method, metrics) for a table artifact or a CSV."""
    rows = []
    for r in results:
        df = r.table()
        for method, row in df.iterrows():
            rows.append({"protocol": r.protocol, "method": method,
                         **{c: (None if not np.isfinite(row[c]) else round(float(row[c]), 6))
                            for c in (*METRIC_COLUMNS[:-1], "mse_vs_linear")},
                         "n": int(row["n"])})
    return rows


def report_markdown(results: list[ProtocolResult], store: str = "", checkpoint: str = "",
                    plots: dict[str, list[str]] | None = None, embed: bool = True) -> str:
    """The evaluation report: per protocol, the overall table (caption says how it was scored), the
    per-modality tables, a per-channel MSE table, and the plots (``plots``: protocol -> file names, shown as
    images when ``embed``, else listed)."""
    out = ["# Evaluation", ""]
    if store or checkpoint:
        out += [f"Store `{store}`, checkpoint `{checkpoint}`.", ""]
    out += ["All numbers are in normalised units, z = (T(v) − location) / scale with the channel table's "
            "train-split statistics (location the median, scale the standard deviation after clipping to the "
            "0.1–99.9 % quantiles), so 1 ≈ one train-split standard deviation of the channel. NLL and coverage use "
            "N(μ, σ² + e²) with e the normalised measurement error (unknown = 0); a calibrated predictor covers "
            "0.683 and 0.954. `MSE / lin. interp.` is each method's MSE divided by linear interpolation's.", ""]
    if any(r.score_split == "val" for r in results):
        out += ["**Validation split scored** (`--split val`: for choosing models and settings; report the test "
                "split). The baselines' σ is fitted on train-split records the gradient-boost baseline was not "
                "trained on.", ""]
    for r in results:
        out += [f"## Protocol `{r.protocol}`", "",
                f"{r.description}; seed {r.seed}. Scored on {r.n_elements:,} hidden elements of "
                f"{r.n_records:,} {r.score_split}-split records — exactly the same elements for the model and "
                f"every baseline. Model σ: its own prediction. Baseline σ: {r.sigma_source}; then scored on the "
                f"{r.score_split} split.", ""]
        evidence = r.evidence or {m: EVIDENCE[m] for m in r.methods if m in EVIDENCE}
        if evidence:
            out += ["What each method sees:", ""]
            out += [f"- `{m}`: {evidence[m]}" for m in r.methods if m in evidence]
            out += [""]
        if r.n_elements == 0:
            out += ["No record of this split qualifies: nothing to score.", ""]
            continue
        out += [markdown_table(r.table()), ""]
        modalities = list(r.metrics["model"].get("modality", {}))
        if len(modalities) > 1:
            for m in modalities:
                out += [f"**{m}**", "", markdown_table(r.table("modality", m)), ""]
        channels = r.metrics["model"].get("channel", {})
        if channels:
            shown = [m for m in PER_CHANNEL_COLUMNS if m in r.metrics]
            heads = [PER_CHANNEL_COLUMNS[m] for m in shown]
            out += [f"<details><summary>Per channel (MSE: {' / '.join(heads)}; n)</summary>", "",
                    "| channel | " + " | ".join(heads) + " | n |", "|---|" + "---:|" * (len(shown) + 1)]
            for c, m in channels.items():
                mse = [_fmt(r.metrics[k].get("channel", {}).get(c, {}).get("mse")) for k in shown]
                out.append(f"| {c} | " + " | ".join(mse) + f" | {m['n']:,} |")
            out += ["", "</details>", ""]
        paths = (plots or {}).get(r.protocol, [])
        if embed:
            out += [line for path in paths for line in (f"![{path}]({path})", "")]
        elif paths:
            out += ["Plots: " + ", ".join(paths), ""]
    return "\n".join(out)
