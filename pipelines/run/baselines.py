"""Honest baselines for reconstructing hidden elements, scored on exactly the model's hidden elements.

All of them work in normalised units on packed records (``offsets``, per-element ``time``, ``channel``,
``value``) with a ``visible`` mask (what a baseline may look at) and a ``target`` mask (what it must predict):

- :func:`channel_mean`: the channel's mean over the train split, whatever the record;
- :func:`per_record_mean`: the mean of the record's visible values of the same channel (the channel mean where
  the record has none visible);
- :func:`forward_fill`: the record's last visible value of the same channel at or before the target's time;
- :func:`linear_interpolation`: per record and channel, linear in time between the visible neighbours,
  constant beyond the first and last visible element;
- ``gradient_boost`` (:func:`fit_gradient_boost`, :class:`GradientBoost`): scikit-learn's
  ``HistGradientBoostingRegressor`` trained on hidden elements of the *train* split (same protocol, the
  evaluation's seeded plan) with exactly the evidence the model's decoder gets about a query, and nothing else
  (:func:`neighbour_features`): its time relative to the record's reference time (NaN when static), its channel
  and modality, the previous and next visible values of its channel in the record with the gaps to them (time,
  and coord for spectra) and their linear interpolation, and the record's snapshot of every channel of the
  table around the query's time (previous / next visible value and the time gaps to them). Never the record's
  length, its last time, how many elements are hidden or anything else a hidden element would reveal.

For spectra (a channel a record observed at one time over many wavelengths) "time" is the wavelength: forward
fill and interpolation run along ``coord`` when it is given (:func:`along_axis`); the gradient-boost features
search along (time, coord) as the decoder does.

Where a record has no visible element of the target's channel (or the target is static, time NaN), the
time-based baselines fall back to the channel mean. The neighbours come from
:func:`perceiver.neighbours.same_channel_neighbours` (the one implementation the model's decoder features use
too): vectorised, no per-record Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from perceiver.neighbours import same_channel_neighbours
from perceiver.packing import segment_ids

#: HistGradientBoostingRegressor settings of the gradient-boost baseline (seeded with ``random_state``)
GRADIENT_BOOST_PARAMS = dict(max_iter=300, learning_rate=0.1, max_leaf_nodes=31, min_samples_leaf=20,
                             l2_regularization=0.0, early_stopping=True, validation_fraction=0.1,
                             n_iter_no_change=10)
#: at most this many target elements train the gradient-boost baseline (a seeded subsample)
GRADIENT_BOOST_MAX_ELEMENTS = 300_000


def channel_means(channel: np.ndarray, value: np.ndarray, n_channels: int) -> np.ndarray:
    """Mean normalised value per channel (0 for channels without elements: the normalised location)."""
    counts = np.bincount(channel, minlength=n_channels)
    sums = np.bincount(channel, weights=value.astype(np.float64), minlength=n_channels)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def channel_mean(channel: np.ndarray, target: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Prediction for each target element: its channel's train-split mean."""
    return means[channel[target]]


def per_record_mean(offsets, channel, value, visible, target, means: np.ndarray) -> np.ndarray:
    """Mean of the record's visible values of the target's channel (one bincount over (record, channel)
    groups); the channel mean where the record has none visible."""
    channel = np.asarray(channel, np.int64)
    visible = np.asarray(visible, bool) & np.isfinite(value)
    target = np.asarray(target, bool)
    n_ch = max(int(channel.max(initial=0)) + 1, len(means))
    _, group = np.unique(segment_ids(np.asarray(offsets, np.int64)) * n_ch + channel, return_inverse=True)
    n_g = int(group.max(initial=-1)) + 1
    counts = np.bincount(group[visible], minlength=n_g)
    sums = np.bincount(group[visible], weights=np.asarray(value, np.float64)[visible], minlength=n_g)
    g = group[target]
    return np.where(counts[g] > 0, sums[g] / np.maximum(counts[g], 1), np.asarray(means, np.float64)[channel[target]])


def along_axis(offsets: np.ndarray, time: np.ndarray, channel: np.ndarray, coord: np.ndarray | None) -> np.ndarray:
    """The axis a record's channel is interpolated along: its time, or, for a channel the record observed at a
    single time over many wavelengths (a spectrum), its ``coord`` (wavelength)."""
    if coord is None:
        return time
    record = segment_ids(offsets)
    n_ch = int(channel.max(initial=0)) + 1
    _, group = np.unique(record.astype(np.int64) * n_ch + channel, return_inverse=True)
    t = np.where(np.isfinite(time), time, np.nan)
    n_g = int(group.max(initial=-1)) + 1
    tmin, tmax = np.full(n_g, np.inf), np.full(n_g, -np.inf)
    cmin, cmax = np.full(n_g, np.inf), np.full(n_g, -np.inf)
    ok_t, ok_c = np.isfinite(t), np.isfinite(coord)
    np.minimum.at(tmin, group[ok_t], t[ok_t])
    np.maximum.at(tmax, group[ok_t], t[ok_t])
    np.minimum.at(cmin, group[ok_c], coord[ok_c])
    np.maximum.at(cmax, group[ok_c], coord[ok_c])
    spectral = (tmax <= tmin) & (cmax > cmin)  # one time (or none), many wavelengths
    use_coord = spectral[group] & ok_c
    return np.where(use_coord, coord.astype(np.float64), time)


def _search(offsets: np.ndarray, channel: np.ndarray, axes: list[np.ndarray], keys: np.ndarray,
            queries: np.ndarray, query_channel: np.ndarray | int | None = None, record: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Packed index of the previous and next key (``keys``: ascending packed indices) of the same record and
    channel for each query (``queries``: ascending packed indices), -1 if none, along ``axes`` (most significant
    first; :func:`perceiver.neighbours.same_channel_neighbours`). ``query_channel`` asks about another channel
    than the queries' own (an int: that channel for every query); ``record``: the record index of every packed
    element, when the caller has it."""
    record = segment_ids(np.asarray(offsets, np.int64)) if record is None else record
    n_rec = len(offsets) - 1

    def packed(idx: np.ndarray) -> torch.Tensor:
        counts = np.bincount(record[idx], minlength=n_rec)
        return torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    if query_channel is None:
        query_channel = channel[queries]
    q_ch = np.array(np.broadcast_to(np.asarray(query_channel, np.int64), (len(queries),)))  # writable
    c = torch.from_numpy(np.asarray(channel, np.int64))
    ax = [torch.from_numpy(np.asarray(a, np.float64)) for a in axes]
    k, q = torch.from_numpy(keys), torch.from_numpy(queries)
    prev, nxt = same_channel_neighbours(packed(keys), c[k], [a[k] for a in ax], packed(queries),
                                        torch.from_numpy(q_ch), [a[q] for a in ax])
    keys = np.append(keys, -1)  # index -1 (no neighbour) maps to -1
    return keys[prev.numpy()], keys[nxt.numpy()]


def _neighbours(offsets, time, channel, visible, target):
    """For each target (packed index ``tgt``): packed index of the previous and next visible element of the
    same record and channel along ``time`` (-1 if none; :func:`perceiver.neighbours.same_channel_neighbours`)."""
    offsets = np.asarray(offsets, np.int64)
    visible = np.asarray(visible, bool) & np.isfinite(time)
    tgt = np.flatnonzero(np.asarray(target, bool))
    prev, nxt = _search(offsets, np.asarray(channel, np.int64), [time], np.flatnonzero(visible), tgt)
    return tgt, prev, nxt


def forward_fill(offsets, time, channel, value, visible, target, means: np.ndarray, coord=None) -> np.ndarray:
    """Last visible value of the same record and channel at or before the target's time (else the channel
    mean; a target before the first visible element takes the channel mean too, as a forward fill would)."""
    tgt, prev, _ = _neighbours(offsets, along_axis(offsets, time, channel, coord), channel, visible, target)
    out = means[channel[tgt]].astype(np.float64)
    has = prev >= 0
    out[has] = value[prev[has]]
    return out


def linear_interpolation(offsets, time, channel, value, visible, target, means: np.ndarray, coord=None
                         ) -> np.ndarray:
    """Linear interpolation in time between the visible neighbours of the same record and channel."""
    time = along_axis(offsets, time, channel, coord)
    tgt, prev, nxt = _neighbours(offsets, time, channel, visible, target)
    out = means[channel[tgt]].astype(np.float64)
    both = (prev >= 0) & (nxt >= 0)
    only_prev = (prev >= 0) & (nxt < 0)
    only_next = (prev < 0) & (nxt >= 0)
    out[only_prev] = value[prev[only_prev]]
    out[only_next] = value[nxt[only_next]]
    t0, t1 = time[prev[both]], time[nxt[both]]
    v0, v1 = value[prev[both]].astype(np.float64), value[nxt[both]].astype(np.float64)
    w = np.where(t1 > t0, (time[tgt[both]] - t0) / np.where(t1 > t0, t1 - t0, 1.0), 0.5)
    out[both] = v0 + w * (v1 - v0)
    return out


# ---------------------------------------------------------------------------------------------------------
# gradient boosting on the decoder's evidence
# ---------------------------------------------------------------------------------------------------------

#: per-channel block of the own-channel features (the query's channel) and of each snapshot channel
OWN_FEATURES = ("prev_value", "next_value", "interpolation", "prev_gap", "next_gap", "prev_coord_gap",
                "next_coord_gap")
SNAPSHOT_FEATURES = ("prev_value", "next_value", "prev_gap", "next_gap")
SNAPSHOT_COORD_FEATURES = ("prev_coord_gap", "next_coord_gap")


def neighbour_feature_names(n_channels: int, channel_names: list[str] | None = None, coord: bool = False
                            ) -> list[str]:
    """Column names of :func:`neighbour_features`: ``time``, ``channel``, ``modality``, the own-channel block,
    then one snapshot block per channel of the table."""
    names = channel_names or [str(c) for c in range(n_channels)]
    block = SNAPSHOT_FEATURES + (SNAPSHOT_COORD_FEATURES if coord else ())
    return (["time", "channel", "modality"] + [f"own_{f}" for f in OWN_FEATURES]
            + [f"{names[c]}_{f}" for c in range(n_channels) for f in block])


def neighbour_features(offsets, time, channel, coord, value, visible, target, channel_modality: np.ndarray,
                       coord_gaps: bool = False) -> np.ndarray:
    """Feature rows (float32, one per target element in packed order) of what the model's decoder knows about
    a query, computed from the *visible* elements only (missing = NaN):

    - ``time`` as the model sees it (relative to the record's reference time; NaN for a static element),
      ``channel`` and ``modality`` (indices, categorical);
    - own channel: previous and next visible value of the query's channel in the record along (time, coord),
      their linear interpolation (along time, or along coord between pixels of one time), and the gaps to them
      in time and in coord;
    - snapshot: for every channel of the table (``len(channel_modality)``), the previous and next visible value
      around the query's time and the time gaps to them (with ``coord_gaps`` also the coord gaps). A static
      visible element (time NaN) is every dated query's *next* element of its channel, gap NaN, as in the
      decoder's features.

    A static query has no neighbours (as in :class:`perceiver.neighbours.NeighbourFeatures`). The search is
    :func:`perceiver.neighbours.same_channel_neighbours`, once per channel of the table: no per-record loop.
    """
    offsets = np.asarray(offsets, np.int64)
    channel = np.asarray(channel, np.int64)
    time = np.asarray(time, np.float64)
    coord = np.asarray(coord, np.float64) if coord is not None else np.full(len(time), np.nan)
    value = np.asarray(value, np.float64)
    channel_modality = np.asarray(channel_modality, np.int64)
    n_ch = len(channel_modality)
    tgt = np.flatnonzero(np.asarray(target, bool))
    keys = np.flatnonzero(np.asarray(visible, bool) & ~np.asarray(target, bool))
    n, q_ch = len(tgt), channel[tgt]
    block = len(SNAPSHOT_FEATURES) + (len(SNAPSHOT_COORD_FEATURES) if coord_gaps else 0)
    head = 3 + len(OWN_FEATURES)
    X = np.full((n, head + n_ch * block), np.nan, np.float32)
    X[:, 0], X[:, 1], X[:, 2] = time[tgt], q_ch, channel_modality[q_ch]
    tq, cq = time[tgt], coord[tgt]
    record = segment_ids(np.asarray(offsets, np.int64))
    for c in range(n_ch):
        kc = keys[channel[keys] == c]
        if not len(kc) or not n:
            continue
        prev, nxt = _search(offsets, channel, [time, coord], kc, tgt, c, record)
        has_p, has_n = prev >= 0, nxt >= 0
        p, x = np.where(has_p, prev, 0), np.where(has_n, nxt, 0)
        v_p, v_n = np.where(has_p, value[p], np.nan), np.where(has_n, value[x], np.nan)
        dt_p, dt_n = np.where(has_p, np.abs(tq - time[p]), np.nan), np.where(has_n, np.abs(tq - time[x]), np.nan)
        dc_p, dc_n = np.where(has_p, np.abs(cq - coord[p]), np.nan), np.where(has_n, np.abs(cq - coord[x]), np.nan)
        col = head + c * block
        X[:, col:col + 4] = np.stack([v_p, v_n, dt_p, dt_n], axis=1)
        if coord_gaps:
            X[:, col + 4:col + 6] = np.stack([dc_p, dc_n], axis=1)
        own = q_ch == c
        if own.any():
            span_t, span_c = dt_p[own] + dt_n[own], dc_p[own] + dc_n[own]
            with np.errstate(invalid="ignore", divide="ignore"):
                w = np.where(span_t > 0, dt_p[own] / span_t, np.where(span_c > 0, dc_p[own] / span_c, 0.5))
            a, b = v_p[own], v_n[own]
            interp = np.where(has_p[own] & has_n[own], a + w * (b - a), np.where(has_p[own], a, b))
            X[own, 3:head] = np.stack([a, b, interp, dt_p[own], dt_n[own], dc_p[own], dc_n[own]], axis=1)
    return X


@dataclass
class GradientBoost:
    """A fitted gradient-boost baseline: the regressor (None when there was nothing to train on: it then
    predicts the channel means), the features it was trained on, and how much data it saw."""

    regressor: object | None
    means: np.ndarray
    channel_modality: np.ndarray
    coord_gaps: bool
    n_train_elements: int
    n_train_records: int
    params: dict = field(default_factory=dict)
    n_iter: int = 0
    fit_seconds: float = 0.0
    #: the feature columns the regressor uses (those with a value in some training row)
    columns: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return len(neighbour_feature_names(len(self.channel_modality), coord=self.coord_gaps))

    def predict(self, offsets, time, channel, coord, value, visible, target) -> np.ndarray:
        """Predictions (normalised) for the target elements, in packed order, from the visible ones."""
        target = np.asarray(target, bool)
        if self.regressor is None or not target.any():
            return np.asarray(self.means, np.float64)[np.asarray(channel, np.int64)[target]]
        X = neighbour_features(offsets, time, channel, coord, value, visible, target, self.channel_modality,
                               self.coord_gaps)
        return np.asarray(self.regressor.predict(X[:, self.columns]), np.float64)

    def describe(self, split: str = "train") -> str:
        """One line: what the baseline sees and what it was trained on."""
        if self.regressor is None:
            return (f"gradient boosting had no hidden {split}-split elements to train on: the train-split mean of "
                    "the channel")
        coord = " and coord" if self.coord_gaps else ""
        used = len(self.columns) if self.columns is not None else self.n_features
        return (f"scikit-learn HistGradientBoostingRegressor ({self.n_iter} trees, learning rate "
                f"{self.params.get('learning_rate')}) trained on {self.n_train_elements:,} hidden elements of "
                f"{self.n_train_records:,} {split}-split records (same protocol, seeded plan); {used} features "
                f"(of {self.n_features}), from visible elements only: the query's time relative to the record's "
                "reference time (NaN if static), its channel and modality (categorical), the previous / next "
                "visible value of its channel in the record, the gaps to them in time and coord and their linear "
                f"interpolation, and for each of the {len(self.channel_modality)} channels the previous / next "
                f"visible value around the query's time and the gaps in time{coord} to them")


def fit_gradient_boost(offsets, time, channel, coord, value, visible, target, means: np.ndarray,
                       channel_modality: np.ndarray, max_elements: int | None = GRADIENT_BOOST_MAX_ELEMENTS,
                       seed: int = 0, **params) -> GradientBoost:
    """Train the gradient-boost baseline on the ``target`` elements of packed (training) records, from their
    ``visible`` elements (:func:`neighbour_features`). At most ``max_elements`` targets (a subsample seeded by
    ``seed``, which also seeds the regressor). ``params`` override :data:`GRADIENT_BOOST_PARAMS`."""
    import time as clock

    from sklearn.ensemble import HistGradientBoostingRegressor

    t0 = clock.perf_counter()
    params = {**GRADIENT_BOOST_PARAMS, **params}
    channel = np.asarray(channel, np.int64)
    channel_modality = np.asarray(channel_modality, np.int64)
    target = np.asarray(target, bool) & np.isfinite(value)
    visible = np.asarray(visible, bool) & ~target
    coord_gaps = coord is not None and bool(np.isfinite(np.asarray(coord)[visible]).any())
    idx = np.flatnonzero(target)
    if max_elements is not None and len(idx) > max_elements:
        rng = np.random.default_rng([seed, 1])
        idx = np.sort(rng.choice(idx, size=max_elements, replace=False))
    n_records = len(np.unique(segment_ids(np.asarray(offsets, np.int64))[idx]))
    gb = GradientBoost(None, np.asarray(means, np.float64), channel_modality, coord_gaps, len(idx), n_records,
                       params)
    if len(idx) < 2:
        return gb
    chosen = np.zeros(len(target), bool)
    chosen[idx] = True
    X = neighbour_features(offsets, time, channel, coord, value, visible, chosen, channel_modality, coord_gaps)
    y = np.asarray(value, np.float64)[idx]
    # a column without any value (a channel never seen before a query, say) carries nothing (and trips HGBR)
    gb.columns = np.flatnonzero(np.isfinite(X).any(axis=0))
    categorical = np.zeros(X.shape[1], bool)
    categorical[1:3] = len(channel_modality) <= 255  # the categories must fit HGBR's bins
    if params.get("early_stopping") and len(idx) < 100:
        params = {**params, "early_stopping": False}
    gb.regressor = HistGradientBoostingRegressor(categorical_features=categorical[gb.columns], random_state=seed,
                                                 **params).fit(X[:, gb.columns], y)
    gb.n_iter = int(gb.regressor.n_iter_)
    gb.fit_seconds = clock.perf_counter() - t0
    return gb


BASELINES = {"channel_mean": None, "per_record_mean": None, "forward_fill": forward_fill,
             "linear_interpolation": linear_interpolation, "gradient_boost": None}


def predict_baseline(name: str, offsets, time, channel, value, visible, target, means: np.ndarray,
                     coord: np.ndarray | None = None, gradient_boost: GradientBoost | None = None) -> np.ndarray:
    """Predictions of baseline ``name`` for the target elements, in packed order. With ``coord``, spectra
    (a channel seen at one time over many wavelengths) are filled and interpolated along wavelength.
    ``gradient_boost`` is the fitted model the ``gradient_boost`` baseline needs (:func:`fit_gradient_boost`)."""
    if name == "channel_mean":
        return channel_mean(channel, target, means)
    if name == "per_record_mean":
        return per_record_mean(offsets, channel, value, visible, target, means)
    if name == "gradient_boost":
        if gradient_boost is None:
            raise ValueError("the gradient_boost baseline needs a fitted model (fit_gradient_boost)")
        return gradient_boost.predict(offsets, time, channel, coord, value, visible, target)
    return BASELINES[name](offsets, time, channel, value, visible, target, means, coord)
