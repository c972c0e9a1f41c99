"""The store's layout: which arrays live along which dimension, their dtypes and chunking.

One Zarr v3 group, CF-1.11 contiguous ragged array:

- ``element``: ``time``, ``channel_index``, ``value``, ``error``, ``coord`` (:data:`ELEMENT_ARRAYS`: stores of
  format 1.0 call ``channel_index`` ``channel``, which CF forbids beside the dimension ``channel``);
- ``record``: ``record_id``, ``row_size`` (``sample_dimension = "element"``), ``split``, ``source_file``,
  ``t0`` and the source's labels;
- ``channel``: the channel table, ``channel_name``, ``modality``, ``unit``, ``channel_coord``,
  ``transform``, ``softening``, ``location``, ``scale``, ``train_count``, ``valid_min``, ``valid_max``,
  ``bound_width`` (:mod:`datasets.normalise`);
- ``quarantine``: ``quarantine_source_file``, ``quarantine_row``, ``quarantine_record_id``,
  ``quarantine_field``, ``quarantine_reason``, ``quarantine_elements``;
- ``ingested_unit``: ``unit_name``, ``unit_fingerprint`` (what has been ingested, for idempotent re-runs).

Attributes are CF's: ``time`` has CF ``units`` (:func:`cf_time_units`), and the ``percival`` group attribute
(the commit record) is a JSON string, so ``xarray.open_zarr(url).to_netcdf(path)`` writes the store as is.

Element arrays are chunked by 256 Ki elements inside 2 Mi-element shards (zstd): a shard is one file
or object of a few MB, a chunk the unit of partial reads.
"""

from __future__ import annotations

import hashlib

import numpy as np

from datasets.format import ELEMENT_DTYPES

#: element field -> its array in a store (format >= 1.1)
ELEMENT_ARRAYS = {k: "channel_index" if k == "channel" else k for k in ELEMENT_DTYPES}
#: the same in stores of format 1.0, which still open
OLD_ELEMENT_ARRAYS = {k: k for k in ELEMENT_DTYPES}

ELEMENT_ATTRS = {
    "time": {"long_name": "time of the measurement", "axis": "T"},  # CF units and comment: time_attrs
    "channel": {"long_name": "index into the channel table (dimension channel)"},
    "value": {"long_name": "measured value, in the channel's unit", "coordinates": "time channel_index"},
    "error": {"long_name": "1-sigma measurement uncertainty, in the channel's unit; NaN = not given",
              "coordinates": "time channel_index"},
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

#: CF names of the time units sources declare (astropy strings)
CF_TIME_UNITS = {"d": "days", "day": "days", "h": "hours", "hour": "hours", "min": "minutes", "s": "seconds"}


def cf_time_units(time_unit: str, epoch: str | None) -> str:
    """CF ``units`` of a time in ``time_unit`` (astropy) counted from ``epoch`` (ISO date-time, or None where
    time counts from an event of each record, such as ICU admission: then a plain duration, e.g. "hours")."""
    name = CF_TIME_UNITS.get(time_unit, time_unit)
    return f"{name} since {epoch}" if epoch else name


def time_attrs(meta: dict) -> dict:
    """CF attributes of a time array of a store with ``percival`` metadata ``meta``: ``units`` (e.g. "days since
    1858-11-17 00:00:00" for MJD, "hours" for hours since each stay's admission), ``calendar`` and
    ``standard_name`` where an epoch makes it a date, and the reference in words."""
    epoch, reference = meta.get("time_epoch"), meta.get("time_reference")
    attrs = {"units": cf_time_units(meta["time_unit"], epoch),
             "comment": f"counted from {reference}; NaN for static elements" if reference else
             "NaN for static elements"}
    return attrs | ({"standard_name": "time", "calendar": "standard"} if epoch else {})


def element_arrays(group) -> dict[str, str]:
    """Element field -> array name in the store ``group`` (a format 1.0 store names ``channel_index``
    ``channel``)."""
    return OLD_ELEMENT_ARRAYS if "channel_index" not in group.array_keys() else ELEMENT_ARRAYS


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


__all__ = ["ELEMENT_DTYPES", "assign_split", "cf_time_units", "element_arrays", "time_attrs"]
