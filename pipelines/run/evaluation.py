"""The held-out evaluation protocol: the model against five baselines on exactly the same hidden elements.

A protocol (:mod:`pipelines.run.protocols`: ``holdout``, ``holdout:FRACTION``, ``modality:NAME``) decides, per
record of a split, which elements are hidden from the encoder and must be predicted; the plan of a split is a
function of (``seed``, split name, the records evaluated) only. The model
(:func:`pipelines.run.inference.predict`, length-aware batches of :func:`datasets.loader.token_batches` with
``shuffle=False``) and the baselines of
:mod:`pipelines.run.baselines` predict the same hidden elements from the same visible ones (:data:`METHODS`; what
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
    the decoder's evidence about a query and nothing else (:func:`pipelines.run.baselines.neighbour_features`). A
    seeded :data:`RESERVE_FRACTION` of the train records is left out of its training (see below).

Scoring is in normalised units (``z = (T(v) - location) / scale``, :mod:`datasets.normalise`) with the
formulas of :class:`perceiver.Metrics`: MSE and MAE of the mean, Gaussian NLL of
``N(mu, sigma^2 + e^2)`` (``e`` the normalised measurement error, unknown = 0) and the fraction of hidden
elements inside its 68.27 % / 95 % central intervals (the 95 % one is a reconstruction's ``lower95`` / ``upper95``),
per channel, per modality and overall.

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

    from datasets.store import open_store
    from pipelines.run.config import load_run
    from pipelines.run.evaluation import evaluate_protocol, train_channel_means

    store = open_store("physionet.zarr")
    model, config = load_run("runs/physionet")
    means = train_channel_means(store, model.config.contract)
    result = evaluate_protocol(store, model, config, "modality:labs", seed=0, means=means)
    result.table()                     # rows: METHODS (model and the five baselines)
    result.evidence                    # method -> what it sees
    evaluate_protocol(store, model, config, "holdout", score_split="val")   # choose on val, sigma from train
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from datasets.loader import ElementDataset, match_channels, token_batches
from datasets.normalise import normalise
from datasets.store.reader import Store, open_store
from perceiver.metrics import Metrics
from perceiver.model import Percival
from perceiver.packing import segment_ids
from pipelines.progress import progress
from pipelines.run.baselines import GRADIENT_BOOST_MAX_ELEMENTS, GradientBoost, fit_gradient_boost, predict_baseline
from pipelines.run.config import RunConfig
from pipelines.run.inference import predict_hidden
from pipelines.run.protocols import SPLIT_STREAM, Protocol, hidden_counts, load_split, split_plan
from pipelines.run.scores import SAMPLE_LEVELS, crps_gaussian, crps_samples, energy_score, sample_coverage

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
#: central-interval levels of the calibration curve
CALIBRATION_LEVELS = tuple(sorted({*np.round(np.arange(0.05, 1.0, 0.05), 2).tolist(), 0.6827, 0.9545, 0.99}))
#: floor on a fitted constant sigma (normalised units; the model's default ``min_sigma``)
SIGMA_FLOOR = 1e-3
METRIC_COLUMNS = ("mse", "mae", "nll", "coverage68", "coverage95", "n")
#: draws per hidden element for the model's sample scores (CRPS, energy score, sample coverage)
DEFAULT_SAMPLES = 16


# ---------------------------------------------------------------------------------------------------------
# predictions on the hidden elements
# ---------------------------------------------------------------------------------------------------------

def model_predictions(model: Percival, ds: ElementDataset, hidden: np.ndarray, batch_tokens: int = 8192,
                      max_records: int | None = 64, record_cost: int = 32, dtype: torch.dtype | None = None,
                      n_samples: int = 0, seed: int = 0, logger: Any = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The model's mean and sigma (normalised) for the hidden elements, in packed dataset order
    (aligned with ``np.flatnonzero(hidden)``), and ``n_samples`` draws of each (K, n_hidden; None for 0).
    Only records with hidden elements are run, in length-aware batches (:func:`~datasets.loader.token_batches`,
    ``shuffle=False``); every other element is visible. Progress goes to ``logger`` where not on a terminal
    (:func:`pipelines.progress.progress`)."""
    n_hidden = int(hidden.sum())
    mean, sigma = np.full(n_hidden, np.nan), np.full(n_hidden, np.nan)
    samples = np.full((n_samples, n_hidden), np.nan, np.float32) if n_samples else None
    counts = hidden_counts(ds, hidden)
    records = np.flatnonzero(counts > 0)
    if not len(records):
        return mean, sigma, samples
    position = np.cumsum(hidden) - 1  # index of each hidden element among the hidden ones
    batches = token_batches(ds.lengths[records], batch_tokens, max_records, shuffle=False, record_cost=record_cost)
    with progress(len(records), "record", "evaluate: model", logger) as bar:
        for i, b in enumerate(batches):
            q, pred = predict_hidden(model, ds, records[b], hidden, dtype, n_samples, seed=seed + i)
            mean[position[q]] = pred.mean.numpy()
            sigma[position[q]] = pred.sigma.numpy()
            if n_samples:
                samples[:, position[q]] = pred.samples.numpy()
            bar.update(len(b))
    return mean, sigma, samples


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
    settings (:data:`pipelines.run.baselines.GRADIENT_BOOST_PARAMS`)."""
    if reserved is None:
        reserved = reserved_records(len(train), seed)
    target = hidden & ~np.asarray(reserved, bool)[segment_ids(train.offsets)]
    return fit_gradient_boost(train.offsets, train.time.astype(np.float64), train.channel, train.coord,
                              train.value, ~hidden, target, means, train.channel_modality,
                              max_elements=max_elements, seed=seed, **params)


def train_channel_means(store: Store | str, contract, records_per_chunk: int = 10_000) -> np.ndarray:
    """Mean normalised value (with the model's ``contract``) per contract channel over the train split (0 = the
    normalised location where a channel has no train element), read chunk by chunk."""
    store = open_store(store) if isinstance(store, str) else store
    code = match_channels(contract, store.channels, store.url)
    n = contract.n_channels
    sums, counts = np.zeros(n), np.zeros(n)
    for chunk in store.iter_chunks(records_per_chunk):
        train = np.repeat(chunk.records["split"].astype(str).to_numpy() == "train", chunk.row_size)
        ch = code[chunk.channel.astype(np.int64)]
        train &= ch >= 0
        if not train.any():
            continue
        z, _ = normalise(chunk.value[train], chunk.error[train], ch[train], contract)
        sums += np.bincount(ch[train], weights=z.astype(np.float64), minlength=n)
        counts += np.bincount(ch[train], minlength=n)
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
    :meth:`perceiver.Metrics.update`, so that every method is scored by the same formulas."""
    t = torch.from_numpy
    metrics.update(t(np.asarray(mean, np.float32).copy()), torch.log(t(np.asarray(sigma, np.float64).copy())).float(),
                   t(np.asarray(value, np.float32).copy()), t(np.asarray(error, np.float32).copy()),
                   t(np.asarray(channel, np.int64).copy()))
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
    #: proper scores of the predictive distributions (:func:`distribution_scores`)
    distribution: dict = field(default_factory=dict)

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


def evaluate_protocol(store: Store | str, model: Percival, config: RunConfig, protocol: Protocol | str,
                      seed: int = 0, max_records: int | None = None, means: np.ndarray | None = None,
                      fit_split: str | None = None, score_split: str = SCORE_SPLIT,
                      dtype: torch.dtype | None = None,
                      gradient_boost_elements: int | None = GRADIENT_BOOST_MAX_ELEMENTS,
                      gradient_boost_params: dict | None = None, n_samples: int = DEFAULT_SAMPLES,
                      logger: Any = None) -> ProtocolResult:
    """Run ``protocol`` on ``store``: train the gradient-boost baseline on the train split, fit the baselines'
    sigma on ``fit_split`` (by default :data:`SIGMA_SPLIT` of the scored split: ``val`` when scoring ``test``,
    the reserved train records when scoring ``val``), score everything on ``score_split`` (the first
    ``max_records`` records of each split). ``means``: train-split channel means (computed with
    :func:`train_channel_means` when None). ``gradient_boost_elements``: at most this many train elements
    train the gradient-boost baseline; ``gradient_boost_params`` override its regressor settings. ``n_samples``
    draws per hidden element score the model's joint distribution (:func:`distribution_scores`; 0: only the
    Gaussian closed forms). ``logger``: where progress goes when not on a terminal."""
    store = open_store(store) if isinstance(store, str) else store
    protocol = Protocol.parse(protocol)
    fit_split = SIGMA_SPLIT.get(score_split, FIT_SPLIT) if fit_split is None else fit_split
    if fit_split == score_split:
        raise ValueError(f"the baselines' sigma cannot be fitted on the split it is scored on ({score_split!r})")
    if score_split == "train":
        raise ValueError("scoring the train split is not an evaluation (the gradient-boost baseline trains there)")
    mc, tc = model.config, config.train
    channel_names, n_channels = list(mc.channel_names), len(mc.channel_names)
    if means is None:
        means = train_channel_means(store, mc.contract)
    means = np.asarray(means, np.float64)
    batching = dict(batch_tokens=tc.batch_tokens, max_records=tc.max_records, record_cost=tc.record_cost,
                    dtype=dtype)

    # the gradient-boost baseline: trained on the train split's plan, its reserved records left out
    train = load_split(store, "train", mc.contract, max_records)
    train_hidden = split_plan(train, protocol, seed, "train")
    reserved = reserved_records(len(train), seed)
    gb = train_gradient_boost(train, train_hidden, means, seed, reserved, gradient_boost_elements,
                              **(gradient_boost_params or {}))

    # the baselines' constant sigma: residuals on the fit split's hidden elements
    if fit_split == "train":  # only the reserved records: the gradient boost was not trained on them
        fit_ds, fit_hidden = train, train_hidden & reserved[segment_ids(train.offsets)]
        fit_visible, where = ~train_hidden, "train-split records held out of the gradient-boost fit"
    else:
        fit_ds = load_split(store, fit_split, mc.contract, max_records)
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
    ds = load_split(store, score_split, mc.contract, max_records)
    hidden = split_plan(ds, protocol, seed, score_split)
    if not hidden.any():
        why = (f"no {score_split}-split record has `{protocol.target}` and another {protocol.kind}"
               if protocol.kind != "holdout" else f"every {score_split}-split record has a single element")
        raise ValueError(f"protocol {protocol.name!r} would score nothing on {store.url}: {why}")
    sel = np.flatnonzero(hidden)
    value, error, channel = ds.value[sel], ds.error[sel], ds.channel[sel]
    *preds_model, samples = model_predictions(model, ds, hidden, n_samples=n_samples, seed=seed, logger=logger,
                                                **batching)
    preds = {"model": tuple(preds_model)}
    for name, pred in baseline_predictions(ds, hidden, means, gb).items():
        preds[name] = (pred, baseline_sigma[name][channel])
    metrics, calibration = {}, {}
    for name in METHODS:
        mean, sigma = preds[name]
        metrics[name] = score(value, error, channel, mean, sigma, channel_names, mc.channel_modality,
                              mc.modalities)
        calibration[name] = coverage_curve(value, error, mean, sigma).tolist()
    record = segment_ids(ds.offsets)[sel]
    distribution = distribution_scores(value, error, channel, record, len(ds), preds, samples,
                                       np.asarray(mc.channel_modality), mc.modalities, seed)
    units = {c.name: c.unit for c in mc.contract.channels}
    evidence = {**EVIDENCE, "gradient_boost": f"{gb.describe('train')}; {int(reserved.sum()):,} train records "
                                              "held out of its training"}
    return ProtocolResult(
        protocol=protocol.name, description=protocol.describe(), seed=seed, fit_split=fit_split,
        score_split=score_split, metrics=metrics,
        baseline_sigma={k: dict(zip(channel_names, map(float, v), strict=True)) for k, v in baseline_sigma.items()},
        sigma_source=sigma_source, n_records=int((hidden_counts(ds, hidden) > 0).sum()), n_elements=len(sel),
        n_fit_records=n_fit, n_fit_elements=n_fit_elements, levels=list(CALIBRATION_LEVELS),
        calibration=calibration, channel_units=units, evidence={m: evidence[m] for m in METHODS},
        distribution=distribution)


def distribution_scores(value: np.ndarray, error: np.ndarray, channel: np.ndarray, record: np.ndarray,
                        n_records: int, preds: dict[str, tuple], samples: np.ndarray | None,
                        channel_modality: np.ndarray, modalities: list[str], seed: int = 0) -> dict:
    """Proper scores (:mod:`pipelines.run.scores`) of every method's predictive distribution on the hidden
    elements: ``crps_gaussian`` (its mean and ``sqrt(sigma^2 + e^2)``; overall and per modality) for every
    method; for the model with ``samples`` (K, N) also the sample CRPS, the MSE of the draws' mean, the mean
    energy score per record, the same for K independent Gaussian draws from its own marginals (seeded), and
    the coverage of the samples' central 50 / 90 / 95 % intervals."""
    e2 = np.nan_to_num(np.asarray(error, np.float64), nan=0.0) ** 2
    modality = channel_modality[channel]

    def by_modality(x: np.ndarray) -> dict:
        return {"overall": float(np.mean(x)) if len(x) else float("nan"),
                "modality": {m: float(np.mean(x[modality == i])) for i, m in enumerate(modalities)
                             if (modality == i).any()}}

    out: dict = {"methods": {}}
    sds = {name: np.sqrt(np.asarray(sigma, np.float64) ** 2 + e2) for name, (_, sigma) in preds.items()}
    for name, (mean, _) in preds.items():
        out["methods"][name] = {"crps_gaussian": by_modality(crps_gaussian(value, mean, sds[name]))}
    if samples is not None and len(value):
        mean, sd = preds["model"][0], sds["model"]
        rng = np.random.default_rng([seed, 7])
        independent = mean + sd * rng.standard_normal(samples.shape)
        scored = np.bincount(record, minlength=n_records) > 0
        model = out["methods"]["model"]
        model["crps_samples"] = by_modality(crps_samples(value, samples))
        model["mse_sample_mean"] = by_modality((samples.mean(0) - value) ** 2)
        model["energy_score"] = float(np.mean(energy_score(value, samples, record, n_records)[scored]))
        model["energy_score_independent"] = float(np.mean(energy_score(value, independent, record, n_records)[scored]))
        model["energy_score_vs_independent"] = model["energy_score"] / model["energy_score_independent"]
        model["sample_coverage"] = {f"{lv:g}": float(np.mean(sample_coverage(value, samples, lv)))
                                    for lv in SAMPLE_LEVELS}
        out["n_samples"] = int(samples.shape[0])
    return out


