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
counts, cuts back whatever lies beyond them and overwrites it.

One writer at a time: an exclusive lock file beside local stores (released by the OS when its holder dies).
A second writer *waits* for the lock, up to ``lock_timeout`` seconds (default ``PERCIVAL_LOCK_TIMEOUT``, else
600 s), then fails with :class:`StoreError`: scheduled runs that overlap (a nightly ingest still running when
the next one starts, two reconstruct runs into one output) queue instead of failing, and the later one
starts from the earlier one's last commit. A writer that the same thread already holds is refused at once,
since waiting for itself could never end.

In object storage (``s3://``, ``gs://``) there is no atomic rename and no lock: there the group is an
Icechunk repository (:mod:`datasets.store._icechunk`) and the commit point is an Icechunk commit, which
publishes every write since the last one as one snapshot. A killed writer's writes are never published; of
two concurrent writers the later commit fails with :class:`~datasets.store._icechunk.StoreConflict`, and
re-running it continues from the earlier one's commit.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import threading
import time

import numpy as np
from zarr.codecs import ZstdCodec

from datasets.store import _icechunk, _zarr
from datasets.store._zarr import StoreError

BIG_CHUNK, BIG_SHARD = 1 << 18, 1 << 21  # element-like dimensions: 256 Ki per chunk, 2 Mi per shard
TABLE_CHUNK, TABLE_SHARD = 1 << 14, 1 << 17


#: seconds a second writer waits for a store's lock before giving up (environment: PERCIVAL_LOCK_TIMEOUT)
DEFAULT_LOCK_TIMEOUT = 600.0


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
                 attrs: dict | None = None, lock_timeout: float | None = None):
        self.url = url
        self.attrs = dict(attrs or {})
        self._lock = _acquire_lock(url, lock_timeout)
        try:
            self._open(new_meta, dimensions, storage_options)
        except BaseException:  # an I/O error while opening must not keep the lock (a retry would wait on it)
            self.close()
            raise

    def _open(self, new_meta: dict, dimensions: tuple[str, ...], storage_options: dict | None) -> None:
        # object stores: an Icechunk transaction is the commit point (see datasets.store._icechunk)
        self.transaction = _icechunk.Transaction(self.url, storage_options) if _icechunk.is_transactional(
            self.url) else None
        self.store = self.transaction.store if self.transaction else _zarr.make_store(
            self.url, read_only=False, storage_options=storage_options)
        root = _zarr.get_json(self.store, "zarr.json")
        meta = _zarr.percival_meta((root or {}).get("attributes", {}))
        self.created = meta is None or "commit" not in meta
        if self.created:  # new, or a first commit that never finished: start afresh
            self.group = _zarr.open_group(self.store, mode="w", consolidated=False)
            self.meta = dict(new_meta, created=now(), commit=dict.fromkeys(dimensions, 0) | {"generation": 0})
        else:
            self.group = _zarr.open_group(self.store, mode="r+", consolidated=False)
            self.meta = meta
            for d in dimensions:
                self.meta["commit"].setdefault(d, 0)
            self._roll_back()

    def _roll_back(self) -> None:
        """Cut arrays back to the committed counts: a killed writer may have resized some beyond them, and a
        commit that appends to fewer dimensions than it did must not find (and refuse) their leftovers."""
        commit = self.meta["commit"]
        for name in self.group.array_keys():
            arr = self.group[name]
            n = commit.get(arr.metadata.dimension_names[0]) if arr.metadata.dimension_names else None
            if n is not None and arr.shape[0] != n:
                arr.resize((int(n), *arr.shape[1:]))

    def count(self, dim: str) -> int:
        """Committed length along ``dim`` (plus rows appended since the last commit)."""
        return int(self.meta["commit"][dim])

    def create_array(self, name: str, dtype, dim: str, attrs: dict | None = None, width: int | None = None,
                     big: bool = False, width_dim: str | None = None) -> None:
        """A new empty array along ``dim``; ``width`` makes it 2-D (``dim`` x ``width_dim``, by default
        ``<name>_index``)."""
        shape, dims = (0,), [dim]
        chunk, shard = (BIG_CHUNK, BIG_SHARD) if big else (TABLE_CHUNK, TABLE_SHARD)
        chunks, shards = (chunk,), (shard,)
        if width is not None:
            rows = max(1, chunk // max(width, 1))
            dims = [dim, width_dim or f"{name}_index"]
            shape, chunks, shards = (0, width), (rows, width), (rows * 8, width)
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
        """The commit point: one atomic write of the root document (shapes + counts + attrs), or, in an
        object store, one Icechunk commit (raises :class:`StoreConflict` where another writer came first)."""
        self.meta["commit"]["generation"] += 1
        self.meta["updated"] = now()
        if self.transaction is not None:
            self._commit_transaction()
            return
        arrays = {}
        for name in self.group.array_keys():
            doc = _zarr.get_json(self.store, f"{name}/zarr.json")
            self._check_length(name, doc["shape"][0], doc["dimension_names"][0])
            arrays[name] = doc
        root = {"zarr_format": 3, "node_type": "group", "attributes": self._attributes(),
                "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": arrays}}
        _zarr.put_json(self.store, "zarr.json", root)

    def _attributes(self) -> dict:
        return {**self.attrs, "percival": json.dumps(self.meta, allow_nan=True)}

    def _check_length(self, name: str, length: int, dim: str) -> None:
        """Every array of a commit has exactly the committed length of its dimension."""
        if length != self.count(dim):
            raise StoreError(f"{self.url}: array {name} has {length} entries, the commit says {self.count(dim)} "
                             f"along {dim}")

    def _commit_transaction(self) -> None:
        for name in self.group.array_keys():
            arr = self.group[name]
            self._check_length(name, arr.shape[0], arr.metadata.dimension_names[0])
        self.group.attrs.update(self._attributes())
        counts = ", ".join(f"{k} {v}" for k, v in self.meta["commit"].items() if k != "generation")
        self.transaction.commit(f"percival commit {self.meta['commit']['generation']}: {counts}")
        self.store = self.transaction.store
        self.group = _zarr.open_group(self.store, mode="r+", consolidated=False)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class _Lock:
    """An open lock file holding ``flock``; remembers its thread so that a nested writer fails fast."""

    _held: dict[str, int] = {}  # lock path -> id of the thread holding it (this process)
    _guard = threading.Lock()

    def __init__(self, path: str, f):
        self.path, self.f = path, f

    def close(self) -> None:
        with self._guard:
            self._held.pop(self.path, None)
        self.f.close()


def lock_timeout_default() -> float:
    return float(os.environ.get("PERCIVAL_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT))


def _acquire_lock(url: str, timeout: float | None = None) -> _Lock | None:
    """An exclusive lock beside a local store, waited for up to ``timeout`` seconds; released by the OS if
    the holding process dies. Object stores (s3://, memory://) have no lock: one writer is the caller's job."""
    if "://" in url and not url.startswith("file://"):
        return None
    path = os.path.abspath(url.removeprefix("file://").rstrip("/") + ".lock")
    timeout = lock_timeout_default() if timeout is None else timeout
    with _Lock._guard:
        if _Lock._held.get(path) == threading.get_ident():
            raise StoreError(f"{url} is being written by another process or, as here, by a writer this thread "
                             f"still holds open (lock {path}): waiting for itself would never end")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open for the writer's lifetime
    deadline, pause = time.monotonic() + timeout, 0.01
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                raise StoreError(f"{url} is being written by another process (lock {path}); waited "
                                 f"{timeout:g} s (PERCIVAL_LOCK_TIMEOUT)") from None
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 2, 0.5)
    with _Lock._guard:
        _Lock._held[path] = threading.get_ident()
    return _Lock(path, f)
