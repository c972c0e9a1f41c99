"""The store's layout: which arrays live along which dimension, their dtypes and chunking.

One Zarr v3 group, CF-1.11 contiguous ragged array:

- ``element``: ``time``, ``channel``, ``value``, ``error``, ``coord``;
- ``record``: ``record_id``, ``row_size`` (``sample_dimension = "element"``), ``split``, ``source_file``,
  ``t0`` and the source's labels;
- ``channel``: the channel table, ``channel_name``, ``modality``, ``unit``, ``channel_coord``,
  ``transform``, ``softening``, ``location``, ``scale``, ``train_count``, ``valid_min``, ``valid_max``,
  ``bound_width`` (:mod:`datasets.normalise`);
- ``quarantine``: ``quarantine_source_file``, ``quarantine_row``, ``quarantine_record_id``,
  ``quarantine_field``, ``quarantine_reason``, ``quarantine_elements``;
- ``ingested_unit``: ``unit_name``, ``unit_fingerprint`` (what has been ingested, for idempotent re-runs).

Element arrays are chunked by 256 Ki elements inside 2 Mi-element shards (zstd): a shard is one file
or object of a few MB, a chunk the unit of partial reads.
"""

from __future__ import annotations

import hashlib

import numpy as np

from datasets.format import ELEMENT_DTYPES

ELEMENT_ATTRS = {
    "time": {"long_name": "time of the measurement", "_note": "NaN for static elements"},
    "channel": {"long_name": "index into the channel table (dimension channel)"},
    "value": {"long_name": "measured value, in the channel's unit"},
    "error": {"long_name": "1-sigma measurement uncertainty, in the channel's unit; NaN = not given"},
    "coord": {"long_name": "secondary coordinate: observed wavelength", "units": "Angstrom"},
}

CHANNEL_COLUMNS = {  # channel table column -> (store array name, dtype)
    "name": ("channel_name", str), "modality": ("modality", str), "unit": ("unit", str),
    "coord": ("channel_coord", np.float64), "transform": ("transform", str),
    "softening": ("softening", np.float64), "location": ("location", np.float64),
    "scale": ("scale", np.float64), "count": ("train_count", np.int64),
    "valid_min": ("valid_min", np.float64), "valid_max": ("valid_max", np.float64),
    "bound_width": ("bound_width", np.float64),
}
#: channel-table columns added after stores were first written: absent arrays read as these values
LATER_CHANNEL_COLUMNS = {"valid_min": np.nan, "valid_max": np.nan, "bound_width": np.nan}
QUARANTINE_DTYPES = {"source_file": str, "row": np.int64, "record_id": str, "field": str, "reason": str,
                     "elements": np.int64}
UNIT_ARRAYS = {"unit_name": str, "unit_fingerprint": str}

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def assign_split(record_ids) -> np.ndarray:
    """Stable train/val/test split (80/10/10) from a hash of each record id.

    The split of a record depends on its id only, so adding records never moves old ones.
    """
    u = np.array([int.from_bytes(hashlib.blake2b(str(r).encode(), digest_size=8).digest(), "little")
                  for r in record_ids], dtype=np.float64) / 2.0**64
    edges = np.cumsum(SPLIT_FRACTIONS)[:-1]
    return np.asarray(SPLITS, dtype=object)[np.searchsorted(edges, u, side="right")]


__all__ = ["ELEMENT_DTYPES", "assign_split"]
