"""The set-of-elements format: channels, records of elements, quarantine rows.

A *record* (one star, one ICU stay) is a variable-length set of *elements*. Every element has

=========  =======  ==========================================================================
field      dtype    meaning
=========  =======  ==========================================================================
time       float64  time in the source's time unit (MJD days for astronomy, hours since ICU
                    admission for PhysioNet); NaN for static elements (age, redshift, ...)
channel    int16    index into the channel table
value      float32  the measurement in the channel's physical unit
error      float32  1-sigma uncertainty in the same unit; NaN where the archive gives none
coord      float32  secondary coordinate: observed wavelength in Angstrom; NaN where meaningless
=========  =======  ==========================================================================

Records are stored as a CF "contiguous ragged array": the elements of record ``i`` are
``elements[offsets[i]:offsets[i + 1]]`` with ``offsets = concatenate([0], cumsum(row_size))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

FORMAT_NAME = "percival-element-set"
FORMAT_VERSION = "1.1"  # 1.1: CF names and units (channel_index, time units, a JSON percival attribute)

ELEMENT_DTYPES: dict[str, np.dtype] = {
    "time": np.dtype("float64"),
    "channel": np.dtype("int16"),
    "value": np.dtype("float32"),
    "error": np.dtype("float32"),
    "coord": np.dtype("float32"),
}

#: Columns of the quarantine table; one row may stand for many rejected elements (``elements``).
QUARANTINE_COLUMNS = ["source_file", "row", "record_id", "field", "reason", "elements"]


@dataclass(frozen=True)
class Channel:
    """One measured quantity.

    ``unit`` is an astropy unit string; ``coord`` the effective wavelength in Angstrom for photometric
    bands (NaN otherwise); ``transform`` is applied before normalisation: ``identity`` or ``asinh``
    (flux-like channels whose values span orders of magnitude and can be negative). ``valid_min`` /
    ``valid_max`` are the physical range in ``unit`` (CF's attributes; NaN where unbounded, e.g. a
    concentration has ``valid_min=0``, a saturation in % the range [0, 100]): a value outside it is
    quarantined at ingest, with the value and the range.
    """

    name: str
    modality: str
    unit: str
    coord: float = math.nan
    transform: str = "identity"
    valid_min: float = math.nan
    valid_max: float = math.nan

    def __post_init__(self):
        if self.valid_min > self.valid_max:  # False where either is NaN
            raise ValueError(f"channel {self.name!r}: valid_min {self.valid_min:g} is above valid_max "
                             f"{self.valid_max:g}")


@dataclass
class RawElements:
    """What a source reads from some files: one entry per element, in any order, not yet validated.

    ``record`` indexes ``records`` (a DataFrame with at least ``record_id`` and ``source_file``; other
    columns are record attributes such as labels and ``t0``). ``row`` is the 1-based line (or row, or
    pixel) number of the element in its source file, for quarantine messages. ``channel`` holds -1 for
    names that are not in the channel table; ``channel_name`` (optional) then says which name it was.
    ``quarantine`` holds problems found while reading (unreadable files, malformed rows).
    """

    records: pd.DataFrame
    record: np.ndarray
    time: np.ndarray
    channel: np.ndarray
    value: np.ndarray
    error: np.ndarray
    coord: np.ndarray
    row: np.ndarray
    channel_name: np.ndarray | None = None
    quarantine: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.record)
        for name in ("time", "channel", "value", "error", "coord", "row"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RawElements.{name} has {len(getattr(self, name))} entries, expected {n}")

    @classmethod
    def empty(cls, quarantine: list[dict] | None = None, label_columns: tuple[str, ...] = ()) -> RawElements:
        records = pd.DataFrame({"record_id": pd.Series([], dtype=object),
                                "source_file": pd.Series([], dtype=object),
                                **{c: pd.Series([], dtype=float) for c in label_columns}})
        z = np.zeros(0)
        return cls(records, z.astype(np.int64), z, z.astype(np.int16), z.astype(np.float32),
                   z.astype(np.float32), z.astype(np.float32), z.astype(np.int64),
                   quarantine=list(quarantine or []))

    @staticmethod
    def concat(parts: list[RawElements]) -> RawElements:
        """Concatenate reads of several files (record indices are shifted)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return RawElements.empty()
        shifts = np.cumsum([0] + [len(p.records) for p in parts[:-1]])
        names = None
        if any(p.channel_name is not None for p in parts):
            names = np.concatenate([p.channel_name if p.channel_name is not None
                                    else np.full(len(p.record), None, dtype=object) for p in parts])
        return RawElements(
            records=pd.concat([p.records for p in parts], ignore_index=True),
            record=np.concatenate([p.record + s for p, s in zip(parts, shifts, strict=True)]),
            time=np.concatenate([p.time for p in parts]),
            channel=np.concatenate([p.channel for p in parts]),
            value=np.concatenate([p.value for p in parts]),
            error=np.concatenate([p.error for p in parts]),
            coord=np.concatenate([p.coord for p in parts]),
            row=np.concatenate([p.row for p in parts]),
            channel_name=names,
            quarantine=[q for p in parts for q in p.quarantine],
        )


@dataclass
class ElementSet:
    """Validated records in CSR form: elements sorted by (record, time, channel, coord).

    ``records`` has one row per record (``record_id``, ``source_file``, labels, ``t0``, ...);
    ``row_size[i]`` is the number of elements of record ``i``. Element arrays have the dtypes of
    :data:`ELEMENT_DTYPES`.
    """

    records: pd.DataFrame
    row_size: np.ndarray
    time: np.ndarray
    channel: np.ndarray
    value: np.ndarray
    error: np.ndarray
    coord: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        """Start of each record's elements, plus the total (length ``n_records + 1``)."""
        return np.concatenate([[0], np.cumsum(self.row_size, dtype=np.int64)])

    @property
    def n_records(self) -> int:
        return len(self.row_size)

    @property
    def n_elements(self) -> int:
        return len(self.time)

    def elements(self, i: int) -> pd.DataFrame:
        """The elements of record ``i`` as a DataFrame."""
        o = self.offsets
        s = slice(o[i], o[i + 1])
        return pd.DataFrame({k: getattr(self, k)[s] for k in ELEMENT_DTYPES})
