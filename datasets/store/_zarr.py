"""Low-level Zarr helpers shared by the writer and the reader: opening by path or URL, raw keys."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterable

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore


class StoreError(RuntimeError):
    """A store that cannot be opened or appended to, with the reason."""


class SnapshotLocalStore(LocalStore):
    """A read-only local store that reads every file through one open handle for the store's lifetime.

    Writers replace files atomically (a temporary file, then a rename), but a sharded array is read in two
    steps -- the shard's index, then the chunk's bytes -- and an append that rewrites the shard between them
    would pair one version's index with the other's bytes (a reader racing an ingest saw "Zstd decompression
    error"). A held handle pins the version first read (POSIX keeps a replaced file's data while it is open);
    rows below the committed counts are the same in every version, so the pinned one is always right.
    """

    def __init__(self, root: str) -> None:
        super().__init__(root, read_only=True)
        self._files: dict[str, object] = {}
        self._files_lock = threading.Lock()

    def _read(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer:
        with self._files_lock:
            f = self._files.get(key)
            if f is None:
                f = self._files[key] = open(self.root / key, "rb")  # noqa: SIM115 - held for the snapshot
        fd = f.fileno()
        size = os.fstat(fd).st_size
        if byte_range is None:
            start, stop = 0, size
        elif isinstance(byte_range, RangeByteRequest):
            start, stop = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start, stop = byte_range.offset, size
        elif isinstance(byte_range, SuffixByteRequest):
            start, stop = max(0, size - byte_range.suffix), size
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return prototype.buffer.from_bytes(os.pread(fd, max(stop - start, 0), start))

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        try:
            return await asyncio.to_thread(self._read, key, prototype or default_buffer_prototype(), byte_range)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    def close(self) -> None:
        with self._files_lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
        super().close()

    def __del__(self) -> None:
        for f in getattr(self, "_files", {}).values():
            f.close()


def make_store(url: str, read_only: bool, storage_options: dict | None = None):
    """A Zarr store for a local path or an fsspec URL (``s3://bucket/x.zarr``, ``memory://x``)."""
    if "://" in url and not url.startswith("file://"):
        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    path = url.removeprefix("file://")
    return SnapshotLocalStore(path) if read_only else LocalStore(path, read_only=False)


def open_committed(url: str, storage_options: dict | None = None) -> zarr.Group | None:
    """The last commit of the store at ``url``, read-only (every shape is a committed one); None where there
    is no store. Object-store URLs are Icechunk repositories (their last snapshot); other stores carry their
    commit in the root document's consolidated metadata."""
    from datasets.store import _icechunk

    if _icechunk.is_transactional(url):
        store = _icechunk.readonly_store(url, storage_options)
        if store is None or get_json(store, "zarr.json") is None:
            return None
        return open_group(store, mode="r", consolidated=False)
    store = make_store(url, read_only=True, storage_options=storage_options)
    try:
        if get_json(store, "zarr.json") is None:
            return None
    except NotADirectoryError:
        return None
    # counts and shapes from one read of the root document: a commit landing between two reads would pair
    # one commit's counts with the next one's arrays
    try:
        return open_group(store, mode="r", consolidated=True)
    except ValueError:  # no consolidated metadata: a plain Zarr group, not a Percival commit
        raise StoreError(f"{url}: not a Percival store, or its first commit never finished") from None


def get_json(store, key: str) -> dict | None:
    """The JSON document at ``key``, or None where there is none (or no store at all)."""
    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except FileNotFoundError:
        return None
    return None if buf is None else json.loads(buf.to_bytes())


def put_json(store, key: str, doc: dict) -> None:
    """Write one JSON document; LocalStore writes to a temporary file and renames (atomic), object
    stores replace an object in one PUT."""
    data = json.dumps(doc, indent=1, allow_nan=True).encode()
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def percival_meta(attrs) -> dict | None:
    """The ``percival`` attribute (the commit record) of a group's ``attrs``: a JSON string, so that netCDF can
    hold it; a dict in stores written before it was one."""
    meta = attrs.get("percival")
    return json.loads(meta) if isinstance(meta, str) else meta


def open_group(store, mode: str, consolidated: bool) -> zarr.Group:
    return zarr.open_group(store=store, mode=mode, zarr_format=3, use_consolidated=consolidated)


def content_hash(group: zarr.Group) -> str:
    """SHA-256 over every array of ``group`` (names, dtypes, values; attributes and timestamps excluded)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for name in sorted(group.array_keys()):
        data = group[name][:]
        h.update(name.encode())
        if data.dtype.kind in "TUO":
            h.update("\x1f".join(map(str, data.ravel().tolist())).encode())
        else:
            h.update(str(data.dtype).encode())
            h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()
