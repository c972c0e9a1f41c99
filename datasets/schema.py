"""Validation: raw elements from a source become sorted CSR records plus quarantine rows.

Every element a source read ends up in exactly one place: stored, or counted in a quarantine row
(``elements``) with its source file, first row number, record and reason. Checks, all vectorised:

- ``value`` not finite, or outside its channel's declared ``[valid_min, valid_max]`` (the value and the range
  are in the reason);  ``time`` infinite (NaN = static element, kept);
- ``error`` infinite, zero or negative (NaN = unknown, kept);
- ``channel`` not in the channel table;       - duplicate (time, channel, coord) within a record (first kept);
- records with no elements;                   - records with more than ``max_record_elements`` elements;
- a record id seen twice (in this batch or already in the store).

Unsorted elements are not an error: they are sorted by (time, channel, coord), static elements
(time NaN) first, and the number of records that needed it is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from datasets.format import ELEMENT_DTYPES, QUARANTINE_COLUMNS, Channel, ElementSet, RawElements

#: default limit on elements per record (the largest real records here have ~20k: DESI spectra)
DEFAULT_MAX_RECORD_ELEMENTS = 200_000


@dataclass
class Validated:
    elements: ElementSet
    quarantine: pd.DataFrame
    #: per source file: elements read, stored and quarantined
    counts: pd.DataFrame
    records_resorted: int


def _quarantine_rows(mask: np.ndarray, raw: RawElements, reason: str, field: str,
                     detail: np.ndarray | None = None) -> list[pd.DataFrame]:
    """One row per (record, reason[, detail]) for the elements in ``mask``, with their count."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    rec = raw.record[idx]
    df = pd.DataFrame({"rec": rec, "row": raw.row[idx],
                       "detail": detail[idx] if detail is not None else ""})
    g = df.groupby(["rec", "detail"], sort=True, dropna=False).agg(row=("row", "min"), elements=("row", "size"))
    g = g.reset_index()
    recs = raw.records.iloc[g["rec"].to_numpy()]
    reasons = [f"{reason} {d!r}" if d != "" else reason for d in g["detail"]]
    return [pd.DataFrame({"source_file": recs["source_file"].to_numpy(), "row": g["row"].to_numpy(),
                          "record_id": recs["record_id"].to_numpy(), "field": field,
                          "reason": reasons, "elements": g["elements"].to_numpy()})]


def validate(raw: RawElements, channels: Sequence[Channel] | int,
             max_record_elements: int = DEFAULT_MAX_RECORD_ELEMENTS) -> Validated:
    """Check, sort and pack ``raw``; everything rejected is counted in the quarantine table. ``channels``: the
    source's channel table (its ``valid_min`` / ``valid_max`` are checked), or just their number."""
    n_channels = channels if isinstance(channels, int) else len(channels)
    bounds = ([(np.nan, np.nan)] * n_channels if isinstance(channels, int)
              else [(c.valid_min, c.valid_max) for c in channels])
    lo, hi = np.array(bounds or [(np.nan, np.nan)], np.float64).reshape(-1, 2).T
    n_rec = len(raw.records)
    ids = raw.records["record_id"].astype(str).to_numpy()
    files = raw.records["source_file"].astype(str).to_numpy()
    q: list[pd.DataFrame] = [pd.DataFrame(raw.quarantine, columns=QUARANTINE_COLUMNS)] if raw.quarantine else []

    value = raw.value.astype(np.float64)
    error = raw.error.astype(np.float64)
    channel = raw.channel.astype(np.int64)
    bad_channel = (channel < 0) | (channel >= n_channels)
    not_finite = ~bad_channel & ~np.isfinite(value)
    ch = np.where(bad_channel, 0, channel)
    out_of_range = ~bad_channel & ~not_finite & ((value < lo[ch]) | (value > hi[ch]))  # NaN bound: no check
    bad_value = not_finite | out_of_range
    bad_time = ~bad_channel & ~bad_value & np.isinf(raw.time)
    bad_error = ~bad_channel & ~bad_value & ~bad_time & (np.isinf(error) | (error <= 0))
    names = raw.channel_name if raw.channel_name is not None else None
    q += _quarantine_rows(bad_channel, raw, "unknown channel", "channel",
                          names.astype(str) if names is not None else None)
    q += _quarantine_rows(not_finite, raw, "value is not finite", "value")
    if out_of_range.any():
        i = np.flatnonzero(out_of_range)
        pairs, inverse = np.unique(np.stack([channel[i].astype(np.float64), value[i]]), axis=1, return_inverse=True)
        text = np.array([f"{channels[int(c)].name}={v:g} not in [{lo[int(c)]:g}, {hi[int(c)]:g}]"
                         for c, v in pairs.T], dtype=object)  # one string per distinct (channel, value)
        detail = np.zeros(len(value), object)
        detail[i] = text[inverse.ravel()]
        q += _quarantine_rows(out_of_range, raw, "value outside the channel's valid range", "value", detail)
    q += _quarantine_rows(bad_time, raw, "time is infinite", "time")
    q += _quarantine_rows(bad_error, raw, "error is infinite, zero or negative", "error")
    keep = ~(bad_channel | bad_value | bad_time | bad_error)

    # Duplicate record ids within the batch: the first occurrence wins.
    dup_rec = pd.Series(ids).duplicated().to_numpy()
    if dup_rec.any():
        m = keep & dup_rec[raw.record]
        q += _quarantine_rows(m, raw, "duplicate record id", "record_id")
        keep &= ~m

    # Sort kept elements by (record, time with static first, channel, coord).
    idx = np.flatnonzero(keep)
    t = raw.time[idx]
    tkey = np.where(np.isnan(t), -np.inf, t)
    ckey = np.nan_to_num(raw.coord[idx].astype(np.float64), nan=-np.inf)
    keys = (raw.record[idx], tkey, channel[idx], ckey)
    if _is_sorted(keys):
        order, resorted = np.arange(len(idx)), 0  # sources usually emit sorted elements: skip the sort
    else:
        order = np.lexsort(keys[::-1])
        resorted = int(len(np.unique(raw.record[idx][order != np.arange(len(order))])))
    idx = idx[order]

    rec, tk, ch, ck = raw.record[idx], tkey[order], channel[idx], ckey[order]
    same = (rec[1:] == rec[:-1]) & (tk[1:] == tk[:-1]) & (ch[1:] == ch[:-1]) & (ck[1:] == ck[:-1])
    dup = np.concatenate([[False], same])
    if dup.any():
        m = np.zeros(len(raw.record), bool)
        m[idx[dup]] = True
        q += _quarantine_rows(m, raw, "duplicate (time, channel, coord)", "time")
        idx = idx[~dup]

    # Whole records: empty ones, too large ones.
    size = np.bincount(raw.record[idx], minlength=n_rec)
    too_big = size > max_record_elements
    if too_big.any():
        m = np.zeros(len(raw.record), bool)
        m[idx] = too_big[raw.record[idx]]
        q += _quarantine_rows(m, raw, f"record has more than {max_record_elements} elements", "record")
        idx = idx[~too_big[raw.record[idx]]]
        size[too_big] = 0
    # Records with no elements: the record itself is the quarantined item (0 elements).
    present_ids = ~dup_rec
    empty = (size == 0) & ~too_big & present_ids
    if empty.any():
        q.append(pd.DataFrame({"source_file": files[empty], "row": -1, "record_id": ids[empty],
                               "field": "record", "reason": "empty record (no valid elements)",
                               "elements": 0}))
    stored = size > 0

    records = raw.records.loc[stored].reset_index(drop=True)
    records["record_id"] = records["record_id"].astype(str)
    out = ElementSet(
        records=records,
        row_size=size[stored].astype(np.int64),
        **{k: (getattr(raw, k)[idx]).astype(dt) for k, dt in ELEMENT_DTYPES.items()},
    )
    quarantine = (pd.concat(q, ignore_index=True) if q else pd.DataFrame(columns=QUARANTINE_COLUMNS))
    quarantine = quarantine[QUARANTINE_COLUMNS].astype({"row": np.int64, "elements": np.int64})
    return Validated(out, quarantine, _reconcile(raw, files, idx, quarantine), resorted)


def _is_sorted(keys: tuple[np.ndarray, ...]) -> bool:
    """Whether rows are in non-decreasing lexicographic order of ``keys`` (vectorised)."""
    ordered = np.ones(max(len(keys[0]) - 1, 0), bool)  # "strictly before" so far undecided -> equal
    decided = np.zeros_like(ordered)
    for k in keys:
        a, b = k[:-1], k[1:]
        ordered &= decided | (a <= b)
        decided |= a < b
    return bool(ordered.all())


def _reconcile(raw: RawElements, files: np.ndarray, stored_idx: np.ndarray, quarantine: pd.DataFrame) -> pd.DataFrame:
    """Per source file: elements read, stored, quarantined (read = stored + quarantined must hold).

    Unreadable files count as 0 elements read, with their quarantine row saying why.
    """
    n_rec = len(files)
    per_record = pd.DataFrame({"source_file": files,
                               "read": np.bincount(raw.record, minlength=n_rec),
                               "stored": np.bincount(raw.record[stored_idx], minlength=n_rec)})
    counts = per_record.groupby("source_file").sum()
    quar = quarantine.groupby("source_file")["elements"].sum() if len(quarantine) else pd.Series(dtype=np.int64)
    df = counts.reindex(counts.index.union(quar.index)).fillna(0)
    # Elements the source itself rejected (e.g. a cell that is not a number) were read too.
    if raw.quarantine:
        at_source = pd.DataFrame(raw.quarantine).groupby("source_file")["elements"].sum()
        df["read"] += at_source.reindex(df.index).fillna(0)
    df["quarantined"] = quar.reindex(df.index).fillna(0)
    df = df.astype(np.int64)
    df.index.name = "source_file"
    return df.reset_index()


def drop_known_records(v: Validated, known_ids: set[str]) -> Validated:
    """Move records whose id is already stored to the quarantine ("duplicate record id")."""
    es = v.elements
    ids = es.records["record_id"].to_numpy()
    dup = np.fromiter((i in known_ids for i in ids), bool, len(ids))
    if not dup.any():
        return v
    keep_el = np.repeat(~dup, es.row_size)
    q = pd.DataFrame({"source_file": es.records["source_file"].to_numpy()[dup], "row": -1,
                      "record_id": ids[dup], "field": "record_id",
                      "reason": "duplicate record id (already in the store)", "elements": es.row_size[dup]})
    elements = ElementSet(records=es.records.loc[~dup].reset_index(drop=True), row_size=es.row_size[~dup],
                          **{k: getattr(es, k)[keep_el] for k in ELEMENT_DTYPES})
    moved = q.groupby("source_file")["elements"].sum()
    counts = v.counts.set_index("source_file")
    counts.loc[moved.index, "stored"] -= moved
    counts.loc[moved.index, "quarantined"] += moved
    quarantine = pd.concat([v.quarantine, q[QUARANTINE_COLUMNS]], ignore_index=True)
    return Validated(elements, quarantine, counts.reset_index(), v.records_resorted)
