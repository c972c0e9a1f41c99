"""PLAsTiCC (Photometric LSST Astronomical Time-series Classification Challenge) training set.

``*_lightcurves.csv(.gz)``: long format ``object_id, mjd, passband, flux, flux_err, detected_bool``,
passbands u g r i z y = 0..5; ``*_metadata.csv(.gz)`` beside it (same prefix): host-galaxy redshift, Milky
Way extinction and the class ``target``. Elements: one per observation (``time`` = MJD days, channels
``lsst_u`` .. ``lsst_y`` with their effective wavelengths in Angstrom as ``coord``; flux in the archive's
FLUXCAL unit, zero point 27.5 AB mag, i.e. 1 unit = 36.31 nJy) and two static elements per object:
``hostgal_photoz`` (error ``hostgal_photoz_err``) and ``mwebv`` (E(B-V), mag). The archive gives galactic
objects a redshift of exactly 0 with error 0; that error is stored as NaN ("not given"), never 0.
``t0`` is the object's first observation (MJD). ``detected_bool`` is not stored (it is derived from the
flux and its error).

Two layouts are read, from a local directory or any fsspec URL:

- the training layout: ``plasticc_train_lightcurves.csv(.gz)`` beside ``plasticc_train_metadata.csv(.gz)``,
  one unit per light-curve file (a file of 1.4 M rows), every metadata object a record;
- the test layout: ``plasticc_test_set_batch1.csv(.gz)`` ... ``batch11`` (or the unblinded release's
  ``plasticc_test_lightcurves_01.csv.gz`` ...; tens of millions of rows each, objects contiguous) beside one
  ``plasticc_test_metadata.csv(.gz)`` (``target`` from ``target`` or ``true_target``, NaN when blinded). These
  files are streamed: a unit is a *piece* ``bytes A-B`` of a file's (uncompressed) text, ``piece_bytes`` long
  (default 16 MiB, ~400 k rows, ~100 MB of memory while read), owning the objects whose first row starts in
  it, so an object is never split between units. Only the metadata of a piece's objects is used (the
  metadata file is read once per process).
  A piece's records and quarantine rows name it (``plasticc_test_set_batch1.csv:bytes 0-16777216``) and their
  ``row`` is the line within the piece (line 1: its first line; the header is line 1 of the first piece).
  Keep ``piece_bytes`` fixed for a store: other pieces are other units. Metadata objects without a light
  curve are not stored in this layout (no piece holds them).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import re
import threading
import zlib
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from datasets.format import Channel, RawElements
from datasets.sources import files
from datasets.sources.base import MJD_EPOCH, Source, Unit, unreadable

PASSBANDS = "ugrizy"
#: LSST effective wavelengths (Angstrom), as used by the PLAsTiCC team
WAVELENGTH = {"u": 3670.69, "g": 4826.85, "r": 6223.24, "i": 7545.98, "z": 8590.90, "y": 9710.28}
FLUX_UNIT = "36.31 nJy"  # FLUXCAL: 10**(-0.4 * (m_AB - 27.5))
LC_COLUMNS = {"object_id": pa.int64(), "mjd": pa.float64(), "passband": pa.int64(), "flux": pa.float64(),
              "flux_err": pa.float64()}
STATIC = {"hostgal_photoz": ("hostgal_photoz_err", ""), "mwebv": (None, "mag")}
#: light-curve files of the test layout (Kaggle's batches, the unblinded release's numbered files)
TEST_LIGHTCURVES = re.compile(r"^plasticc_test_(set_batch\d+|lightcurves_\d+)\.csv(\.gz)?$")
TEST_METADATA = ("plasticc_test_metadata.csv", "plasticc_test_metadata.csv.gz")
META_COLUMNS = ["object_id", "hostgal_photoz", "hostgal_photoz_err", "mwebv", "ddf_bool", "target", "true_target"]
PIECE = re.compile(r"^bytes (\d+)-(\d+)$")
#: bytes read at once when looking for a line or an object's end
WINDOW = 1 << 20


class PLAsTiCC(Source):
    name = "plasticc"
    time_unit = "d"
    time_reference = "MJD"
    time_epoch = MJD_EPOCH
    label_columns = ("target", "ddf_bool", "t0")
    units_per_shard = 1  # one light-curve file (or piece of one) per shard; a file holds many objects
    OPTION_HELP = {"piece_bytes": "bytes of (uncompressed) text per unit of a test-layout light-curve file "
                                  "(~50 bytes a row; an object is never split)"}

    def __init__(self, piece_bytes: int = 16 << 20) -> None:
        if int(piece_bytes) < 1:
            raise ValueError(f"piece_bytes must be a positive number of bytes, not {piece_bytes!r}")
        self.piece_bytes = int(piece_bytes)

    def channels(self) -> list[Channel]:
        bands = [Channel(f"lsst_{b}", "photometry", FLUX_UNIT, WAVELENGTH[b], "asinh") for b in PASSBANDS]
        return bands + [Channel(n, "static", unit) for n, (_, unit) in STATIC.items()]

    def discover(self, path: str) -> list[Unit]:
        """Units: the training layout's ``*_lightcurves.csv(.gz)`` files (each needs its ``*_metadata`` file
        beside it) and pieces of the test layout's files (see the module docstring), in name order."""
        so = self.storage_options
        units: list[Unit] = []
        for f in [path] if files.isfile(path, so) else files.list_files(path, so):
            base = files.basename(f)
            if TEST_LIGHTCURVES.match(base):
                units += self._pieces(f)
            elif base.split(".")[0].endswith("_lightcurves"):
                units.append(Unit(f, None, files.fingerprint(f, so)))
        return units

    def _pieces(self, path: str) -> list[Unit]:
        """The pieces of a test-layout file, ``piece_bytes`` of its uncompressed text each; their fingerprint
        covers the file and the metadata file beside it."""
        so = self.storage_options
        fp = files.fingerprint(path, so)
        try:
            meta = _test_metadata_path(path, so)
            fp += f";{files.basename(meta)}:{files.fingerprint(meta, so)}"
        except FileNotFoundError:
            pass  # read() quarantines every piece, naming the missing file
        try:
            n = _text_size(path, fp, _options_key(so))
        except (OSError, EOFError, zlib.error) as e:  # an unreadable file: one unit that read() quarantines
            return [Unit(path, None, f"unreadable:{type(e).__name__}")]
        step = self.piece_bytes
        return [Unit(path, f"bytes {a}-{min(a + step, n)}", fp) for a in range(0, max(n, 1), step)]

    def read(self, units: list[Unit]) -> RawElements:
        return RawElements.concat([self._read_one(u) if u.member is None or not PIECE.match(u.member)
                                   else self._read_piece(u) for u in units])

    def _read_one(self, unit: Unit) -> RawElements:
        if unit.fingerprint.startswith("unreadable:"):
            return RawElements.empty([unreadable(unit, OSError(f"not readable when listed ({unit.fingerprint})"))])
        so = self.storage_options
        try:
            meta = _read_metadata(unit.path, so)
            lc, bad_rows = _read_lightcurves(unit.path, so)
        except (OSError, pa.ArrowInvalid, ValueError, KeyError, EOFError) as e:
            return RawElements.empty([unreadable(unit, e)])
        quarantine = _bad_rows(unit, bad_rows)
        ids = np.union1d(meta["object_id"].to_numpy(), lc["object_id"].to_numpy())
        m = meta.set_index("object_id").reindex(ids)
        return _elements(lc, m, ids, m["target"].notna().to_numpy(), unit, quarantine, first_line=2)

    def _read_piece(self, unit: Unit) -> RawElements:
        """One piece of a test-layout file: the objects whose first row starts in its byte range."""
        so = self.storage_options
        start, end = (int(x) for x in PIECE.match(unit.member).groups())
        try:
            meta = _test_metadata(_test_metadata_path(unit.path, so), unit.fingerprint, _options_key(so))
            stream = _stream(unit.path, unit.fingerprint, _options_key(so))
            with stream.lock:
                header, body, first_line = _piece_text(stream, start, end)
            if not body.strip():  # no object starts in this piece (the piece before holds the one crossing it)
                return RawElements.empty([], self.label_columns)
            lc, bad_rows = _read_lightcurves(io.BytesIO(body), so, names=header)
        except (OSError, pa.ArrowInvalid, ValueError, KeyError, EOFError, zlib.error) as e:
            return RawElements.empty([unreadable(unit, e)])
        bad_rows = [(n + first_line - 1 if n > 0 else n, text) for n, text in bad_rows]
        ids = np.unique(lc["object_id"].to_numpy())
        m = meta.reindex(ids)
        return _elements(lc, m, ids, m["listed"].notna().to_numpy(), unit, _bad_rows(unit, bad_rows),
                         first_line=first_line)


def _bad_rows(unit: Unit, bad_rows: list[tuple[int, str]]) -> list[dict]:
    return [{"source_file": unit.name, "row": row, "record_id": "", "field": "row",
             "reason": f"malformed row: {text[:60]!r}", "elements": 0} for row, text in bad_rows]


def _options_key(storage_options: files.StorageOptions) -> str:
    """Storage options as a hashable cache key."""
    return json.dumps(dict(storage_options or {}), sort_keys=True, default=str)


def _metadata_path(lc_path: str, storage_options: files.StorageOptions = None) -> str:
    base = files.basename(lc_path)
    stem, ext = base.split(".", 1)
    candidates = [stem.replace("_lightcurves", "_metadata") + "." + e for e in (ext, "csv", "csv.gz")]
    for c in candidates:
        p = files.join(files.dirname(lc_path), c)
        if files.exists(p, storage_options):
            return p
    raise FileNotFoundError(f"{lc_path}: no metadata file beside it (looked for {candidates[0]})")


def _test_metadata_path(lc_path: str, storage_options: files.StorageOptions = None) -> str:
    for name in TEST_METADATA:
        p = files.join(files.dirname(lc_path), name)
        if files.exists(p, storage_options):
            return p
    raise FileNotFoundError(f"{lc_path}: no {TEST_METADATA[0]}(.gz) beside it")


def _csv_input(path: str, storage_options: files.StorageOptions) -> str | IO[bytes]:
    """What pyarrow's CSV reader reads: a local path as itself (pyarrow decompresses ``.gz`` natively), a
    URL as an open (and, for ``.gz``, decompressing) file object; the caller closes it."""
    if files.is_local(path):
        return files.local_path(path)
    f = files.open_input(path, storage_options)
    return gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f


def _read_csv(path: str, storage_options: files.StorageOptions, **kwargs) -> pa.Table:
    source = _csv_input(path, storage_options)
    try:
        return pacsv.read_csv(source, **kwargs)
    finally:
        if not isinstance(source, str):
            source.close()


def _read_metadata(lc_path: str, storage_options: files.StorageOptions = None) -> pd.DataFrame:
    meta = _read_csv(_metadata_path(lc_path, storage_options), storage_options).to_pandas()
    meta.columns = [c.strip() for c in meta.columns]
    missing = {"object_id", "target", *STATIC} - set(meta.columns)
    if missing:
        raise KeyError(f"metadata lacks columns {sorted(missing)}")
    return meta


@functools.lru_cache(maxsize=2)
def _test_metadata(path: str, fingerprint: str, options: str) -> pd.DataFrame:
    """The test layout's metadata, indexed by object_id: the static columns, ``ddf_bool``, ``target`` (from
    ``target`` or ``true_target``; NaN when blinded) and ``listed`` (1.0). Read once per process and file
    (3.5 M objects: ~170 MB); ``fingerprint`` keys the cache."""
    so = json.loads(options)
    with files.open_input(path, so) as f:
        head = (gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f).readline()
    found = [c.strip() for c in head.decode("utf-8", "replace").rstrip("\r\n").split(",")]
    missing = [c for c in ("object_id", *STATIC) if c not in found]
    if missing:
        raise KeyError(f"{files.basename(path)} lacks columns {missing}")
    table = _read_csv(path, so, convert_options=pacsv.ConvertOptions(
        include_columns=[c for c in META_COLUMNS if c in found],
        column_types={c: pa.int64() if c == "object_id" else pa.float64() for c in META_COLUMNS}))
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    n = len(cols["object_id"])
    target = cols.get("target", cols.get("true_target", np.full(n, np.nan)))
    meta = pd.DataFrame({"hostgal_photoz": cols["hostgal_photoz"],
                         "hostgal_photoz_err": cols.get("hostgal_photoz_err", np.full(n, np.nan)),
                         "mwebv": cols["mwebv"], "ddf_bool": cols.get("ddf_bool", np.full(n, np.nan)),
                         "target": target, "listed": 1.0}, index=pd.Index(cols["object_id"], name="object_id"))
    return meta[~meta.index.duplicated()].sort_index()


class _Text:
    """A light-curve file's uncompressed text, opened once per process and read by offset (a ``.gz`` file
    is decompressed forwards from where the last read ended, so a process reading consecutive pieces
    decompresses the file once)."""

    def __init__(self, path: str, storage_options: files.StorageOptions):
        self.raw = files.open_input(path, storage_options)
        self.text = gzip.GzipFile(fileobj=self.raw) if path.endswith(".gz") else self.raw
        self.lock = threading.Lock()

    def __del__(self) -> None:
        for handle in (getattr(self, "text", None), getattr(self, "raw", None)):
            if handle is not None:
                handle.close()

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end of the text)."""
        self.text.seek(offset)
        return self.text.read(size)


@functools.lru_cache(maxsize=2)
def _stream(path: str, fingerprint: str, options: str) -> _Text:
    return _Text(path, json.loads(options))


@functools.lru_cache(maxsize=64)
def _text_size(path: str, fingerprint: str, options: str) -> int:
    """Bytes of a file's uncompressed text (a ``.gz`` file is decompressed once to count them)."""
    so = json.loads(options)
    if not path.endswith(".gz"):
        return files.size(path, so)
    n = 0
    with files.open_input(path, so) as f, gzip.GzipFile(fileobj=f) as g:
        while block := g.read(16 << 20):
            n += len(block)
    return n


def _piece_text(text: _Text, start: int, end: int) -> tuple[list[str], bytes, int]:
    """The header's column names, the lines of the objects whose first row starts in ``[start, end)`` and
    the piece line number of the first of those lines."""
    head = text.read(0, WINDOW)
    if b"\n" not in head:
        raise ValueError("no header line (or a first line longer than 1 MiB)")
    header = [c.strip() for c in head[:head.index(b"\n")].decode("utf-8").rstrip("\r").split(",")]
    if header[:1] != ["object_id"]:
        raise ValueError(f"pieces need object_id as the first column, found {header[:3]}")
    if start == 0:  # the first piece: skip the header line (line 1)
        first, prev_id, line = len(head[:head.index(b"\n")]) + 1, None, 2
    else:  # the first line that starts at or after ``start``, and the object id of the line before it
        back = min(start, WINDOW)
        window = text.read(start - back, back + WINDOW)
        nl = window.find(b"\n", back - 1)
        if nl < 0:
            return header, b"", 1  # no line starts in the rest of the window: the text (or piece) ends
        first = start - back + nl + 1
        before = window.rfind(b"\n", 0, nl)
        if before < 0 and start - back > 0:
            raise ValueError(f"a line longer than {WINDOW} bytes before byte {start}")
        prev_id = None if before < 0 else window[before + 1:nl].split(b",", 1)[0]
        line = 1
    if first >= end:
        return header, b"", line
    body = text.read(first, end - first)
    while len(body) == end - first and not body.endswith(b"\n"):  # the last line crosses ``end``
        more = text.read(first + len(body), WINDOW)
        if not more:
            break
        cut = more.find(b"\n")
        body += more if cut < 0 else more[:cut + 1]
        if cut >= 0:
            break
    # Drop the leading lines of the object that started before this piece (the piece before owns it).
    drop, dropped_lines, _ = _run(body, prev_id, True) if prev_id is not None else (0, 0, True)
    body, line = body[drop:], line + dropped_lines
    if not body.strip():
        return header, b"", line
    # Extend to the end of the last object, which may continue past ``end``.
    last_line = body.rstrip(b"\r\n")
    last_id = last_line[last_line.rfind(b"\n") + 1:].split(b",", 1)[0]
    at = first + drop + len(body)
    if not body.endswith(b"\n"):
        return header, body, line
    tail = []
    while block := text.read(at, WINDOW):
        size, _, whole = _run(block, last_id, len(block) < WINDOW)
        tail.append(block[:size])
        at += size
        if not whole or size == 0:
            break
    return header, body + b"".join(tail), line


def _run(data: bytes, ident: bytes, ends_text: bool) -> tuple[int, int, bool]:
    """(bytes, lines, whole) of the leading complete lines of ``data`` whose first field is ``ident``; ``whole``:
    every complete line matched. A last line without ``\\n`` is complete only if ``ends_text`` (the file ends
    there). Vectorised, one window of lines at a time (bounded memory)."""
    size = lines = 0
    key = np.frombuffer(ident + b",", np.uint8)
    while size < len(data):
        chunk = data[size:size + WINDOW]
        arr = np.frombuffer(chunk, np.uint8)
        ends = np.flatnonzero(arr == 10) + 1
        if arr[-1] != 10 and ends_text and size + len(chunk) == len(data):
            ends = np.append(ends, len(arr))
        if len(ends) == 0:
            break
        starts = np.concatenate([[0], ends[:-1]])
        idx = np.minimum(starts[:, None] + np.arange(len(key)), len(arr) - 1)
        match = (arr[idx] == key).all(axis=1) & (starts + len(key) <= ends)
        n = len(match) if match.all() else int(np.argmin(match))
        size, lines = size + (int(ends[n - 1]) if n else 0), lines + n
        if n < len(match):
            return size, lines, False
    return size, lines, True


def _read_lightcurves(path: str | IO[bytes], storage_options: files.StorageOptions = None,
                      names: list[str] | None = None) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """The light-curve table of a file (or of a piece's text, whose columns are ``names``); rows with the
    wrong number of fields are skipped and returned with their line number (in the file or the text)."""
    for threads in (True, False):  # a threaded parse does not know the line of a bad row: redo it
        bad: list[tuple[int, str]] = []

        def on_bad_row(row, bad=bad) -> str:
            bad.append((row.number if row.number is not None else -1, row.text))
            return "skip"

        options = dict(
            read_options=pacsv.ReadOptions(use_threads=threads, column_names=names),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_bad_row),
            convert_options=pacsv.ConvertOptions(include_columns=list(LC_COLUMNS), column_types=LC_COLUMNS),
        )
        if isinstance(path, str):
            table = _read_csv(path, storage_options, **options)
        else:
            path.seek(0)
            table = pacsv.read_csv(path, **options)
        if all(n > 0 for n, _ in bad):
            break
    df = pd.DataFrame({c: table.column(c).to_numpy(zero_copy_only=False) for c in LC_COLUMNS})
    return df, bad


def _elements(lc: pd.DataFrame, m: pd.DataFrame, ids: np.ndarray, has_meta: np.ndarray, unit: Unit,
              quarantine: list[dict], first_line: int) -> RawElements:
    """Elements of the objects ``ids`` (sorted) from their light-curve rows ``lc`` and metadata ``m`` (indexed
    like ``ids``; ``has_meta`` False where an object has no usable metadata row). ``first_line``: the line
    number of the first row of ``lc``."""
    # Line numbers of the parsed rows; skipped malformed lines leave gaps.
    skipped = np.array([q["row"] for q in quarantine if q["row"] > 0], dtype=np.int64)
    lines = np.setdiff1d(np.arange(first_line, len(lc) + len(skipped) + first_line), skipped)[:len(lc)]
    n_obj = len(ids)
    rec_lc = np.searchsorted(ids, lc["object_id"].to_numpy())

    band = lc["passband"].to_numpy()
    known = (band >= 0) & (band < len(PASSBANDS))
    channel = np.where(known, band, -1).astype(np.int16)
    names = np.where(known, "", "passband " + lc["passband"].astype(str).to_numpy()).astype(object)
    coord = np.array(list(WAVELENGTH.values()) + [np.nan], np.float32)[np.where(known, band, -1)]

    static_rec, static_ch, static_val, static_err = [], [], [], []
    for j, (col, (err_col, _)) in enumerate(STATIC.items()):
        v = m[col].to_numpy(np.float64)
        e = m[err_col].to_numpy(np.float64) if err_col else np.full(n_obj, np.nan)
        e = np.where(e == 0, np.nan, e)  # archive's "exactly 0" (galactic), not a 0 uncertainty
        present = ~np.isnan(v) & has_meta
        static_rec.append(np.flatnonzero(present))
        static_ch.append(np.full(present.sum(), len(PASSBANDS) + j))
        static_val.append(v[present])
        static_err.append(e[present])
    n_static = sum(len(r) for r in static_rec)

    t0 = pd.Series(lc["mjd"].to_numpy()).groupby(rec_lc).min().reindex(range(n_obj)).to_numpy()
    records = pd.DataFrame({"record_id": ids.astype(str), "source_file": unit.name,
                            "target": m["target"].to_numpy(np.float64),
                            "ddf_bool": m["ddf_bool"].to_numpy(np.float64) if "ddf_bool" in m else np.nan,
                            "t0": t0})
    # Objects with light curves but no metadata row: their elements are quarantined by reason.
    no_meta = ~has_meta
    channel = np.where(no_meta[rec_lc], -1, channel).astype(np.int16)
    names = np.where(no_meta[rec_lc], "object without metadata row", names).astype(object)
    return RawElements(
        records=records,
        record=np.concatenate([np.concatenate(static_rec), rec_lc]).astype(np.int64),
        time=np.concatenate([np.full(n_static, np.nan), lc["mjd"].to_numpy()]),
        channel=np.concatenate([np.concatenate(static_ch), channel]).astype(np.int16),
        value=np.concatenate([np.concatenate(static_val), lc["flux"].to_numpy()]).astype(np.float32),
        error=np.concatenate([np.concatenate(static_err), lc["flux_err"].to_numpy()]).astype(np.float32),
        coord=np.concatenate([np.full(n_static, np.nan, np.float32), coord]),
        row=np.concatenate([np.full(n_static, -1), lines]).astype(np.int64),
        channel_name=np.concatenate([np.full(n_static, "", dtype=object), names]),
        quarantine=quarantine,
    )


SOURCE = PLAsTiCC
