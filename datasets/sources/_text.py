"""Helpers shared by the astronomy and generic-table sources: line-numbered text tables and quarantine rows.

Text files are parsed so that every element keeps its 1-based line number. Lines are split and checked
with vectorised pandas string operations, then the well-formed ones are parsed by one ``read_csv`` call.

What counts as what (the same rule in every source that uses these helpers):

- a data line that cannot be turned into an element (wrong number of fields, bytes that are not UTF-8,
  a time or value that is text rather than a number) is dropped while reading and reported by a
  quarantine row that names its line, with ``elements`` 1 (one line would have been one element), so
  that validation's per-file reconciliation counts it as read and quarantined;
- an element whose numbers parse but are bad (NaN or infinite value, zero or negative error, unknown
  channel) is passed on, and :func:`datasets.schema.validate` quarantines and counts it.
"""

from __future__ import annotations

import gzip
import io
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from datasets.format import QUARANTINE_COLUMNS, RawElements
from datasets.sources import files
from datasets.sources.base import Unit, unreadable

#: at most this many quarantine rows per file and kind of problem; the rest are summarised in one more row
MAX_ROWS_PER_REASON = 100


class MissingColumns(ValueError):
    """A table lacks columns the source needs (the message names the file and the columns)."""

    def __init__(self, file: str, missing: Sequence[str], found: Sequence[str]) -> None:
        shown = ", ".join(repr(c) for c in list(found)[:12]) + (", ..." if len(found) > 12 else "")
        super().__init__(f"{file}: missing column(s) {', '.join(repr(c) for c in missing)} "
                         f"(found {len(found)} column(s): {shown}; is the delimiter right?)")


def read_bytes(unit: Unit, storage_options: files.StorageOptions = None) -> bytes:
    """The bytes of a unit: a plain or gzip-compressed file, or a member of a zip file (local or a URL)."""
    with files.open_input(unit.path, storage_options) as f:
        if unit.member:
            with zipfile.ZipFile(f) as z:
                data = z.read(unit.member)
        else:
            data = f.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


@dataclass
class TextFile:
    """A decoded text unit: its text, every line (index: 1-based line number, ``\\r`` stripped) and the
    quarantine rows of lines dropped while decoding."""

    text: str
    lines: pd.Series
    quarantine: list[dict]

    def content(self, comment: str | None = "#") -> pd.Series:
        """The lines that are neither blank nor comments (nor dropped while decoding)."""
        keep = self.lines.str.strip() != ""
        if comment:
            keep &= ~self.lines.str.startswith(comment)
        return self.lines[keep]


def read_text(unit: Unit, comment: str | None = "#", storage_options: files.StorageOptions = None) -> TextFile:
    """Decode a text unit. Lines holding bytes that are not UTF-8 are dropped and reported ("line is not
    valid UTF-8"; 1 element each unless a ``comment`` line); the rest of the file is still read. An empty
    (or all-blank) file raises ``ValueError``.
    """
    data = read_bytes(unit, storage_options)
    if not data.strip():
        raise ValueError("empty file")
    try:
        text, bad_bytes = data.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad_bytes = data.decode("utf-8", errors="replace"), True
    lines = pd.Series(text.split("\n")).str.rstrip("\r")
    lines.index = np.arange(1, len(lines) + 1)
    if not bad_bytes:
        return TextFile(text, lines, [])
    bad = lines.str.contains("\ufffd", regex=False).to_numpy()
    data = ~lines[bad].str.startswith(comment).to_numpy() if comment else np.ones(bad.sum(), bool)
    rows = (line_rows(unit.name, lines.index[bad][data], "line is not valid UTF-8")
            + line_rows(unit.name, lines.index[bad][~data], "line is not valid UTF-8", elements=0))
    return TextFile(text, lines[~bad], rows)


def field_counts(lines: pd.Series, sep: str | None) -> np.ndarray:
    """Number of fields on each line (``sep=None``: runs of whitespace; quoted separators not counted)."""
    if sep is None:
        return lines.str.count(r"\S+").to_numpy()
    if lines.str.contains('"', regex=False).any():
        lines = lines.str.replace(r'"[^"]*"', '""', regex=True)
    return lines.str.count(re.escape(sep)).to_numpy() + 1


def parse_table(file: TextFile, lines: pd.Series, unit: Unit, sep: str | None,
                names: Sequence[str] | None = None, usecols: Sequence[str] | None = None,
                numeric: Sequence[str] = (), required: Sequence[str] = ()) -> tuple[pd.DataFrame, list[dict]]:
    """Parse ``lines`` (some lines of ``file``) into a DataFrame indexed by line number, and quarantine rows.

    ``names`` gives the columns; if it is None the first of ``lines`` is the header. Lines with the wrong
    number of fields are dropped and reported. ``usecols`` (a subset of the columns) limits what is kept;
    :class:`MissingColumns` is raised when the header lacks any of them or of ``required``. Columns are
    strings, except those in ``numeric`` when all their entries parse as floats (check with :func:`to_float`).
    The good lines are parsed straight from the file's text by one ``read_csv`` call that skips the rest.
    """
    if names is None:
        if len(lines) == 0:
            raise ValueError(f"{unit.name}: no table (no column header line)")
        names = [str(c) for c in _read_csv(lines.iloc[0], sep, None).iloc[0].fillna("")]
        lines = lines.iloc[1:]
    names = list(names)
    missing = [c for c in dict.fromkeys([*required, *(usecols or [])]) if c not in names]
    if missing:
        raise MissingColumns(unit.name, missing, names)
    counts = field_counts(lines, sep)
    good = counts == len(names)
    q = line_rows(unit.name, lines.index[~good],
                  [f"malformed line: {n} field(s), expected {len(names)}" for n in counts[~good]])
    lines = lines[good]
    if len(lines) == 0:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in (usecols or names)}), q
    parsed = np.zeros(file.text.count("\n") + 1, bool)
    parsed[lines.index.to_numpy() - 1] = True
    floats = {c: "float64" for c in numeric if c in (usecols or names)}
    try:
        df = _read_csv(file.text, sep, names, usecols, np.flatnonzero(~parsed), floats)
    except ValueError:  # some entry of a numeric column is text: keep strings, the caller reports it
        df = _read_csv(file.text, sep, names, usecols, np.flatnonzero(~parsed))
    if len(df) != len(lines):  # e.g. a quoted field spanning lines, or lone \r line ends
        raise ValueError(f"{unit.name}: parsed {len(df)} rows from {len(lines)} lines (quoted newlines?)")
    df.index = lines.index
    return df, q


def _read_csv(text: str, sep: str | None, names: Sequence[str] | None, usecols: Sequence[str] | None = None,
              skip: np.ndarray | None = None, dtype: dict | None = None) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), sep=r"\s+" if sep is None else sep, header=None, names=names,
                       usecols=usecols, skiprows=None if skip is None else skip.tolist(),
                       dtype={**{c: str for c in (usecols or names or [])}, **(dtype or {})},
                       skip_blank_lines=False, engine="c")


def to_float(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Floats of a column, and a mask of entries that hold text that is not a number.

    Empty fields and NaN/inf spellings are numbers here (NaN, +-inf); ``"abc"`` is not.
    """
    num = pd.to_numeric(column, errors="coerce")
    values = np.asarray(num, dtype=np.float64)
    return values, np.isnan(values) & column.notna().to_numpy()


def numeric_columns(df: pd.DataFrame, columns: Sequence[str], unit: Unit, required: Sequence[str] = (),
                    record_id: np.ndarray | str = "") -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:
    """Parse ``columns`` of ``df`` (strings) as floats; returns (values, keep mask, quarantine rows).

    A line is dropped when any of the columns holds text that is not a number, or when a column in
    ``required`` is empty (a measurement without a time, say).
    """
    out: dict[str, np.ndarray] = {}
    keep = np.ones(len(df), bool)
    rows: list[dict] = []
    lines = df.index.to_numpy()
    for c in columns:  # a few columns, each parsed whole
        values, bad = to_float(df[c])
        bad &= keep
        if bad.any():
            text = df[c][bad].astype(str).tolist()
            rows += line_rows(unit.name, lines[bad], [f"{c} {t!r} is not a number" for t in text],
                              _pick(record_id, bad), field=c)
        keep &= ~bad
        if c in required:
            empty = keep & np.isnan(values)
            rows += line_rows(unit.name, lines[empty], f"{c} is missing", _pick(record_id, empty), field=c)
            keep &= ~empty
        out[c] = values
    return out, keep, rows


def _pick(record_id: np.ndarray | str, mask: np.ndarray) -> np.ndarray | str:
    return record_id if isinstance(record_id, str) else record_id[mask]


def line_rows(file: str, lines: Sequence[int] | np.ndarray, reason: str | Sequence[str],
              record_id: str | Sequence[str] | np.ndarray = "", field: str = "line", elements: int = 1
              ) -> list[dict]:
    """Quarantine rows for lines dropped for one kind of problem, ``elements`` per line: one row per line
    for the first :data:`MAX_ROWS_PER_REASON` lines, then one row that counts all the others."""
    lines = np.asarray(lines, dtype=np.int64)
    if len(lines) == 0:
        return []
    df = pd.DataFrame({"source_file": file, "row": lines, "record_id": record_id, "field": field,
                       "reason": reason, "elements": elements})[QUARANTINE_COLUMNS]
    rows = df.iloc[:MAX_ROWS_PER_REASON].to_dict("records")
    if len(df) > MAX_ROWS_PER_REASON:
        more, n_more = df.iloc[MAX_ROWS_PER_REASON].to_dict(), len(df) - MAX_ROWS_PER_REASON
        more["reason"] += f" (and {n_more - 1} more lines with this kind of problem)"
        more["elements"] = n_more * elements
        rows.append(more)
    return rows


def elements(records: pd.DataFrame, record: ArrayLike, time: ArrayLike, channel: ArrayLike, value: ArrayLike,
             error: ArrayLike, coord: ArrayLike, row: ArrayLike, channel_name: ArrayLike | None = None,
             quarantine: list[dict] | None = None) -> RawElements:
    """:class:`RawElements` with the dtypes of the format (inputs broadcast from arrays or scalars)."""
    record = np.asarray(record, dtype=np.int64)
    n = len(record)

    def full(x: ArrayLike, dtype: type) -> np.ndarray:
        return np.broadcast_to(np.asarray(x, dtype=dtype), (n,)).copy()

    return RawElements(records.reset_index(drop=True), record, full(time, np.float64),
                       full(channel, np.int16), full(value, np.float32), full(error, np.float32),
                       full(coord, np.float32), full(row, np.int64),
                       channel_name=None if channel_name is None else full(channel_name, object),
                       quarantine=list(quarantine or []))


def read_each(units: Sequence[Unit], read_one: Callable[[Unit], RawElements],
              label_columns: Sequence[str] = ()) -> RawElements:
    """Read units one at a time; a unit whose read raises becomes one quarantine row (never an exception)."""
    parts = []
    for unit in units:  # one iteration per file
        try:
            parts.append(read_one(unit))
        except Exception as exc:  # any failure of one file must not stop the others
            parts.append(RawElements.empty([unreadable(unit, exc)], tuple(label_columns)))
    return concat(parts, label_columns)


def concat(parts: Sequence[RawElements], label_columns: Sequence[str] = ()) -> RawElements:
    """:meth:`RawElements.concat`, also for no parts (then the records still have the label columns)."""
    return RawElements.concat(list(parts)) if parts else RawElements.empty(label_columns=tuple(label_columns))
