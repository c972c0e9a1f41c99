"""Reading a store: records as numpy/pandas for notebooks, the loader and the pipelines.

>>> store = open_store("physionet.zarr")
>>> store.records.head()             # one row per record: record_id, row_size, split, labels
>>> store.record("p000001")          # that record's elements, with channel names and modalities
>>> for chunk in store.iter_chunks(10_000):   # ElementSets of up to 10,000 records
...     ...

Only committed data is visible: shapes come from the store's consolidated metadata, written last by
each commit (see :mod:`datasets.store.writer`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import numpy as np
import pandas as pd

from datasets.format import ELEMENT_DTYPES, QUARANTINE_COLUMNS, ElementSet
from datasets.store import _icechunk, _zarr
from datasets.store.appendable import StoreError
from datasets.store.layout import CHANNEL_COLUMNS, LATER_CHANNEL_COLUMNS, element_arrays
from perceiver.packing import ranges


class Store:
    """A read-only view of the last commit of the store at ``url`` (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        group = _zarr.open_committed(url, storage_options)
        if group is None:
            raise StoreError(f"{url}: no Zarr store here (no zarr.json)")
        self.group = group
        meta = _zarr.percival_meta(self.group.attrs)
        if meta is None or "commit" not in meta:
            raise StoreError(f"{url}: not a Percival store, or its first commit never finished")
        self.meta: dict = dict(meta)
        self.arrays = element_arrays(group)  # element field -> array name

    # -- sizes and tables -----------------------------------------------------------------------------
    @property
    def n_records(self) -> int:
        return int(self.meta["commit"]["record"])

    @property
    def n_elements(self) -> int:
        return int(self.meta["commit"]["element"])

    @property
    def time_unit(self) -> str:
        return self.meta["time_unit"]

    @cached_property
    def records(self) -> pd.DataFrame:
        """One row per record: ``record_id``, ``row_size``, ``split``, ``source_file``, labels."""
        cols = ["record_id", "row_size", "split", "source_file", *self.meta["record_columns"]]
        df = pd.DataFrame({c: self._column(c) for c in cols})
        return df

    @cached_property
    def offsets(self) -> np.ndarray:
        """Start of each record's elements, plus the total (``n_records + 1`` entries)."""
        return np.concatenate([[0], np.cumsum(self.records["row_size"].to_numpy(), dtype=np.int64)])

    @cached_property
    def channels(self) -> pd.DataFrame:
        """The channel table: name, modality, unit, coord, transform and train-split statistics."""
        n = len(self._column("channel_name"))
        return pd.DataFrame({col: self._column(name) if name in self.group.array_keys()
                             else np.full(n, LATER_CHANNEL_COLUMNS[col])  # a store written before the column
                             for col, (name, _) in CHANNEL_COLUMNS.items()})

    @cached_property
    def quarantine(self) -> pd.DataFrame:
        """What was rejected: source_file, row, record_id, field, reason, elements."""
        return pd.DataFrame({c: self._column(f"quarantine_{c}") for c in QUARANTINE_COLUMNS})

    def _column(self, name: str) -> np.ndarray:
        data = self.group[name][:]
        return data.astype(object) if data.dtype.kind in "TUO" else data

    # -- elements -------------------------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None) -> ElementSet:
        """Records ``start:stop`` (contiguous, fast: one range read per array)."""
        stop = self.n_records if stop is None else min(stop, self.n_records)
        e0, e1 = int(self.offsets[start]), int(self.offsets[stop])
        return ElementSet(records=self.records.iloc[start:stop].reset_index(drop=True),
                          row_size=self.records["row_size"].to_numpy()[start:stop],
                          **{k: self.group[a][e0:e1] for k, a in self.arrays.items()})

    def select(self, record_ids) -> ElementSet:
        """The given records (by id), in the given order."""
        index = pd.Index(self.records["record_id"])
        pos = index.get_indexer(list(record_ids))
        if (pos < 0).any():
            missing = [r for r, p in zip(record_ids, pos, strict=True) if p < 0][:5]
            raise KeyError(f"{self.url}: no record(s) {missing}")
        return self.take(pos)

    def take(self, positions: np.ndarray) -> ElementSet:
        """Records at integer ``positions`` (reads the span they cover, then gathers)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return self.read(0, 0)
        lo, hi = int(positions.min()), int(positions.max()) + 1
        span = self.read(lo, hi)
        starts = self.offsets[positions] - self.offsets[lo]
        sizes = self.records["row_size"].to_numpy()[positions]
        idx = ranges(starts, sizes)
        return ElementSet(records=self.records.iloc[positions].reset_index(drop=True), row_size=sizes,
                          **{k: getattr(span, k)[idx] for k in ELEMENT_DTYPES})

    def record(self, record_id: str) -> pd.DataFrame:
        """One record's elements with ``channel_name``, ``modality`` and ``unit`` columns."""
        es = self.select([record_id])
        df = es.elements(0)
        ch = self.channels
        for col, src in (("channel_name", "name"), ("modality", "modality"), ("unit", "unit")):
            df[col] = ch[src].to_numpy()[df["channel"].to_numpy()]
        return df

    def iter_chunks(self, records_per_chunk: int = 10_000) -> Iterator[ElementSet]:
        """All records, in order, as ElementSets of up to ``records_per_chunk`` records."""
        for start in range(0, self.n_records, records_per_chunk):
            yield self.read(start, start + records_per_chunk)

    def content_hash(self) -> str:
        """SHA-256 over every committed array; equal hashes mean equal records, elements, channels, quarantine."""
        return _zarr.content_hash(self.group)

    def to_xarray(self):
        """The store as an ``xarray.Dataset`` (lazy, dask-backed)."""
        import xarray as xr

        if _icechunk.is_transactional(self.url):  # this snapshot's session store
            return xr.open_zarr(self.group.store, consolidated=False)
        return xr.open_zarr(self.url, consolidated=True)

    def summary(self) -> dict:
        """Counts for ``percival info``: records, elements, channels per modality, splits, quarantine."""
        ch = self.channels
        el_per_channel = np.bincount(self.group[self.arrays["channel"]][:], minlength=len(ch)) if self.n_elements else \
            np.zeros(len(ch), np.int64)
        q = self.quarantine
        return {
            "store": self.url, "source": self.meta["source"], "records": self.n_records,
            "elements": self.n_elements, "time_unit": self.time_unit,
            "splits": self.records["split"].value_counts().to_dict(),
            "channels": [{"name": n, "modality": m, "unit": u, "elements": int(c)}
                         for n, m, u, c in zip(ch["name"], ch["modality"], ch["unit"], el_per_channel,
                                               strict=True)],
            "modalities": ch.assign(elements=el_per_channel).groupby("modality")["elements"].sum().to_dict(),
            "quarantine_rows": len(q), "quarantined_elements": int(q["elements"].sum()) if len(q) else 0,
            "quarantine_reasons": (q.assign(reason=q["reason"].str.split(":").str[0])
                                   .groupby("reason")["elements"].agg(["size", "sum"])
                                   .rename(columns={"size": "rows", "sum": "elements"})
                                   .to_dict("index") if len(q) else {}),
            "created": self.meta["created"], "updated": self.meta["updated"],
        }


def open_store(url: str, storage_options: dict | None = None) -> Store:
    """Open the store at ``url`` for reading (see :class:`Store`)."""
    return Store(url, storage_options)
