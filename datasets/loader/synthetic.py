"""A synthetic, learnable ElementSet for tests, benchmarks and demos (no files needed).

Each record has a few hidden parameters (level ``a``, level ``b``, period, phase) shared by all its channels,
so that one modality predicts another: ``vitals`` (``hr``, ``sbp``: no error given), ``labs`` (``lactate``,
sparse, with errors), ``static`` (``age``: one element, time NaN) and ``photometry`` (fluxes in two bands
with an effective wavelength ``coord`` and an ``asinh`` transform). Record lengths follow a heavy-tailed
(log-normal) distribution like ICU stays: tens to thousands of elements.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from datasets.format import ELEMENT_DTYPES, ElementSet
from datasets.normalise import channel_statistics
from perceiver.packing import offsets_from_counts, segment_ids

CHANNELS = pd.DataFrame({
    "name": ["hr", "sbp", "lactate", "age", "flux_g", "flux_r"],
    "modality": ["vitals", "vitals", "labs", "static", "photometry", "photometry"],
    "unit": ["1/min", "mmHg", "mmol/L", "yr", "uJy", "uJy"],
    "coord": [math.nan, math.nan, math.nan, math.nan, 4770.0, 6231.0],
    "transform": ["identity", "identity", "identity", "identity", "asinh", "asinh"],
})


def lognormal_lengths(n: int, rng: np.random.Generator, median: float = 60.0, sigma: float = 1.0,
                      low: int = 8, high: int = 2000) -> np.ndarray:
    """Heavy-tailed record lengths: log-normal around ``median``, clipped to ``[low, high]``."""
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))), low, high).astype(np.int64)


def synthetic_elements(n_records: int = 64, seed: int = 0, lengths: np.ndarray | None = None,
                       noise: float = 0.05, span: float = 48.0,
                       split: tuple[float, float, float] = (0.8, 0.1, 0.1)
                       ) -> tuple[ElementSet, pd.DataFrame]:
    """``n_records`` synthetic records and their channel table (with train-split normalisation statistics).

    ``lengths`` gives the number of timed elements per record (default: log-normal, 8 to 2000); every
    record also has one static ``age`` element. ``noise`` is the relative measurement noise.
    """
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = lognormal_lengths(n_records, rng)
    lengths = np.asarray(lengths, np.int64)
    n_records = len(lengths)
    a, b = rng.standard_normal(n_records), rng.standard_normal(n_records)
    period = rng.uniform(6.0, 24.0, n_records)
    phase = rng.uniform(0, 2 * math.pi, n_records)

    rec = segment_ids(offsets_from_counts(lengths))
    n = len(rec)
    t = rng.uniform(0, span, n)
    # timed channels: vitals frequent, labs rare, photometry in between
    ch = rng.choice([0, 1, 2, 4, 5], size=n, p=[0.35, 0.3, 0.05, 0.15, 0.15])
    s = np.sin(2 * math.pi * t / period[rec] + phase[rec])
    clean = np.select(
        [ch == 0, ch == 1, ch == 2, ch == 4, ch == 5],
        [80 + 10 * a[rec] + 6 * s, 120 + 8 * b[rec] + 5 * s, 2 + 0.5 * (a[rec] + b[rec]) + 0.02 * t,
         100 * np.exp(0.5 * b[rec]) * (1 + 0.3 * s), 150 * np.exp(0.5 * b[rec]) * (1 + 0.2 * s)])
    err = np.select([ch == 2, ch >= 4], [0.1 + 0 * t, 5.0 + 0.05 * np.abs(clean)], default=np.nan)
    scale = np.where(np.isnan(err), noise * np.abs(clean), err)
    value = clean + scale * rng.standard_normal(n)
    coord = CHANNELS["coord"].to_numpy()[ch]

    # one static element per record
    rec = np.concatenate([rec, np.arange(n_records)])
    t = np.concatenate([t, np.full(n_records, np.nan)])
    ch = np.concatenate([ch, np.full(n_records, 3)])
    value = np.concatenate([value, 60 + 10 * a + rng.standard_normal(n_records)])
    err = np.concatenate([err, np.full(n_records, np.nan)])
    coord = np.concatenate([coord, np.full(n_records, np.nan)])

    # ElementSet order: by record, static first, then time, channel, coord
    order = np.lexsort((coord, ch, np.nan_to_num(t, nan=-np.inf), rec))
    u = rng.random(n_records)
    names = np.where(u < split[0], "train", np.where(u < split[0] + split[1], "val", "test"))
    records = pd.DataFrame({"record_id": [f"syn{seed}-{i:05d}" for i in range(n_records)],
                            "source_file": "synthetic", "split": names, "t0": 0.0})
    elements = ElementSet(records=records, row_size=lengths + 1,
                          **{k: np.asarray(v[order], dtype=ELEMENT_DTYPES[k])
                             for k, v in (("time", t), ("channel", ch), ("value", value), ("error", err),
                                          ("coord", coord))})
    train = np.repeat(names == "train", lengths + 1)
    if not train.any():
        train[:] = True
    stats = channel_statistics(elements.channel, elements.value, elements.error, CHANNELS, train)
    channels = pd.concat([CHANNELS, stats[["softening", "bound_width", "location", "scale"]]], axis=1)
    return elements, channels


SMOOTH_CHANNELS = pd.DataFrame({
    "name": ["vital", "lab"], "modality": ["vitals", "labs"], "unit": ["1", "1"], "coord": [math.nan, math.nan],
    "transform": ["identity", "identity"]})


def smooth_curve(t: np.ndarray, centres: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """A smooth aperiodic curve: a sum of Gaussian bumps (``centres`` / ``widths`` / ``heights``: (k,))."""
    return (heights * np.exp(-0.5 * ((np.asarray(t)[:, None] - centres) / widths) ** 2)).sum(1)


def smooth_aperiodic_elements(n_records: int = 96, seed: int = 0, span: float = 96.0, lab_gap: tuple = (8.0, 16.0),
                              noise: float = 0.05) -> tuple[ElementSet, pd.DataFrame, dict]:
    """Records whose two channels follow one smooth aperiodic curve per record (three Gaussian bumps of 12-36 h
    width over ``span`` hours): ``vital`` observed about hourly (exponential gaps), ``lab`` = 1.5 x the curve
    observed every ``lab_gap`` hours (uniform, irregular). Returns the elements, the channel table (with
    train-split statistics) and each record's bump parameters (``centres``, ``widths``, ``heights``:
    (n_records, 3)) to evaluate the true curve with :func:`smooth_curve`."""
    rng = np.random.default_rng(seed)
    truth = {"centres": rng.uniform(0, span, (n_records, 3)), "widths": rng.uniform(12, 36, (n_records, 3)),
             "heights": rng.normal(0, 1, (n_records, 3))}
    parts = []
    for r in range(n_records):  # one iteration per record; its elements are built with numpy
        bumps = [truth[k][r] for k in ("centres", "widths", "heights")]
        tv = np.cumsum(rng.exponential(1.0, int(span * 1.5)))
        tl = rng.uniform(0, lab_gap[0]) + np.cumsum(rng.uniform(*lab_gap, int(span / lab_gap[0]) + 1))
        tv, tl = tv[tv < span], tl[tl < span]
        t = np.concatenate([tv, tl])
        ch = np.concatenate([np.zeros(len(tv)), np.ones(len(tl))]).astype(np.int16)
        value = smooth_curve(t, *bumps) * np.where(ch == 1, 1.5, 1.0) + noise * rng.standard_normal(len(t))
        order = np.lexsort((ch, t))
        parts.append((t[order], ch[order], value[order]))
    lengths = np.array([len(p[0]) for p in parts])
    u = rng.random(n_records)
    names = np.where(u < 0.7, "train", np.where(u < 0.85, "val", "test"))
    records = pd.DataFrame({"record_id": [f"smooth{seed}-{i:04d}" for i in range(n_records)],
                            "source_file": "synthetic", "split": names, "t0": 0.0})
    t, ch, value = (np.concatenate(x) for x in zip(*parts, strict=True))
    elements = ElementSet(records=records, row_size=lengths, time=t.astype(ELEMENT_DTYPES["time"]),
                          channel=ch.astype(ELEMENT_DTYPES["channel"]), value=value.astype(ELEMENT_DTYPES["value"]),
                          error=np.full(len(t), np.nan, ELEMENT_DTYPES["error"]),
                          coord=np.full(len(t), np.nan, ELEMENT_DTYPES["coord"]))
    train = np.repeat(names == "train", lengths)
    stats = channel_statistics(elements.channel, elements.value, elements.error, SMOOTH_CHANNELS, train)
    channels = pd.concat([SMOOTH_CHANNELS, stats[["softening", "bound_width", "location", "scale"]]], axis=1)
    return elements, channels, truth
