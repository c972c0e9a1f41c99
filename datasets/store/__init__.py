"""The Zarr store of element sets: a crash-safe appending writer and a reader for notebooks."""

from datasets.store._icechunk import StoreConflict
from datasets.store.appendable import AppendableGroup, StoreError
from datasets.store.reader import Store, open_store
from datasets.store.writer import StoreWriter

__all__ = ["AppendableGroup", "Store", "StoreConflict", "StoreError", "StoreWriter", "open_store"]
