"""Appending validated element sets to a store, crash-safe and idempotent.

The commit protocol is :mod:`datasets.store.appendable`'s. On top of it this writer keeps the element-set
layout (:mod:`datasets.store.layout`): channels (new ones are added, a changed unit is an error), record
labels, the quarantine table, and the ledger of ingested units with their fingerprints, so that re-running
an ingest skips them and re-ingesting an unchanged archive changes nothing.

The channel statistics are recomputed after the last shard of an ingest. Every append commits
``statistics_current = False`` and :meth:`StoreWriter.update_statistics` commits ``True``, so a run killed
between its last shard and its statistics is finished by the next run (whose shards are then all skipped).
The statistics arrays are rewritten in place just before that commit: a reader opening the store in that
instant may see the new statistics (of the committed records) before the commit that marks them current.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from datasets.format import ELEMENT_DTYPES, FORMAT_NAME, FORMAT_VERSION, Channel
from datasets.normalise import channel_statistics
from datasets.schema import Validated
from datasets.store.appendable import AppendableGroup, StoreError, fill_value, now
from datasets.store.layout import (
    CHANNEL_COLUMNS,
    ELEMENT_ARRAYS,
    ELEMENT_ATTRS,
    LATER_CHANNEL_COLUMNS,
    QUARANTINE_DTYPES,
    UNIT_ARRAYS,
    assign_split,
    element_arrays,
    time_attrs,
)

DIMENSIONS = ("element", "record", "channel", "quarantine", "ingested_unit")
RESERVED_RECORD_COLUMNS = ("record_id", "source_file")
#: train elements per channel the normalisation statistics are computed on (all of them where fewer: the full
#: PhysioNet 2019 set's busiest channel has 1.12 M, so its statistics are exact)
STATISTICS_SAMPLE = 5 << 18  # 1.25 Mi
#: elements read at a time when computing the statistics
STATISTICS_CHUNK = 1 << 20


def _position_uniform(start: int, stop: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per element position ``start:stop`` (a multiplicative hash): the
    same elements are sampled whatever the chunking and however often the statistics are recomputed."""
    x = np.arange(start, stop, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class StoreWriter:
    """Open (or create) the store at ``url`` for appending records of one source.

    ``source`` supplies ``name``, ``time_unit``, ``time_reference`` and the channel table. Use as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, url: str, source, source_path: str = "", storage_options: dict | None = None):
        self.url = url
        self.out = AppendableGroup(url, self._new_meta(source, source_path), DIMENSIONS, storage_options, attrs={
            "Conventions": "CF-1.11", "featureType": "timeSeries",
            "title": f"Percival element set: {source.name}", "source": f"{source.name} archive: {source_path}"})
        try:
            self._open(source)
        except BaseException:  # release the lock: a retried attempt in this thread must not wait for it
            self.out.close()
            raise

    def _open(self, source) -> None:
        url = self.url
        self.meta = self.out.meta
        if self.out.created:
            self._create_arrays()
            self._set_channels(source.channels())
            self.out.commit()
        else:
            if self.meta["source"] != source.name:
                raise StoreError(f"{url} holds source {self.meta['source']!r}, not {source.name!r}")
            self._add_later_channel_columns(source.channels())
            self._set_channels(source.channels())
        self.arrays = element_arrays(self.group)  # element field -> array name (older stores: see layout)
        self.channel_map = self._channel_map(source.channels())
        n = self.count("record")
        self.known_ids = set(self.group["record_id"][:n].tolist()) if n else set()
        m = self.count("ingested_unit")
        self.ingested = set(zip(self.group["unit_name"][:m].tolist(),
                                self.group["unit_fingerprint"][:m].tolist(), strict=True)) if m else set()

    # -- public ---------------------------------------------------------------------------------------
    @property
    def group(self):
        """The Zarr group being written (in an object store, a new session's after each commit)."""
        return self.out.group

    def count(self, dim: str) -> int:
        """Committed length along ``dim``."""
        return self.out.count(dim)

    def append(self, validated: Validated, units: list) -> None:
        """Write one shard's validated records, its quarantine rows and its units, then commit."""
        es = validated.elements
        records = es.records.copy()
        records["row_size"] = es.row_size
        records["split"] = assign_split(records["record_id"])
        records["source_file"] = records["source_file"].astype(str)
        self._ensure_record_columns(records)
        columns = {k: getattr(es, k) for k in ELEMENT_DTYPES}
        columns["channel"] = self.channel_map[es.channel.astype(np.int64)].astype(np.int16)
        self.out.append("element", {self.arrays[k]: v for k, v in columns.items()})
        self.out.append("record", {c: self._record_column(records, c) for c in self._record_arrays()})
        q = validated.quarantine
        self.out.append("quarantine", {f"quarantine_{c}": q[c].to_numpy() for c in QUARANTINE_DTYPES})
        self.out.append("ingested_unit", {"unit_name": np.array([u.name for u in units], dtype=object),
                                           "unit_fingerprint": np.array([u.fingerprint for u in units],
                                                                        dtype=object)})
        self.known_ids.update(records["record_id"].tolist())
        self.ingested.update((u.name, u.fingerprint) for u in units)
        # committed with the data: a writer killed before update_statistics leaves a mark the next run sees
        self.meta["statistics_current"] = False
        self.out.commit()

    @property
    def statistics_current(self) -> bool:
        """Whether the channel statistics describe every committed record (False after an append until
        :meth:`update_statistics`; stores written before this flag existed count as current)."""
        return bool(self.meta.get("statistics_current", True))

    def update_statistics(self) -> pd.DataFrame:
        """Recompute the channel table's normalisation statistics on the train split, and commit.

        The store is read in chunks of :data:`STATISTICS_CHUNK` elements, twice: once to count each channel's
        train elements, once to keep at most :data:`STATISTICS_SAMPLE` of them per channel (a fixed
        pseudo-random subset, by element position; all of them where a channel has fewer), on which the
        statistics are computed. Memory stays bounded however large the store grows."""
        n_el, n_rec = self.count("element"), self.count("record")
        table = self.channel_table()
        if n_el:
            offsets = np.cumsum(self.group["row_size"][:n_rec])
            train_record = self.group["split"][:n_rec] == "train"
            chunks = [(a, min(a + STATISTICS_CHUNK, n_el)) for a in range(0, n_el, STATISTICS_CHUNK)]

            def train_channels(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
                train = train_record[np.searchsorted(offsets, np.arange(a, b), side="right")]
                return train, self.group[self.arrays["channel"]][a:b]

            counts = np.zeros(len(table), np.int64)
            for a, b in chunks:
                train, ch = train_channels(a, b)
                counts += np.bincount(ch[train], minlength=len(table))
            rate = np.minimum(1.0, STATISTICS_SAMPLE / np.maximum(counts, 1))  # per channel
            kept: dict[int, list] = {c: [] for c in np.flatnonzero(counts)}  # channel -> [(value, error), ...]
            for a, b in chunks:
                train, ch = train_channels(a, b)
                keep = train if (rate == 1).all() else train & (_position_uniform(a, b) < rate[ch])
                ch, value, error = ch[keep], self.group["value"][a:b][keep], self.group["error"][a:b][keep]
                for c in np.unique(ch):
                    mine = ch == c
                    kept[int(c)].append((value[mine], error[mine]))
            # one channel at a time: the temporaries of the statistics are those of one channel's sample
            stats = channel_statistics(np.zeros(0, np.int16), np.zeros(0, np.float32), np.zeros(0, np.float32),
                                       table, np.zeros(0, bool))
            for c, parts in kept.items():
                value, error = (np.concatenate(x) for x in zip(*parts, strict=True))
                one = channel_statistics(np.full(len(value), c, np.int16), value, error, table,
                                         np.ones(len(value), bool))
                stats.iloc[c] = one.iloc[c]
                kept[c] = []
            stats["count"] = counts
            for col in ("transform", "softening", "bound_width", "location", "scale", "count"):
                name, dtype = CHANNEL_COLUMNS[col]
                data = stats[col].to_numpy()
                self.group[name][:] = data.astype(object) if dtype is str else data.astype(dtype)
        self.meta["statistics_updated"] = now()
        self.meta["statistics_current"] = True
        self.out.commit()
        return self.channel_table()

    def channel_table(self) -> pd.DataFrame:
        n = self.count("channel")
        return pd.DataFrame({col: self.group[name][:n] for col, (name, _) in CHANNEL_COLUMNS.items()})

    def close(self) -> None:
        self.out.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- arrays ---------------------------------------------------------------------------------------
    def _new_meta(self, source, source_path: str) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": source.name,
            "source_path": str(source_path), "time_unit": source.time_unit,
            "time_reference": source.time_reference, "time_epoch": source.time_epoch, "record_columns": [],
        }

    def _array(self, name: str, dtype, dim: str, attrs: dict | None = None) -> None:
        self.out.create_array(name, dtype, dim, attrs, big=dim == "element")

    def _create_arrays(self) -> None:
        for field, dtype in ELEMENT_DTYPES.items():
            attrs = dict(ELEMENT_ATTRS[field])
            if field == "time":
                attrs |= time_attrs(self.meta)
            self._array(ELEMENT_ARRAYS[field], dtype, "element", attrs)
        self._array("record_id", str, "record", {"cf_role": "timeseries_id"})
        self._array("row_size", np.int64, "record", {"sample_dimension": "element",
                                                     "long_name": "number of elements in the record"})
        self._array("split", str, "record", {"long_name": "train/val/test, from a hash of record_id"})
        self._array("source_file", str, "record")
        for col, (name, dtype) in CHANNEL_COLUMNS.items():
            self._array(name, dtype, "channel", {"long_name": f"channel {col}"})
        for col, dtype in QUARANTINE_DTYPES.items():
            self._array(f"quarantine_{col}", dtype, "quarantine")
        for name, dtype in UNIT_ARRAYS.items():
            self._array(name, dtype, "ingested_unit")

    def _record_arrays(self) -> list[str]:
        return ["record_id", "row_size", "split", "source_file", *self.meta["record_columns"]]

    def _ensure_record_columns(self, records: pd.DataFrame) -> None:
        """Create arrays for label columns seen for the first time (earlier records get NaN / "")."""
        n = self.count("record")
        for col in records.columns:
            if col in self._record_arrays() or col in RESERVED_RECORD_COLUMNS:
                continue
            dtype = np.float64 if pd.api.types.is_numeric_dtype(records[col]) else str
            self._array(col, dtype, "record")
            if n:
                self.group[col].resize((n,))
                self.group[col][:] = np.full(n, fill_value(dtype), dtype=object if dtype is str else dtype)
            self.meta["record_columns"].append(col)

    def _record_column(self, records: pd.DataFrame, col: str) -> np.ndarray:
        arr = self.group[col]
        if col not in records:
            return np.full(len(records), arr.fill_value)
        if arr.dtype.kind in "fiu":
            return pd.to_numeric(records[col], errors="coerce").to_numpy(arr.dtype)
        return records[col].fillna("").astype(str).to_numpy(dtype=object)

    # -- channels -------------------------------------------------------------------------------------
    def _set_channels(self, channels: list[Channel]) -> None:
        """Add the source's channels that the store lacks; a channel whose unit changed is an error."""
        n = self.count("channel")
        existing = self.channel_table() if n else pd.DataFrame(columns=list(CHANNEL_COLUMNS))
        by_name = dict(zip(existing["name"], existing["unit"], strict=True))
        for ch in channels:
            if ch.name in by_name and by_name[ch.name] != ch.unit:
                raise StoreError(f"{self.url}: channel {ch.name!r} is in {by_name[ch.name]!r} in the store "
                                 f"but in {ch.unit!r} in the source")
        new = [ch for ch in channels if ch.name not in by_name]
        if new:
            cols = {"name": [c.name for c in new], "modality": [c.modality for c in new],
                    "unit": [c.unit for c in new], "coord": [c.coord for c in new],
                    "transform": [c.transform for c in new], "softening": np.ones(len(new)),
                    "location": np.zeros(len(new)), "scale": np.ones(len(new)), "count": np.zeros(len(new)),
                    "valid_min": [c.valid_min for c in new], "valid_max": [c.valid_max for c in new],
                    "bound_width": np.full(len(new), np.nan)}
            self.out.append("channel", {name: np.asarray(cols[col], dtype=object if dt is str else dt)
                                         for col, (name, dt) in CHANNEL_COLUMNS.items()})

    def _add_later_channel_columns(self, channels: list[Channel]) -> None:
        """A store written before a channel-table column existed gets it, filled from the source's channels
        (by name; the default elsewhere), committed with the next commit."""
        n = self.count("channel")
        names = list(self.group["channel_name"][:n])
        by_name = {c.name: c for c in channels}
        for col, default in LATER_CHANNEL_COLUMNS.items():
            name, dtype = CHANNEL_COLUMNS[col]
            if name in self.group.array_keys():
                continue
            self._array(name, dtype, "channel", {"long_name": f"channel {col}"})
            self.group[name].resize((n,))
            if n:
                self.group[name][:] = np.array([getattr(by_name[x], col, default) if x in by_name else default
                                                for x in names], dtype=dtype)

    def _channel_map(self, channels: list[Channel]) -> np.ndarray:
        names = list(self.group["channel_name"][:self.count("channel")])
        return np.array([names.index(c.name) for c in channels], dtype=np.int64)

