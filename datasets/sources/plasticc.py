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
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from datasets.format import Channel, RawElements
from datasets.sources.base import Source, Unit, file_fingerprint, unreadable

PASSBANDS = "ugrizy"
#: LSST effective wavelengths (Angstrom), as used by the PLAsTiCC team
WAVELENGTH = {"u": 3670.69, "g": 4826.85, "r": 6223.24, "i": 7545.98, "z": 8590.90, "y": 9710.28}
FLUX_UNIT = "36.31 nJy"  # FLUXCAL: 10**(-0.4 * (m_AB - 27.5))
LC_COLUMNS = {"object_id": pa.int64(), "mjd": pa.float64(), "passband": pa.int64(), "flux": pa.float64(),
              "flux_err": pa.float64()}
STATIC = {"hostgal_photoz": ("hostgal_photoz_err", ""), "mwebv": (None, "mag")}


class PLAsTiCC(Source):
    name = "plasticc"
    time_unit = "d"
    time_reference = "MJD"
    label_columns = ("target", "ddf_bool", "t0")
    units_per_shard = 1  # one light-curve file per shard; a file holds many objects

    def channels(self) -> list[Channel]:
        bands = [Channel(f"lsst_{b}", "photometry", FLUX_UNIT, WAVELENGTH[b], "asinh") for b in PASSBANDS]
        return bands + [Channel(n, "static", unit) for n, (_, unit) in STATIC.items()]

    def discover(self, path: str) -> list[Unit]:
        """Units are the ``*_lightcurves.csv(.gz)`` files (each needs its ``*_metadata`` file beside it)."""
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, f) for f in os.listdir(path))
        return [Unit(f, None, file_fingerprint(f)) for f in files
                if os.path.basename(f).split(".")[0].endswith("_lightcurves")]

    def read(self, units: list[Unit]) -> RawElements:
        return RawElements.concat([self._read_one(u) for u in units])

    def _read_one(self, unit: Unit) -> RawElements:
        try:
            meta = _read_metadata(unit.path)
            lc, bad_rows = _read_lightcurves(unit.path)
        except (OSError, pa.ArrowInvalid, ValueError, KeyError, EOFError) as e:
            return RawElements.empty([unreadable(unit, e)])
        quarantine = [{"source_file": unit.name, "row": row, "record_id": "", "field": "row",
                       "reason": f"malformed row: {text[:60]!r}", "elements": 0} for row, text in bad_rows]
        return _elements(lc, meta, unit, quarantine)


def _metadata_path(lc_path: str) -> str:
    base = os.path.basename(lc_path)
    stem, ext = base.split(".", 1)
    candidates = [stem.replace("_lightcurves", "_metadata") + "." + e for e in (ext, "csv", "csv.gz")]
    for c in candidates:
        p = os.path.join(os.path.dirname(lc_path), c)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{lc_path}: no metadata file beside it (looked for {candidates[0]})")


def _read_metadata(lc_path: str) -> pd.DataFrame:
    meta = pacsv.read_csv(_metadata_path(lc_path)).to_pandas()
    meta.columns = [c.strip() for c in meta.columns]
    missing = {"object_id", "target", *STATIC} - set(meta.columns)
    if missing:
        raise KeyError(f"metadata lacks columns {sorted(missing)}")
    return meta


def _read_lightcurves(path: str) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """The light-curve table; rows with the wrong number of fields are skipped and returned."""
    for threads in (True, False):  # a threaded parse does not know the line of a bad row: redo it
        bad: list[tuple[int, str]] = []

        def on_bad_row(row, bad=bad) -> str:
            bad.append((row.number if row.number is not None else -1, row.text))
            return "skip"

        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=threads),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_bad_row),
            convert_options=pacsv.ConvertOptions(include_columns=list(LC_COLUMNS), column_types=LC_COLUMNS),
        )
        if all(n > 0 for n, _ in bad):
            break
    df = pd.DataFrame({c: table.column(c).to_numpy(zero_copy_only=False) for c in LC_COLUMNS})
    return df, bad


def _elements(lc: pd.DataFrame, meta: pd.DataFrame, unit: Unit, quarantine: list[dict]) -> RawElements:
    # Line numbers of the parsed rows: line 1 is the header; skipped malformed lines leave gaps.
    skipped = np.array([q["row"] for q in quarantine if q["row"] > 0], dtype=np.int64)
    lines = np.setdiff1d(np.arange(2, len(lc) + len(skipped) + 2), skipped)[:len(lc)]
    ids = np.union1d(meta["object_id"].to_numpy(), lc["object_id"].to_numpy())
    n_obj = len(ids)
    rec_lc = np.searchsorted(ids, lc["object_id"].to_numpy())
    m = meta.set_index("object_id").reindex(ids)

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
        present = ~np.isnan(v) & m["target"].notna().to_numpy()
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
    no_meta = m["target"].isna().to_numpy()
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
