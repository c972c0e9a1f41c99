"""Appending validated records to a store, crash-safe and idempotent.

Commit protocol. The store's root ``zarr.json`` holds the consolidated metadata (every array's shape)
and the ``percival.commit`` attribute (counts along each dimension). Readers, ``xarray.open_zarr`` and
``zarr.open_group`` use the consolidated metadata, so they see exactly the committed shapes. An append

1. resizes arrays and writes the new data beyond the committed length (a partly filled last shard is
   rewritten as a whole file, atomically, with its committed part unchanged);
2. rewrites the root ``zarr.json`` (new shapes + new commit) in one atomic write: the commit point.

A writer killed at any moment leaves the last commit intact; the next writer starts from the committed
counts and overwrites whatever lies beyond them. The units (files, archive members) a commit ingested are
recorded with their fingerprints, so re-running an ingest skips them: re-ingesting an unchanged source
changes nothing. One writer at a time: a lock file beside local stores (``<store>.lock``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os

import numpy as np
import pandas as pd
from zarr.codecs import ZstdCodec

from datasets.format import ELEMENT_DTYPES, FORMAT_NAME, FORMAT_VERSION, Channel
from datasets.normalise import channel_statistics
from datasets.schema import Validated
from datasets.store import _zarr
from datasets.store.layout import (
    CHANNEL_COLUMNS,
    ELEMENT_ATTRS,
    ELEMENT_CHUNK,
    ELEMENT_SHARD,
    QUARANTINE_DTYPES,
    TABLE_CHUNK,
    TABLE_SHARD,
    UNIT_ARRAYS,
    assign_split,
)

DIMENSIONS = ("element", "record", "channel", "quarantine", "ingested_unit")
RESERVED_RECORD_COLUMNS = ("record_id", "source_file")


class StoreError(RuntimeError):
    """A store that cannot be opened or appended to, with the reason."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _fill(dtype) -> object:
    return "" if dtype is str else (np.nan if np.dtype(dtype).kind == "f" else 0)


class StoreWriter:
    """Open (or create) the store at ``url`` for appending records of one source.

    ``source`` supplies ``name``, ``time_unit``, ``time_reference`` and the channel table. Use as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, url: str, source, source_path: str = "", storage_options: dict | None = None):
        self.url = url
        self._lock = _acquire_lock(url)
        self.store = _zarr.make_store(url, read_only=False, storage_options=storage_options)
        root = _zarr.get_json(self.store, "zarr.json")
        meta = (root or {}).get("attributes", {}).get("percival")
        if meta is None or "commit" not in meta:
            self.group = _zarr.open_group(self.store, mode="w", consolidated=False)
            self.meta = self._new_meta(source, source_path)
            self._create_arrays()
            self._set_channels(source.channels())
            self._commit()
        else:
            self.group = _zarr.open_group(self.store, mode="r+", consolidated=False)
            self.meta = meta
            if meta["source"] != source.name:
                raise StoreError(f"{url} holds source {meta['source']!r}, not {source.name!r}")
            self._set_channels(source.channels())
        self.channel_map = self._channel_map(source.channels())
        n = self.count("record")
        self.known_ids = set(self.group["record_id"][:n].tolist()) if n else set()
        m = self.count("ingested_unit")
        self.ingested = set(zip(self.group["unit_name"][:m].tolist(),
                                self.group["unit_fingerprint"][:m].tolist(), strict=True)) if m else set()

    # -- public ---------------------------------------------------------------------------------------
    def count(self, dim: str) -> int:
        """Committed length along ``dim``."""
        return int(self.meta["commit"][dim])

    def append(self, validated: Validated, units: list) -> None:
        """Write one shard's validated records, its quarantine rows and its units, then commit."""
        es = validated.elements
        records = es.records.copy()
        records["row_size"] = es.row_size
        records["split"] = assign_split(records["record_id"])
        records["source_file"] = records["source_file"].astype(str)
        self._ensure_record_columns(records)
        self._append_dim("element", {k: getattr(es, k) for k in ELEMENT_DTYPES}
                         | {"channel": self.channel_map[es.channel.astype(np.int64)].astype(np.int16)})
        self._append_dim("record", {c: self._record_column(records, c) for c in self._record_arrays()})
        q = validated.quarantine
        self._append_dim("quarantine", {f"quarantine_{c}": q[c].to_numpy() for c in QUARANTINE_DTYPES})
        self._append_dim("ingested_unit", {"unit_name": np.array([u.name for u in units], dtype=object),
                                           "unit_fingerprint": np.array([u.fingerprint for u in units],
                                                                        dtype=object)})
        self.known_ids.update(records["record_id"].tolist())
        self.ingested.update((u.name, u.fingerprint) for u in units)
        self._commit()

    def update_statistics(self) -> pd.DataFrame:
        """Recompute the channel table's normalisation statistics on the train split, and commit."""
        n_el, n_rec = self.count("element"), self.count("record")
        table = self.channel_table()
        if n_el:
            row_size = self.group["row_size"][:n_rec]
            train_record = self.group["split"][:n_rec] == "train"
            train = np.repeat(train_record, row_size)
            stats = channel_statistics(self.group["channel"][:n_el], self.group["value"][:n_el],
                                       self.group["error"][:n_el], table, train)
            for col in ("softening", "location", "scale", "count"):
                name, dtype = CHANNEL_COLUMNS[col]
                self.group[name][:] = stats[col].to_numpy().astype(dtype)
        self.meta["statistics_updated"] = _now()
        self._commit()
        return self.channel_table()

    def channel_table(self) -> pd.DataFrame:
        n = self.count("channel")
        return pd.DataFrame({col: self.group[name][:n] for col, (name, _) in CHANNEL_COLUMNS.items()})

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- arrays ---------------------------------------------------------------------------------------
    def _new_meta(self, source, source_path: str) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": source.name,
            "source_path": str(source_path), "time_unit": source.time_unit,
            "time_reference": source.time_reference, "created": _now(),
            "record_columns": [], "commit": dict.fromkeys(DIMENSIONS, 0) | {"generation": 0},
        }

    def _array(self, name: str, dtype, dim: str, attrs: dict | None = None) -> None:
        big = dim == "element"
        self.group.create_array(
            name, shape=(0,), dtype=dtype, dimension_names=[dim], fill_value=_fill(dtype),
            chunks=(ELEMENT_CHUNK if big else TABLE_CHUNK,), shards=(ELEMENT_SHARD if big else TABLE_SHARD,),
            compressors=ZstdCodec(level=3), attributes=attrs or {}, overwrite=True)

    def _create_arrays(self) -> None:
        for name, dtype in ELEMENT_DTYPES.items():
            attrs = dict(ELEMENT_ATTRS[name])
            if name == "time":
                attrs["units"] = self.meta["time_unit"]
            self._array(name, dtype, "element", attrs)
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
                self.group[col][:] = np.full(n, _fill(dtype), dtype=object if dtype is str else dtype)
            self.meta["record_columns"].append(col)

    def _record_column(self, records: pd.DataFrame, col: str) -> np.ndarray:
        arr = self.group[col]
        if col not in records:
            return np.full(len(records), arr.fill_value)
        if arr.dtype.kind in "fiu":
            return pd.to_numeric(records[col], errors="coerce").to_numpy(arr.dtype)
        return records[col].fillna("").astype(str).to_numpy(dtype=object)

    def _append_dim(self, dim: str, columns: dict[str, np.ndarray]) -> None:
        start = self.count(dim)
        n = len(next(iter(columns.values())))
        for name, data in columns.items():
            arr = self.group[name]
            arr.resize((start + n,))  # also drops anything a killed writer left beyond the commit
            if n:
                arr[start:start + n] = data
        self.meta["commit"][dim] = start + n  # takes effect at the next _commit()

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
                    "location": np.zeros(len(new)), "scale": np.ones(len(new)), "count": np.zeros(len(new))}
            self._append_dim("channel", {name: np.asarray(cols[col], dtype=object if dt is str else dt)
                                         for col, (name, dt) in CHANNEL_COLUMNS.items()})

    def _channel_map(self, channels: list[Channel]) -> np.ndarray:
        names = list(self.group["channel_name"][:self.count("channel")])
        return np.array([names.index(c.name) for c in channels], dtype=np.int64)

    # -- commit ---------------------------------------------------------------------------------------
    def _commit(self) -> None:
        """The commit point: one atomic write of the root document (shapes + counts + attrs)."""
        self.meta["commit"]["generation"] += 1
        self.meta["updated"] = _now()
        arrays = {}
        for name in self.group.array_keys():
            doc = _zarr.get_json(self.store, f"{name}/zarr.json")
            dim = doc["dimension_names"][0]
            if doc["shape"][0] != self.count(dim):
                raise StoreError(f"{self.url}: array {name} has {doc['shape'][0]} entries, "
                                 f"commit says {self.count(dim)} along {dim}")
            arrays[name] = doc
        attrs = {
            "Conventions": "CF-1.11", "featureType": "timeSeries",
            "title": f"Percival element set: {self.meta['source']}",
            "history": f"{self.meta['created']} created by percival; {self.meta['updated']} last commit",
            "percival": self.meta,
        }
        root = {"zarr_format": 3, "node_type": "group", "attributes": attrs,
                "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": arrays}}
        _zarr.put_json(self.store, "zarr.json", root)


def _acquire_lock(url: str):
    """An exclusive lock beside a local store; released by the OS if the process dies."""
    if "://" in url and not url.startswith("file://"):
        return None
    path = url.removeprefix("file://").rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open for the writer's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreError(f"{url} is being written by another process (lock {path})") from None
    return f

