"""PhysioNet/Computing in Cardiology Challenge 2019 (sepsis): one ``p*.psv`` file per ICU stay.

Each file is pipe-separated with one row per hour in the ICU (``ICULOS``, hours since admission);
vital signs and laboratory values are NaN where not measured. Elements are the measured cells:
``time`` = ICULOS (hours), modalities ``vitals`` (8 channels) and ``labs`` (26 channels), plus the
``static`` modality (Age, Gender, Unit1, Unit2, HospAdmTime; time NaN) taken from the first row.
Record label ``sepsis`` = 1 if SepsisLabel is ever 1 in the stay, and ``sepsis_onset_h`` = the first
ICULOS with SepsisLabel 1 (NaN if never). Units follow the challenge's data description; ``FiO2`` is
stored as the fraction the files hold (the description's "%" notwithstanding).

Reads the challenge zip files directly (or a directory of ``.psv`` files): the bodies of many stays are
concatenated and parsed by one pyarrow call; a shard whose fast parse fails is re-read file by file so
that a malformed row quarantines that row only.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import threading
import zipfile
import zlib
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from datasets.format import Channel, RawElements
from datasets.sources import files
from datasets.sources.base import Source, Unit, unreadable
from perceiver.packing import offsets_from_counts, segment_ids

VITALS = {"HR": "1 / min", "O2Sat": "%", "Temp": "deg_C", "SBP": "mmHg", "MAP": "mmHg", "DBP": "mmHg",
          "Resp": "1 / min", "EtCO2": "mmHg"}
LABS = {"BaseExcess": "mmol / L", "HCO3": "mmol / L", "FiO2": "", "pH": "", "PaCO2": "mmHg", "SaO2": "%",
        "AST": "umol / (min L)", "BUN": "mg / dL", "Alkalinephos": "umol / (min L)", "Calcium": "mg / dL",
        "Chloride": "mmol / L", "Creatinine": "mg / dL", "Bilirubin_direct": "mg / dL", "Glucose": "mg / dL",
        "Lactate": "mg / dL", "Magnesium": "mmol / dL", "Phosphate": "mg / dL", "Potassium": "mmol / L",
        "Bilirubin_total": "mg / dL", "TroponinI": "ng / mL", "Hct": "%", "Hgb": "g / dL", "PTT": "s",
        "WBC": "1000 / uL", "Fibrinogen": "mg / dL", "Platelets": "1000 / uL"}
STATIC = {"Age": "yr", "Gender": "", "Unit1": "", "Unit2": "", "HospAdmTime": "h"}
#: physical ranges (``valid_min``, ``valid_max``; NaN = unbounded): concentrations, counts, rates and pressures
#: are >= 0, fractions and percentages bounded on both sides; Temp, BaseExcess and HospAdmTime are signed
NONNEGATIVE = (0.0, math.nan)
VALID_RANGE = {
    **{n: NONNEGATIVE for n in (*VITALS, *LABS, "Age")},
    "O2Sat": (0.0, 100.0), "SaO2": (0.0, 100.0), "Hct": (0.0, 100.0), "FiO2": (0.0, 1.0), "pH": (0.0, 14.0),
    "Gender": (0.0, 1.0), "Unit1": (0.0, 1.0), "Unit2": (0.0, 1.0),
    "Temp": (math.nan, math.nan), "BaseExcess": (math.nan, math.nan), "HospAdmTime": (math.nan, math.nan),
}
COLUMNS = [*VITALS, *LABS, *STATIC, "ICULOS", "SepsisLabel"]
N_SERIES = len(VITALS) + len(LABS)
HEADER = "|".join(COLUMNS).encode()


class PhysioNet2019(Source):
    name = "physionet2019"
    time_unit = "h"
    time_reference = "ICU admission (ICULOS hours)"
    label_columns = ("sepsis", "sepsis_onset_h", "t0")
    units_per_shard = 4000  # stays of ~260 elements: ~1 M elements per shard

    def channels(self) -> list[Channel]:
        groups = (("vitals", VITALS), ("labs", LABS), ("static", STATIC))
        return [Channel(n, modality, unit, valid_min=VALID_RANGE[n][0], valid_max=VALID_RANGE[n][1])
                for modality, cols in groups for n, unit in cols.items()]

    def discover(self, path: str) -> list[Unit]:
        """Units are the ``.psv`` members of every zip file under ``path`` (or plain ``.psv`` files)."""
        units: list[Unit] = []
        so = self.storage_options
        for f in files.list_files(path, so, recursive=True):
            if f.endswith(".zip"):
                try:
                    with files.open_input(f, so) as handle, zipfile.ZipFile(handle) as z:
                        units += [Unit(f, i.filename, f"{i.file_size}-{i.CRC:08x}") for i in z.infolist()
                                  if i.filename.endswith(".psv")]
                except (zipfile.BadZipFile, OSError) as e:
                    units.append(Unit(f, None, f"unreadable:{type(e).__name__}"))
            elif f.endswith(".psv"):
                units.append(Unit(f, None, files.fingerprint(f, so)))
        return units

    def read(self, units: list[Unit]) -> RawElements:
        texts, ok_units, quarantine = [], [], []
        for unit, data in _read_bytes(units, quarantine, self.storage_options):
            texts.append(data)
            ok_units.append(unit)
        if not ok_units:  # a shard whose files all vanished or are unreadable: quarantine rows only
            return RawElements.empty(quarantine)
        try:
            matrix, rows = _parse_fast(texts)
        except (pa.ArrowInvalid, ValueError):
            # Some file in the shard is malformed: parse file by file, quarantining bad rows.
            parts = [_parse_one(u, t) for u, t in zip(ok_units, texts, strict=True)]
            raw = RawElements.concat([p for p in parts if p is not None])
            raw.quarantine = quarantine + raw.quarantine
            return raw
        line = np.concatenate([np.arange(2, n + 2) for n in rows]) if rows else np.zeros(0, np.int64)
        raw = _elements(matrix, np.asarray(rows, dtype=np.int64), line, ok_units)
        raw.quarantine = quarantine + raw.quarantine
        return raw


def _read_bytes(units: list[Unit], quarantine: list[dict], storage_options: files.StorageOptions = None):
    """Yield (unit, bytes) for every readable unit; unreadable ones go to ``quarantine``."""
    by_zip: dict[str, list[Unit]] = {}
    for u in units:
        by_zip.setdefault(u.path, []).append(u)
    for path, group in by_zip.items():
        if not path.endswith(".zip"):
            for u in group:
                try:
                    yield u, files.read_bytes(u.path, storage_options)
                except OSError as e:
                    quarantine.append(unreadable(u, e))
            continue
        try:
            z = _open_zip(path, storage_options)
        except (zipfile.BadZipFile, OSError) as e:
            quarantine += [unreadable(u, e) for u in group]
            continue
        for u in group:
            if u.member is None:  # listed by discover() although the zip could not be opened then
                quarantine.append(unreadable(u, zipfile.BadZipFile("no readable member list")))
                continue
            if _unsafe_member(u.member):
                quarantine.append({**unreadable(u, ValueError("unsafe path in archive")), "field": "path"})
                continue
            try:
                yield u, z.read(u.member)
            except (zipfile.BadZipFile, OSError, KeyError, EOFError, ValueError, zlib.error) as e:
                quarantine.append(unreadable(u, e))


class _Zip:
    """A zip file opened once per process, whose members are read by one seek and one inflate.

    ``ZipFile.read`` spends ~25 us of Python per member, more than inflating a small stay; the central
    directory of a 20,000-member archive takes ~0.2 s to read. CRCs are still checked.
    """

    def __init__(self, path: str, storage_options: files.StorageOptions = None):
        self.raw = files.open_input(path, storage_options)  # lives as long as the cached index
        self.index_file = files.open_input(path, storage_options)
        self.index = zipfile.ZipFile(self.index_file)
        self.lock = threading.Lock()

    def __del__(self) -> None:  # dropped from the cache (or at exit): close both handles, quietly
        for handle in (getattr(self, "raw", None), getattr(self, "index", None), getattr(self, "index_file", None)):
            if handle is not None:
                handle.close()

    def read(self, member: str) -> bytes:
        info = self.index.getinfo(member)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
            return self.index.read(member)  # exotic compression or encryption: the standard path
        with self.lock:
            self.raw.seek(info.header_offset)
            header = self.raw.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local header for {member}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self.raw.seek(name_len + extra_len, 1)
            data = self.raw.read(info.compress_size)
        if len(data) != info.compress_size:
            raise EOFError(f"{member}: archive ends inside this member")
        out = zlib.decompress(data, -15) if info.compress_type == zipfile.ZIP_DEFLATED else data
        if zlib.crc32(out) != info.CRC:
            raise zipfile.BadZipFile(f"{member}: CRC mismatch")
        return out


@functools.lru_cache(maxsize=4)
def _zip_index(path: str, fingerprint: str, options: str) -> _Zip:
    return _Zip(path, json.loads(options))


def _open_zip(path: str, storage_options: files.StorageOptions = None) -> _Zip:
    so = json.dumps(dict(storage_options or {}), sort_keys=True, default=str)
    return _zip_index(path, files.fingerprint(path, storage_options), so)


def _unsafe_member(member: str) -> bool:
    """Archive names that would escape a directory if unpacked (absolute, ``..``)."""
    p = PurePosixPath(member.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(member) > 1 and member[1] == ":")


def _parse_fast(texts: list[bytes]) -> tuple[np.ndarray, list[int]]:
    """One pyarrow parse of all bodies; raises if any file differs from the expected layout."""
    bodies, rows = [], []
    for data in texts:
        header, _, body = data.partition(b"\n")  # pyarrow copes with \r\n line ends in the body
        if header.strip() != HEADER:
            raise ValueError("unexpected header")
        if body and not body.endswith(b"\n"):
            body += b"\n"
        bodies.append(body)
        rows.append(body.count(b"\n"))
    if sum(rows) == 0:
        return np.zeros((0, len(COLUMNS))), rows
    table = pacsv.read_csv(
        io.BytesIO(b"".join(bodies)),
        read_options=pacsv.ReadOptions(column_names=COLUMNS),
        parse_options=pacsv.ParseOptions(delimiter="|"),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(COLUMNS, pa.float64())),
    )
    matrix = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS])
    return matrix, rows


def _parse_one(unit: Unit, data: bytes) -> RawElements | None:
    """Slow, careful parse of one file: bad rows and non-numeric cells become quarantine rows."""
    quarantine: list[dict] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawElements.empty([unreadable(unit, e)])
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return RawElements.empty([{**unreadable(unit, ValueError("empty file")), "field": "file"}])
    header = lines[0].split("|")
    missing = [c for c in ("ICULOS", *VITALS) if c not in header]
    if missing:
        return RawElements.empty([{**unreadable(unit, ValueError(f"missing columns {missing}"), row=1),
                                   "field": "header"}])
    cells = [ln.split("|") for ln in lines[1:]]
    width = np.array([len(c) for c in cells], dtype=np.int64)
    good = width == len(header)
    for i in np.flatnonzero(~good):
        quarantine.append({"source_file": unit.name, "row": int(i) + 2, "record_id": _record_id(unit),
                           "field": "row", "elements": 0,
                           "reason": f"malformed row: {width[i]} fields, expected {len(header)}"})
    line = np.flatnonzero(good) + 2
    frame = pd.DataFrame([c for c, g in zip(cells, good, strict=True) if g], columns=header, dtype=object)
    matrix = np.full((len(frame), len(COLUMNS)), np.nan)
    for j, c in enumerate(COLUMNS):
        if c not in frame:
            continue
        text_col = frame[c].astype(str).str.strip()
        num = pd.to_numeric(text_col, errors="coerce").to_numpy(np.float64)
        bad = np.isnan(num) & ~text_col.str.lower().isin(["nan", ""]).to_numpy()
        for i in np.flatnonzero(bad):
            quarantine.append({"source_file": unit.name, "row": int(line[i]), "record_id": _record_id(unit),
                               "field": c, "elements": 1, "reason": f"not a number: {text_col.iloc[i]!r}"})
        matrix[:, j] = num
    raw = _elements(matrix, np.array([len(frame)]), line, [unit])
    raw.quarantine = quarantine
    return raw


def _record_id(unit: Unit) -> str:
    return PurePosixPath(unit.member or unit.path).stem


def _elements(matrix: np.ndarray, rows: np.ndarray, line: np.ndarray, units: list[Unit]) -> RawElements:
    """Melt a (hours x columns) matrix of many stays into elements, vectorised."""
    n_files = len(units)
    starts = offsets_from_counts(rows)
    row_record = segment_ids(starts)
    iculos = matrix[:, COLUMNS.index("ICULOS")]
    sepsis_col = matrix[:, COLUMNS.index("SepsisLabel")]

    series = matrix[:, :N_SERIES]
    r, c = np.nonzero(~np.isnan(series))
    has_rows = rows > 0
    first = starts[:-1][has_rows]
    static = matrix[first, N_SERIES:N_SERIES + len(STATIC)]
    sr, sc = np.nonzero(~np.isnan(static))
    static_record = np.flatnonzero(has_rows)[sr]

    record = np.concatenate([static_record, row_record[r]])
    order = np.argsort(record, kind="stable")  # two sorted runs: static first within each record
    time = np.concatenate([np.full(len(sr), np.nan), iculos[r]])[order]
    value = np.concatenate([static[sr, sc], series[r, c]])[order]
    channel = np.concatenate([N_SERIES + sc, c])[order].astype(np.int16)
    row = np.concatenate([line[first][sr], line[r]])[order]

    positive = np.nan_to_num(sepsis_col) > 0
    sepsis = np.zeros(n_files)
    np.maximum.at(sepsis, row_record[positive], 1.0)
    onset = np.full(n_files, np.nan)
    pos_rows = np.flatnonzero(positive)
    if len(pos_rows):
        recs, first_pos = np.unique(row_record[pos_rows], return_index=True)
        onset[recs] = iculos[pos_rows[first_pos]]
    records = pd.DataFrame({"record_id": [_record_id(u) for u in units],
                            "source_file": [u.name for u in units],
                            "sepsis": sepsis, "sepsis_onset_h": onset, "t0": 0.0})
    n = len(record)
    return RawElements(records, record[order], time, channel, value.astype(np.float32),
                       np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32), row)


SOURCE = PhysioNet2019
