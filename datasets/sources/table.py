"""Any long table (one measurement per row) in CSV, CSV.gz or Parquet, mapped by constructor options.

    get_source("table", record_id="star", time="mjd", channel="band", value="mag", error="mag_err",
               unit="unit", coord="wavelength", labels=["field"], time_unit="d")

Options name columns of the files; they are the whole configuration, no code is needed:

- ``record_id``, ``time``, ``channel``, ``value`` (required columns); ``error``, ``coord``, ``t0``
  (optional columns; NaN where absent or empty). An empty ``time`` makes a static element (time NaN);
  with ``time_format="datetime"`` times (and ``t0``) are timestamps, converted to MJD days.
- ``unit``: a column of per-row astropy unit strings, or a dict channel -> unit (missing channels: ``""``,
  dimensionless). With a column, a channel's unit is its most frequent one; rows in another unit are
  converted to it (astropy), or get channel -1 (quarantined as ``"name [unit]"``) if they cannot be.
- ``modality``: a column, or a dict channel -> modality; otherwise ``default_modality``.
- ``labels``: record attribute columns (first non-empty value per record); a list infers float (all
  values numbers) or str per file, a dict ``{column: "float" | "str"}`` fixes the type.
- ``transforms`` (channel -> ``identity``/``asinh``), ``channel_coords`` (channel -> effective
  wavelength, Angstrom; also used as the element ``coord`` when there is no ``coord`` column),
  ``channel_names`` (fix the channel table and its order; other channels are quarantined), ``sep``
  (CSV delimiter, ``None`` for whitespace), ``time_unit``, ``time_reference``; ``channel_table`` (a list
  of :class:`~datasets.format.Channel` fields as dicts) fixes the whole channel table, no learning.
- Physical ranges (CF ``valid_min`` / ``valid_max``, in the channel's unit; values outside are quarantined
  with the value and the range): ``valid_min`` / ``valid_max`` (a number for every channel, or a dict
  channel -> number; NaN or absent = unbounded), and ``nonnegative`` (``True`` for every channel, or a list
  of channels: ``valid_min`` 0 unless given).

:meth:`TableSource.discover` lists the files (a file, or the ``.csv``, ``.csv.gz``, ``.tsv``, ``.parquet``
files of a directory, sorted) and learns the channel table from their channel/unit/modality columns:
channel names sorted, so indices do not depend on file order (pass ``channel_names`` to keep them stable
when new data adds channels). Other processes that read shards must index channels the same way: build
them from :meth:`TableSource.resolved_options` (the options plus the learnt ``channel_table``).

A record lives in one file: the same id in two files is two records and validation keeps the first.
Malformed CSV lines (wrong number of fields, non-UTF-8 bytes, text where a number belongs) become
quarantine rows naming the line; a file lacking a required column becomes one quarantine row naming the
file and the column. ``row`` = 1-based line number (CSV) or row (Parquet).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import astropy.units as u
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from datasets.format import Channel, RawElements
from datasets.sources import _text, files
from datasets.sources.base import MJD_EPOCH, Source, Unit, unreadable

EXTENSIONS = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")
MJD_TIMESTAMP = pd.Timestamp(MJD_EPOCH, tz="UTC")


class TableSource(Source):
    """A long table of measurements, configured by column mapping (units from the data or the options)."""

    name = "table"
    time_unit = "d"
    units_per_shard = 1  # a long table file often holds a whole archive
    OPTION_HELP = {
        "record_id": "column of the record (object, stay) id",
        "time": "column of the time, in time_unit (empty = a static element)",
        "channel": "column of the channel name",
        "value": "column of the measurement, in the channel's unit",
        "error": "column of the 1-sigma measurement error, in the channel's unit (none: unknown)",
        "coord": "column of the wavelength, Angstrom (none: no coord)",
        "unit": "column of per-row astropy unit strings, or a dict channel -> unit ('' = dimensionless)",
        "modality": "column of the modality, or a dict channel -> modality",
        "labels": "record attribute columns: a list, or a dict column -> 'float' | 'str'",
        "t0": "column of the record's reference time, in time_unit",
        "default_modality": "modality of channels not given one",
        "transforms": "dict channel -> 'identity' | 'asinh' (flux-like channels)",
        "channel_coords": "dict channel -> effective wavelength, Angstrom",
        "channel_names": "the channel table's names, in order (other channels are quarantined)",
        "channel_table": "the whole channel table as a list of Channel fields (no learning from the data)",
        "sep": "CSV delimiter (null: whitespace)",
        "time_unit": "astropy unit of the time column (e.g. 'd' days, 'h' hours, 'min')",
        "time_reference": "what time counts from, in words",
        "time_epoch": "the date-time time counts from, ISO (e.g. '1858-11-17 00:00:00' for MJD); none: an event "
                      "of each record (the store's CF time units are then a duration)",
        "time_format": "'number' or 'datetime' (timestamps, converted to MJD days)",
        "valid_min": "physical minimum, in the channel's unit: a number for every channel or a dict channel -> number",
        "valid_max": "physical maximum, in the channel's unit: a number or a dict channel -> number",
        "nonnegative": "true (every channel) or a list of channels: valid_min 0 unless given",
    }

    def __init__(self, record_id: str = "record_id", time: str = "time", channel: str = "channel",
                 value: str = "value", error: str | None = None, coord: str | None = None,
                 unit: str | Mapping[str, str] | None = None, modality: str | Mapping[str, str] | None = None,
                 labels: Sequence[str] | Mapping[str, str] = (), t0: str | None = None, *,
                 default_modality: str = "measurement", transforms: Mapping[str, str] | None = None,
                 channel_coords: Mapping[str, float] | None = None,
                 channel_names: Sequence[str] | None = None,
                 channel_table: Sequence[Mapping] | None = None, sep: str | None = ",", time_unit: str = "d",
                 time_reference: str = "", time_epoch: str | None = None, time_format: str = "number",
                 valid_min: float | Mapping[str, float] | None = None,
                 valid_max: float | Mapping[str, float] | None = None,
                 nonnegative: bool | Sequence[str] = False) -> None:
        self._options = {k: v for k, v in locals().items() if k != "self"}  # the constructor's arguments
        if time_format not in ("number", "datetime"):
            raise ValueError(f"time_format must be 'number' or 'datetime', not {time_format!r}")
        self.columns = {"record_id": record_id, "time": time, "channel": channel, "value": value,
                        "error": error, "coord": coord, "t0": t0}
        self.unit, self.modality = unit, modality
        self.labels = dict(labels) if isinstance(labels, Mapping) else dict.fromkeys(labels)
        for col, kind in self.labels.items():
            if kind not in (None, "float", "str"):
                raise ValueError(f"label {col!r}: type must be 'float' or 'str', not {kind!r}")
        if isinstance(unit, Mapping):
            for ch, s in unit.items():
                _check_unit(s, f"unit of channel {ch!r}")
        _check_unit(time_unit, "time_unit")
        self.default_modality = default_modality
        self.transforms = dict(transforms or {})
        self.channel_coords = dict(channel_coords or {})
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.valid_min, self.valid_max, self.nonnegative = valid_min, valid_max, nonnegative
        self.sep, self.time_format = sep, time_format
        datetimes = time_format == "datetime"
        self.time_unit = "d" if datetimes else time_unit
        self.time_reference = "MJD (days since 1858-11-17 00:00 UTC)" if datetimes else time_reference
        self.time_epoch = MJD_EPOCH if datetimes else time_epoch
        self.label_columns = (*self.labels, "t0")
        self._channels: list[Channel] | None = None
        if channel_table is not None:
            self._channels = [Channel(**dict(ch)) for ch in channel_table]
            for ch in self._channels:
                _check_unit(ch.unit, f"unit of channel {ch.name!r}")

    def resolved_options(self) -> dict:
        """Constructor options that rebuild this source with its learnt channel table pinned
        (``channel_table``), so that fresh instances in other processes index channels identically."""
        table = [dataclasses.asdict(ch) for ch in self.channels()]
        return {**self._options, "channel_table": table}

    # -- discovery -----------------------------------------------------------------------------------

    def discover(self, path: str) -> list[Unit]:
        """The table files at ``path``; also learns the channel table (see the module docstring)."""
        so = self.storage_options
        if files.isfile(path, so):
            found = [path]
        else:
            found = [f for f in files.list_files(path, so) if f.endswith(EXTENSIONS)]
        units = [Unit(f, None, files.fingerprint(f, so)) for f in found]
        if self._options["channel_table"] is None:
            self._channels = self._learn_channels(units)
        return units

    def channels(self) -> list[Channel]:
        if self._channels is None:
            raise RuntimeError("the table source learns its channels from the data: call discover() first")
        return self._channels

    def _learn_channels(self, units: Sequence[Unit]) -> list[Channel]:
        """Channel names, units and modalities from the files (files that cannot be read are skipped)."""
        seen, errors = [], []
        for unit in units:  # one iteration per file
            try:
                df, _ = self._frame(unit, self._meta_columns())
                seen.append(df)
            except Exception as exc:  # read() reports the file; discovery only learns names
                errors.append(str(exc) if unit.name in str(exc) else f"{unit.name}: {exc}")
        if not seen and errors:
            raise ValueError(f"no table file could be read; first problem: {errors[0]}")
        meta = pd.concat(seen, ignore_index=True) if seen else pd.DataFrame(columns=self._meta_columns())
        names = self.channel_names or sorted(meta[self.columns["channel"]].dropna().astype(str).unique())
        unit_of, modality_of = self._per_channel(meta, "unit"), self._per_channel(meta, "modality")
        channels = []
        for name in names:  # one iteration per channel
            unit = unit_of.get(name, "")
            _check_unit(unit, f"unit of channel {name!r} (pass unit={{{name!r}: ...}} to override)")
            channels.append(Channel(name, modality_of.get(name, self.default_modality), unit,
                                    coord=float(self.channel_coords.get(name, np.nan)),
                                    transform=self.transforms.get(name, "identity"),
                                    valid_min=self._bound(name, "min"), valid_max=self._bound(name, "max")))
        return channels

    def _bound(self, name: str, which: str) -> float:
        """A channel's ``valid_min`` or ``valid_max`` from the options (NaN: unbounded)."""
        option = self.valid_min if which == "min" else self.valid_max
        value = option.get(name) if isinstance(option, Mapping) else option
        if value is None and which == "min":
            nonneg = self.nonnegative
            value = 0.0 if (nonneg is True or (not isinstance(nonneg, bool) and name in nonneg)) else None
        return float("nan") if value is None else float(value)

    def _required(self) -> list[str]:
        return [self.columns[k] for k in ("record_id", "time", "channel", "value")]

    def _meta_columns(self) -> list[str]:
        return [self.columns["channel"]] + [c for c in (self.unit, self.modality) if isinstance(c, str)]

    def _per_channel(self, meta: pd.DataFrame, what: str) -> dict[str, str]:
        """channel -> unit (or modality): the option's dict, or the most frequent value of the column."""
        option = self.unit if what == "unit" else self.modality
        if isinstance(option, Mapping):
            return {str(k): v for k, v in option.items()}
        if option is None or meta.empty:
            return {}
        pairs = pd.DataFrame({"channel": meta[self.columns["channel"]].astype(str),
                              "v": meta[option].fillna("").astype(str).str.strip()})
        counts = pairs.value_counts().reset_index().sort_values(["channel", "count", "v"],
                                                                ascending=[True, False, True])
        if what == "modality":
            counts = counts[counts["v"] != ""]
        return dict(counts.drop_duplicates("channel")[["channel", "v"]].to_numpy())

    # -- reading -------------------------------------------------------------------------------------

    def read(self, units: list[Unit]) -> RawElements:
        """Read ``units`` with the channel table from :meth:`discover` (or ``channel_table``). Without
        either, the table is learnt from ``units`` alone: reads of other units may then index channels
        differently, so pass :meth:`resolved_options` to sources that read shards elsewhere."""
        if self._channels is None:  # no discover() in this process: learn from these units only
            try:
                self._channels = self._learn_channels(units)
            except ValueError as exc:
                return RawElements.empty([unreadable(unit, exc) for unit in units], self.label_columns)
        return _text.read_each(units, self._read_file, self.label_columns)

    def _frame(self, unit: Unit, columns: Sequence[str], numeric: Sequence[str] = ()
               ) -> tuple[pd.DataFrame, list[dict]]:
        """The needed columns of one file, indexed by 1-based line (CSV) or row (Parquet) number.

        Raises :class:`~datasets.sources._text.MissingColumns` if the file lacks a required column."""
        columns = list(dict.fromkeys(columns))
        if unit.path.endswith(".parquet"):
            with files.open_input(unit.path, self.storage_options) as f:
                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                missing = [c for c in dict.fromkeys([*self._required(), *columns]) if c not in names]
                if missing:
                    raise _text.MissingColumns(unit.name, missing, names)
                df = parquet.read(columns=columns).to_pandas()
            df.index = np.arange(1, len(df) + 1)
            return df, []
        file = _text.read_text(unit, comment=None, storage_options=self.storage_options)
        df, q = _text.parse_table(file, file.content(comment=None), unit, self.sep, usecols=columns,
                                  numeric=numeric, required=self._required())
        return df, file.quarantine + q

    def _read_file(self, unit: Unit) -> RawElements:
        c = self.columns
        wanted = [c["record_id"], c["time"], c["channel"], c["value"], c["error"], c["coord"], c["t0"],
                  *self._meta_columns(), *self.labels]
        numeric = [k for k in (c["value"], c["error"], c["coord"]) if k is not None]
        df, quarantine = self._frame(unit, [w for w in wanted if w is not None],
                                     numeric + ([c["time"]] if self.time_format == "number" else []))
        ids = df[c["record_id"]].astype(str).to_numpy()
        empty_id = df[c["record_id"]].isna().to_numpy()
        quarantine += _text.line_rows(unit.name, df.index[empty_id], f"{c['record_id']} is missing",
                                      field="record_id")
        df, ids = df[~empty_id], ids[~empty_id]

        num, keep, q = _text.numeric_columns(df, numeric, unit, record_id=ids)
        time, bad_time = self._times(df[c["time"]])
        quarantine += q + _text.line_rows(unit.name, df.index[keep & bad_time],
                                          [f"{c['time']} {t!r} is not a "
                                           + ("time" if self.time_format == "datetime" else "number")
                                           for t in df[c["time"]][keep & bad_time].astype(str).tolist()],
                                          ids[keep & bad_time], field=c["time"])
        keep &= ~bad_time
        df, ids, time = df[keep], ids[keep], time[keep]
        num = {k: v[keep] for k, v in num.items()}

        record, uniq = pd.factorize(ids)
        records = pd.DataFrame({"record_id": uniq.astype(str), "source_file": unit.name})
        for col, kind in self.labels.items():  # a few label columns
            records[col] = _label(df[col].groupby(record).first(), kind).to_numpy()
        t0 = (self._times(df[c["t0"]])[0] if c["t0"] else np.full(len(df), np.nan))
        records["t0"] = pd.Series(t0).groupby(record).first().reindex(range(len(uniq))).to_numpy()

        channel, scale, name = self._channel_index(df)
        value = num[c["value"]] * scale
        error = num[c["error"]] * scale if c["error"] else np.nan
        coord = (num[c["coord"]] if c["coord"] else
                 pd.Series(self.channel_coords, dtype=float).reindex(name).to_numpy())
        return _text.elements(records, record, time, channel, value, error, coord, df.index.to_numpy(),
                              channel_name=name, quarantine=quarantine)

    def _times(self, column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """Times as floats (MJD for datetimes) and a mask of entries that are not times."""
        if self.time_format == "number":
            return _text.to_float(column)
        ts = pd.to_datetime(column, errors="coerce", utc=True, format="mixed")
        days = ((ts - MJD_TIMESTAMP) / pd.Timedelta(days=1)).to_numpy(dtype=np.float64, na_value=np.nan)
        return days, np.isnan(days) & column.notna().to_numpy()

    def _channel_index(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Channel index (-1: unknown), unit conversion factor and channel name per row."""
        channels = self.channels()
        index = {ch.name: i for i, ch in enumerate(channels)}
        name = df[self.columns["channel"]].fillna("").astype(str).to_numpy(dtype=object)
        channel = pd.Series(index, dtype=float).reindex(name).fillna(-1).to_numpy().astype(np.int64)
        scale = np.ones(len(df))
        if isinstance(self.unit, str):
            row_unit = df[self.unit].fillna("").astype(str).str.strip().to_numpy(dtype=object)
            own = np.array([ch.unit for ch in channels] + [""], dtype=object)[channel]
            differs = (channel >= 0) & (row_unit != own)
            for (ch, unit), rows in pd.Series(np.flatnonzero(differs)).groupby(
                    [channel[differs], row_unit[differs]]):  # one iteration per (channel, foreign unit)
                factor = _conversion(unit, channels[ch].unit)
                if factor is None:
                    channel[rows.to_numpy()] = -1
                    name[rows.to_numpy()] = f"{channels[ch].name} [{unit}]"
                else:
                    scale[rows.to_numpy()] = factor
        return channel, scale, name


def _label(values: pd.Series, kind: str | None) -> pd.Series:
    """Labels as floats (``kind`` "float", or None and all values numbers) or strings ("" when empty)."""
    num = pd.to_numeric(values, errors="coerce")
    if kind == "float" or (kind is None and not (num.isna() & values.notna()).any()):
        return num.astype(float)
    return values.fillna("").astype(str)


def _conversion(unit: str, target: str) -> float | None:
    """Factor from ``unit`` to ``target`` (astropy); None when one does not parse or they do not convert."""
    try:
        return float(u.Unit(unit or "").to(u.Unit(target or "")))
    except (ValueError, TypeError, u.UnitsError):
        return None


def _check_unit(unit: str, what: str) -> None:
    try:
        u.Unit(unit)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {unit!r} is not an astropy unit string ({exc})") from None


SOURCE = TableSource
