"""Low-level Zarr helpers shared by the writer and the reader: opening by path or URL, raw keys."""

from __future__ import annotations

import json

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore


def make_store(url: str, read_only: bool, storage_options: dict | None = None):
    """A Zarr store for a local path or an fsspec URL (``s3://bucket/x.zarr``, ``memory://x``)."""
    if "://" in url and not url.startswith("file://"):
        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    path = url.removeprefix("file://")
    return LocalStore(path, read_only=read_only)


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
