"""ZTF Bright Transient Survey forced photometry, baseline-corrected (ztfparsnip ``ZTF*_bl.csv`` files).

Each file holds one object: ``#key=value`` header lines (``#name=``, ``#bts_class=``, ``#bts_z=``,
``#bts_peak_jd=``, ...) then a CSV table with one row per epoch. A ``headers.json`` beside the files maps
object name -> the same header keys; where it has the object its values win over the file's own header.

Elements (``time`` = ``obsmjd``, MJD in days):

- photometry channels ``ztf_g``, ``ztf_r``, ``ztf_i`` (filter spellings ``ZTF_r``, ``ZTF r``, ``ztf-r``
  ... all map to ``ztf_r``; unknown filters get channel -1 and are quarantined by validation). ``coord``
  is the band's effective wavelength (Angstrom, SVO Filter Profile Service, Palomar/ZTF.g/r/i).
  Unit ``uJy``: ``ampl_corr`` is a PSF-fit flux in counts on the zero point ``magzp`` of its own image
  (``mag = magzp - 2.5 log10(ampl_corr)``); zero points differ by up to ~0.5 mag between images, so raw
  amplitudes of different epochs are not on one scale. We store
  ``value = ampl_corr * 10**(-0.4 (magzp - 23.9))`` and ``error = ampl_err_corr`` times the same factor:
  the AB flux density in microjansky (23.9 is the AB magnitude of 1 uJy), linear in the amplitude, so
  negative and zero fluxes survive. Transform ``asinh``.
- a static ``redshift`` element (time NaN, dimensionless) when ``bts_z`` is a number.

Records: ``record_id`` = ``#name=`` (else the file name without ``_bl.csv``); labels ``class`` =
``bts_class`` (``""`` when missing or ``-``) and ``t0`` = ``bts_peak_jd - 2400000.5`` (MJD of peak; NaN
when missing). ``row`` = 1-based line number in the CSV file (the ``#bts_z=`` line for the redshift, -1
when it came from ``headers.json`` only).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from datasets.format import Channel, RawElements
from datasets.sources import _text, files
from datasets.sources.base import MJD_EPOCH, Source, Unit, unreadable

HEADERS_JSON = "headers.json"
#: effective wavelengths (Angstrom), SVO Filter Profile Service, Palomar/ZTF.g, ZTF.r, ZTF.i
BANDS = {"ztf_g": 4746.5, "ztf_r": 6366.4, "ztf_i": 7829.0}
FLUX_UNIT = "uJy"
AB_ZP_UJY = 23.9
JD_TO_MJD = 2400000.5
COLUMNS = ["obsmjd", "filter", "ampl_corr", "ampl_err_corr", "magzp"]


class ZtfBts(Source):
    """ZTF BTS light curves: fluxes in uJy per band, MJD days, plus a static redshift."""

    name = "ztf_bts"
    time_unit = "d"
    time_reference = "MJD (days since 1858-11-17 00:00 UTC)"
    time_epoch = MJD_EPOCH
    label_columns = ("class", "t0")
    units_per_shard = 1000  # one object of ~1,500 elements per file: ~1.5 M elements per shard

    def channels(self) -> list[Channel]:
        bands = [Channel(n, "photometry", FLUX_UNIT, coord=w, transform="asinh") for n, w in BANDS.items()]
        return [*bands, Channel("redshift", "static", "")]

    def discover(self, path: str) -> list[Unit]:
        """``ZTF*_bl.csv`` files (sorted); a fingerprint also covers the ``headers.json`` beside them."""
        so = self.storage_options
        found = [path] if files.isfile(path, so) else files.glob(path, "ZTF*_bl.csv", so)
        return [Unit(f, None, _fingerprint(f, so)) for f in found]

    def read(self, units: list[Unit]) -> RawElements:
        headers: dict[str, dict] = {}  # directory -> headers.json content, loaded once per read
        quarantine: list[dict] = []
        for d in sorted({files.dirname(u.path) for u in units}):
            headers[d], q = _load_headers(d, self.storage_options)
            quarantine += q
        raw = _text.read_each(units, lambda u: self._read_file(u, headers[files.dirname(u.path)]),
                              self.label_columns)
        raw.quarantine[:0] = quarantine
        return raw

    def _read_file(self, unit: Unit, catalogue: dict) -> RawElements:
        file = _text.read_text(unit, storage_options=self.storage_options)
        lines, quarantine = file.lines, file.quarantine
        is_header = lines.str.startswith("#")
        header = lines[is_header].str.extract(r"^#\s*([^=]*?)\s*=\s*(.*?)\s*$").dropna()
        header_line = dict(zip(header[0], header.index, strict=True))
        meta = dict(zip(header[0], header[1], strict=True))
        record_id = meta.get("name") or files.basename(unit.path).removesuffix(".csv").removesuffix("_bl")
        meta.update({k: str(v) for k, v in catalogue.get(record_id, {}).items()})

        numbers = ["obsmjd", "ampl_corr", "ampl_err_corr", "magzp"]
        table, q = _text.parse_table(file, file.content(), unit, ",", usecols=COLUMNS, numeric=numbers)
        num, keep, q2 = _text.numeric_columns(table, numbers, unit, required=["obsmjd"], record_id=record_id)
        table = table[keep]
        num = {k: v[keep] for k, v in num.items()}

        names = self.channels()
        band = _normalise_filter(table["filter"])
        channel = pd.Series({c.name: i for i, c in enumerate(names)}).reindex(band).fillna(-1).to_numpy()
        wavelength = pd.Series(BANDS).reindex(band).to_numpy()
        scale = 10.0 ** (-0.4 * (num["magzp"] - AB_ZP_UJY))
        time, value, error = num["obsmjd"], num["ampl_corr"] * scale, num["ampl_err_corr"] * scale
        row, label = table.index.to_numpy(), table["filter"].fillna("").to_numpy(dtype=object)

        z = _float(meta.get("bts_z"))
        if np.isfinite(z):
            z_channel = len(names) - 1
            time, value, error = np.append(time, np.nan), np.append(value, z), np.append(error, np.nan)
            channel, wavelength = np.append(channel, z_channel), np.append(wavelength, np.nan)
            row = np.append(row, header_line.get("bts_z", -1))
            label = np.append(label, "redshift")
        cls = meta.get("bts_class", "").strip()
        records = pd.DataFrame({"record_id": [record_id], "source_file": [unit.name],
                                "class": ["" if cls == "-" else cls],
                                "t0": [_float(meta.get("bts_peak_jd")) - JD_TO_MJD]})
        return _text.elements(records, np.zeros(len(time), np.int64), time, channel, value, error,
                              wavelength, row, channel_name=label, quarantine=quarantine + q + q2)


def _normalise_filter(spelling: pd.Series) -> np.ndarray:
    """``ZTF_r``, ``ZTF r``, ``ztf-r`` -> ``ztf_r`` (vectorised)."""
    return spelling.fillna("").str.strip().str.lower().str.replace(r"[\s_\-]+", "_", regex=True).to_numpy()


def _float(text: str | None) -> float:
    """A header value as a float; NaN when missing or not a number (``-``, ``>11.9``)."""
    try:
        return float(text) if text is not None else np.nan
    except ValueError:
        return np.nan


def _fingerprint(path: str, storage_options: files.StorageOptions = None) -> str:
    headers = files.join(files.dirname(path), HEADERS_JSON)
    fp = files.fingerprint(path, storage_options)
    return (f"{fp};{HEADERS_JSON}:{files.fingerprint(headers, storage_options)}"
            if files.exists(headers, storage_options) else fp)


def _load_headers(directory: str, storage_options: files.StorageOptions = None) -> tuple[dict, list[dict]]:
    """``headers.json`` of a directory as {name: {key: value}}; a broken one gives a quarantine row."""
    path = files.join(directory, HEADERS_JSON)
    if not files.exists(path, storage_options):
        return {}, []
    try:
        data = json.loads(files.read_bytes(path, storage_options).decode("utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError("expected a JSON object of objects (name -> header keys)")
        return data, []
    except (OSError, ValueError) as exc:
        return {}, [unreadable(Unit(path, None, ""), exc)]


SOURCE = ZtfBts
