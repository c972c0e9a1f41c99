"""The Zarr store of element sets: a crash-safe appending writer and a reader for notebooks."""

from datasets.store.reader import Store, open_store
from datasets.store.writer import StoreError, StoreWriter

__all__ = ["Store", "StoreError", "StoreWriter", "open_store"]
