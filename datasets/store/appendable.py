"""An append-only Zarr v3 group with an explicit commit point: the one store-writing mechanism.

Every Percival store (the ingested element sets, the reconstructions) is a group of arrays that grow along
named dimensions. The group's root ``zarr.json`` holds the consolidated metadata (every array's shape) and
the ``percival`` attribute, whose ``commit`` entry counts the committed length of each dimension. Readers
(``xarray.open_zarr``, ``zarr.open_group``) use the consolidated metadata, so they see committed shapes only.
An append

1. resizes arrays and writes the new rows beyond the committed length (a partly filled last shard is
   rewritten as a whole file, atomically, with its committed part unchanged);
2. :meth:`AppendableGroup.commit` rewrites the root ``zarr.json`` in one atomic write: the commit point.

A writer killed at any moment leaves the last commit intact; the next writer starts from the committed
counts and overwrites whatever lies beyond them. One writer at a time: a lock file beside local stores.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os

import numpy as np
from zarr.codecs import ZstdCodec

from datasets.store import _zarr

BIG_CHUNK, BIG_SHARD = 1 << 18, 1 << 21  # element-like dimensions: 256 Ki per chunk, 2 Mi per shard
TABLE_CHUNK, TABLE_SHARD = 1 << 14, 1 << 17


class StoreError(RuntimeError):
    """A store that cannot be opened or appended to, with the reason."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def fill_value(dtype) -> object:
    return "" if dtype is str else (np.nan if np.dtype(dtype).kind == "f" else 0)


class AppendableGroup:
    """Open the group at ``url`` for appending, or create it with ``new_meta`` (a JSON-able dict).

    ``created`` tells whether it was created now (the caller then creates its arrays and commits).
    ``meta`` is the ``percival`` attribute; ``meta["commit"]`` the committed length of each dimension.
    """

    def __init__(self, url: str, new_meta: dict, dimensions: tuple[str, ...], storage_options: dict | None = None,
                 attrs: dict | None = None):
        self.url = url
        self.attrs = dict(attrs or {})
        self._lock = _acquire_lock(url)
        self.store = _zarr.make_store(url, read_only=False, storage_options=storage_options)
        root = _zarr.get_json(self.store, "zarr.json")
        meta = (root or {}).get("attributes", {}).get("percival")
        self.created = meta is None or "commit" not in meta
        if self.created:  # new, or a first commit that never finished: start afresh
            self.group = _zarr.open_group(self.store, mode="w", consolidated=False)
            self.meta = dict(new_meta, created=now(), commit=dict.fromkeys(dimensions, 0) | {"generation": 0})
        else:
            self.group = _zarr.open_group(self.store, mode="r+", consolidated=False)
            self.meta = meta
            for d in dimensions:
                self.meta["commit"].setdefault(d, 0)

    def count(self, dim: str) -> int:
        """Committed length along ``dim`` (plus rows appended since the last commit)."""
        return int(self.meta["commit"][dim])

    def create_array(self, name: str, dtype, dim: str, attrs: dict | None = None, width: int | None = None,
                     big: bool = False) -> None:
        """A new empty array along ``dim``; ``width`` makes it 2-D (``dim`` x ``<name>_index``)."""
        shape, dims = (0,), [dim]
        chunk, shard = (BIG_CHUNK, BIG_SHARD) if big else (TABLE_CHUNK, TABLE_SHARD)
        chunks, shards = (chunk,), (shard,)
        if width is not None:
            rows = max(1, chunk // max(width, 1))
            shape, dims, chunks, shards = (0, width), [dim, f"{name}_index"], (rows, width), (rows * 8, width)
        self.group.create_array(name, shape=shape, dtype=dtype, dimension_names=dims, fill_value=fill_value(dtype),
                                chunks=chunks, shards=shards, compressors=ZstdCodec(level=3),
                                attributes=attrs or {}, overwrite=True)

    def append(self, dim: str, columns: dict[str, np.ndarray]) -> None:
        """Write rows beyond the committed length of ``dim``; visible after :meth:`commit`."""
        start = self.count(dim)
        n = len(next(iter(columns.values())))
        for name, data in columns.items():
            arr = self.group[name]
            arr.resize((start + n, *arr.shape[1:]))  # also drops what a killed writer left beyond the commit
            if n:
                arr[start:start + n] = data
        self.meta["commit"][dim] = start + n

    def commit(self) -> None:
        """The commit point: one atomic write of the root document (shapes + counts + attrs)."""
        self.meta["commit"]["generation"] += 1
        self.meta["updated"] = now()
        arrays = {}
        for name in self.group.array_keys():
            doc = _zarr.get_json(self.store, f"{name}/zarr.json")
            dim = doc["dimension_names"][0]
            if doc["shape"][0] != self.count(dim):
                raise StoreError(f"{self.url}: array {name} has {doc['shape'][0]} entries, "
                                 f"the commit says {self.count(dim)} along {dim}")
            arrays[name] = doc
        root = {"zarr_format": 3, "node_type": "group", "attributes": {**self.attrs, "percival": self.meta},
                "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": arrays}}
        _zarr.put_json(self.store, "zarr.json", root)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


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
