"""A model's data contract against a store: fitted once from the train split, then matched to any store.

:func:`fit_contract` turns a store's channel table and train records into a :class:`perceiver.DataContract`
(the channel vocabulary with each channel's unit and normalisation, the time / coord scales); training writes
it into the checkpoint. :func:`match_channels` is the one model-matches-store check: it maps a store's channel
codes onto a contract's, by name, and fails with the channel's name where a contract channel is missing or its
unit or modality changed; a store's extra channels are ignored (with a warning that counts them).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd

from datasets.format import FORMAT_NAME, FORMAT_VERSION, ElementSet
from perceiver.contract import ChannelSpec, DataContract
from perceiver.packing import offsets_from_counts, ranges, segment_ids

REQUIRED_CHANNEL_COLUMNS = ("name", "modality", "transform", "softening", "location", "scale")


class ContractError(ValueError):
    """A store does not match a model's data contract (the message names the channel)."""


def modality_names(channels: pd.DataFrame) -> list[str]:
    """Modalities in order of first appearance in the channel table (a stable index for embeddings)."""
    return list(dict.fromkeys(channels["modality"].astype(str)))


def _positive_gaps(values: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Differences between consecutive distinct values within each record (values sorted per record)."""
    return _gaps_by_group(values, seg)[0]


def _gaps_by_group(values: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive differences between consecutive values within each group, and the group of each."""
    order = np.lexsort((values, group))
    v, g = values[order], group[order]
    d = np.diff(v)
    keep = (g[1:] == g[:-1]) & (d > 0)
    return d[keep], g[1:][keep]


def group_median(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """The median of ``values`` per group ``0 .. n_groups - 1`` (NaN for an empty group), vectorised."""
    order = np.lexsort((values, group))
    v = np.asarray(values, np.float64)[order]
    counts = np.bincount(np.asarray(group, np.int64), minlength=n_groups)
    starts = np.cumsum(counts) - counts
    out = np.full(n_groups, np.nan)
    ok = counts > 0
    out[ok] = 0.5 * (v[(starts + (counts - 1) // 2)[ok]] + v[(starts + counts // 2)[ok]])
    return out


def median_gaps(time: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group: the median gap between its consecutive distinct times (NaN with fewer than two)."""
    gaps, g = _gaps_by_group(time, group)
    return group_median(gaps, g, n_groups)


def _channel_min_periods(time: np.ndarray, channel: np.ndarray, seg: np.ndarray, n_channels: int) -> np.ndarray:
    """Per channel: twice its median gap between distinct observation times within a record (NaN where a
    channel never has two in one record): the shortest period its sampling supports."""
    gaps, group = _gaps_by_group(time, seg.astype(np.int64) * n_channels + channel)
    return 2.0 * group_median(gaps, group % n_channels, n_channels)


def fit_contract(elements: ElementSet, channels: pd.DataFrame, records: np.ndarray | None = None) -> DataContract:
    """The data contract of a model trained on ``records`` (positions; default all) of ``elements``.

    Channels: the store's table (name, modality, unit, transform and train-split statistics). Time periods of
    the Fourier features span the shortest time scale (1st percentile of the gaps between consecutive distinct
    times of a record) to twice the longest (the largest record time span); coord periods likewise span the
    smallest gap between distinct coords within a record to twice the coord range.
    """
    missing = [c for c in REQUIRED_CHANNEL_COLUMNS if c not in channels.columns]
    if missing:
        raise ValueError(f"channel table lacks columns {missing} (normalisation statistics are required)")
    k = DataContract(
        channels=[_spec(r) for _, r in channels.iterrows()],
        modalities=modality_names(channels), store_format=f"{FORMAT_NAME} {FORMAT_VERSION}")
    records = np.arange(elements.n_records) if records is None else np.asarray(records, np.int64)
    lengths = np.asarray(elements.row_size, np.int64)[records]
    idx = ranges(elements.offsets[records], lengths)
    seg = segment_ids(offsets_from_counts(lengths))
    time = elements.time[idx].astype(np.float64)
    ok = np.isfinite(time)
    channel = elements.channel[idx].astype(np.int64)
    periods = _channel_min_periods(time[ok], channel[ok], seg[ok], k.n_channels)
    k.channels = [dataclasses.replace(c, time_min_period=float(p)) for c, p in zip(k.channels, periods, strict=True)]
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
            k.time_max_period = 2.0 * longest
            k.time_min_period = max(shortest, longest * 1e-6)
    coord = elements.coord[idx].astype(np.float64)
    ok = np.isfinite(coord)
    if ok.any():
        lo, hi = float(coord[ok].min()), float(coord[ok].max())
        gaps = _positive_gaps(coord[ok], seg[ok])
        rng = hi - lo
        k.coord_center = 0.5 * (lo + hi)
        k.coord_scale = max(0.5 * rng, 1e-6 * max(abs(lo), abs(hi), 1.0), 1e-12)
        if rng > 0:
            k.coord_max_period = 2.0 * rng
            k.coord_min_period = max(float(np.min(gaps)) if len(gaps) else rng, rng * 1e-6)
        else:
            k.coord_max_period = k.coord_min_period = max(abs(lo), 1.0)
    for name in ("time_min_period", "time_max_period", "coord_min_period", "coord_max_period"):
        if not math.isfinite(getattr(k, name)) or getattr(k, name) <= 0:
            raise ValueError(f"bad data statistic {name}={getattr(k, name)}")
    return k


def _spec(row: pd.Series, name: str | None = None, modality: str | None = None) -> ChannelSpec:
    """A contract channel from a row of a store's channel table (absent optional columns: their defaults)."""
    return ChannelSpec(name or str(row["name"]), modality or str(row["modality"]), str(row.get("unit", "")),
                       str(row["transform"]), float(row["softening"]), float(row["location"]), float(row["scale"]),
                       float(row.get("valid_min", math.nan)), float(row.get("valid_max", math.nan)),
                       bound_width=float(row.get("bound_width", math.nan)))


def complete_from_store(contract: DataContract, channels: pd.DataFrame, where: str = "the store") -> DataContract:
    """A contract whose unknown normalisation statistics (a checkpoint written before contracts) are taken
    from the store's channel table -- the old behaviour, announced with a warning."""
    if contract.complete:
        return contract
    warnings.warn(f"this checkpoint predates data contracts: normalising with {where}'s current channel "
                  "statistics (retrain to freeze them)", stacklevel=3)
    table = channels.set_index(channels["name"].astype(str))
    done = []
    for c in contract.channels:
        if c.name not in table.index:
            raise ContractError(f"{where}: has no channel {c.name!r}, which the model was trained on")
        # such a model was trained before bounded transforms: the store's bounds must not reshape its inputs
        done.append(dataclasses.replace(_spec(table.loc[c.name], c.name, c.modality), bound_width=math.nan))
    out = DataContract(**{**contract.__dict__, "channels": done})
    return out


def match_channels(contract: DataContract, channels: pd.DataFrame, where: str = "the store") -> np.ndarray:
    """For each of the store's channel codes, the contract's channel index (-1: not in the contract, ignored
    with a warning). Raises :class:`ContractError` naming the channel where a contract channel is missing from
    the store or its unit or modality differs."""
    names = channels["name"].astype(str).tolist()
    position = {n: i for i, n in enumerate(names)}
    units = channels["unit"].astype(str).tolist() if "unit" in channels.columns else [""] * len(names)
    modalities = channels["modality"].astype(str).tolist()
    code = np.full(len(names), -1, np.int64)
    for j, c in enumerate(contract.channels):
        i = position.get(c.name)
        if i is None:
            raise ContractError(f"{where}: has no channel {c.name!r}, which the model was trained on "
                                f"(its channels: {names})")
        if c.unit and units[i] and units[i] != c.unit:
            raise ContractError(f"{where}: channel {c.name!r} is in {units[i]!r}, the model was trained on "
                                f"{c.unit!r}")
        if modalities[i] != c.modality:
            raise ContractError(f"{where}: channel {c.name!r} is modality {modalities[i]!r}, the model was "
                                f"trained on {c.modality!r}")
        code[i] = j
    extra = [n for n, k in zip(names, code, strict=True) if k < 0]
    if extra:
        warnings.warn(f"{where}: channels {extra} are not in the model's data contract; their elements are "
                      "ignored", stacklevel=3)
    return code
