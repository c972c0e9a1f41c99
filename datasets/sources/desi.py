"""DESI coadded spectra (``coadd-*.fits``): one record per targeted fibre, ``record_id`` = ``str(TARGETID)``.

Two modalities per record:

- ``spectrum``: channels ``desi_b``, ``desi_r``, ``desi_z`` (the spectrograph arms); one element per
  pixel, ``coord`` = wavelength (Angstrom, from ``<ARM>_WAVELENGTH``), ``value`` = ``<ARM>_FLUX`` in
  ``1e-17 erg / (s cm2 Angstrom)``, ``error`` = ``1 / sqrt(<ARM>_IVAR)``. Pixels with ``MASK != 0`` or
  ``IVAR <= 0`` carry no information; they are kept as elements with an infinite error (DESI's own
  convention: ``IVAR = 0``), so validation quarantines and counts every one of them ("error is
  infinite, zero or negative") and each file reconciles pixel by pixel. Transform ``asinh``.
- ``photometry``: the Legacy Surveys imaging in the ``FIBERMAP`` (``FLUX_G/R/Z/W1/W2``, nanomaggies,
  errors from ``FLUX_IVAR_*`` as above), channels ``ls_g``, ``ls_r``, ``ls_z``, ``wise_w1``,
  ``wise_w2``; ``coord`` = effective wavelengths: DECam g/r/z ~4810/6420/9180 Angstrom (pivot
  wavelengths, rounded; the northern BASS/MzLS bands differ by < 2 %) and WISE W1/W2 33526/46028 Angstrom
  (Wright et al. 2010). Transform ``asinh``.

Time (MJD days): spectral pixels get the mean MJD of the target's exposures, ``FIBERMAP.MEAN_MJD`` when
present, else the mean of ``EXP_FIBERMAP.MJD`` over the target's rows, else NaN; ``t0`` is the same value.
Photometric elements get NaN (static): the Legacy Surveys fluxes are measured on imaging stacked over
years, not at the spectroscopic epoch.

``row``: for photometry the 1-based ``FIBERMAP`` row; for pixels the 1-based pixel index in the file's arms
concatenated in b, r, z order. Sky fibres (``OBJTYPE`` ``SKY``) and fibres with a negative ``TARGETID``
(sky or unassigned) give one quarantine row each and no elements; the row counts the fibre's pixels and
fluxes (``elements``), so a file reconciles as every fibre's pixels and fluxes read. A file without ``FIBERMAP`` is one
quarantine row; a missing or malformed arm, a missing flux column or a truncated file gives a
quarantine row and the rest of the file is read.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from astropy.io import fits

from datasets.format import QUARANTINE_COLUMNS, Channel, RawElements
from datasets.sources import _text, files
from datasets.sources.base import MJD_EPOCH, Source, Unit

SPECTRUM_UNIT = "1e-17 erg / (s cm2 Angstrom)"
ARMS = ("B", "R", "Z")
#: FIBERMAP band -> (channel name, effective wavelength in Angstrom)
PHOTOMETRY = {"G": ("ls_g", 4810.0), "R": ("ls_r", 6420.0), "Z": ("ls_z", 9180.0),
              "W1": ("wise_w1", 33526.0), "W2": ("wise_w2", 46028.0)}


class Desi(Source):
    """DESI coadds: spectra in 1e-17 erg/s/cm2/Angstrom per pixel and broadband fluxes in nanomaggies."""

    name = "desi"
    time_unit = "d"
    time_reference = "MJD (days since 1858-11-17 00:00 UTC)"
    time_epoch = MJD_EPOCH
    label_columns = ("t0",)
    units_per_shard = 1  # a full coadd (500 fibres x ~8,000 pixels) holds ~4 M elements

    def channels(self) -> list[Channel]:
        arms = [Channel(f"desi_{a.lower()}", "spectrum", SPECTRUM_UNIT, transform="asinh") for a in ARMS]
        bands = [Channel(n, "photometry", "nanomaggy", coord=w, transform="asinh")
                 for n, w in PHOTOMETRY.values()]
        return arms + bands

    def discover(self, path: str) -> list[Unit]:
        """``coadd*.fits`` / ``coadd*.fits.gz`` files, sorted."""
        so = self.storage_options
        found = [path] if files.isfile(path, so) else sorted(
            files.glob(path, "coadd*.fits", so) + files.glob(path, "coadd*.fits.gz", so))
        return [Unit(f, None, files.fingerprint(f, so)) for f in found]

    def read(self, units: list[Unit]) -> RawElements:
        return _text.read_each(units, self._read_file, self.label_columns)

    def _read_file(self, unit: Unit) -> RawElements:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with files.open_input(unit.path, self.storage_options) as f, \
                    fits.open(f, memmap=False, lazy_load_hdus=True) as hdus:
                raw = self._read_hdus(unit, hdus)
        raw.quarantine += [_row(unit, "file", f"file may be truncated: {w.message}")
                           for w in caught if "truncated" in str(w.message)][:1]
        return raw

    def _read_hdus(self, unit: Unit, hdus: fits.HDUList) -> RawElements:
        if "FIBERMAP" not in hdus:
            return RawElements.empty([_row(unit, "file", "missing FIBERMAP HDU: no TARGETIDs, no records")],
                                     self.label_columns)
        fibermap = hdus["FIBERMAP"].data
        tid = np.asarray(fibermap["TARGETID"], dtype=np.int64)
        objtype = (np.char.strip(np.asarray(fibermap["OBJTYPE"]).astype(str))
                   if "OBJTYPE" in fibermap.columns.names else np.full(len(tid), ""))
        sky = (tid < 0) | (objtype == "SKY")
        quarantine: list[dict] = []
        fibres = np.flatnonzero(~sky)
        mjd = _mean_mjd(hdus, fibermap, tid)[fibres]
        records = pd.DataFrame({"record_id": tid[fibres].astype(str), "source_file": unit.name, "t0": mjd})

        parts = []
        offset = 0
        for channel, arm in enumerate(ARMS):  # three arms
            try:
                part, npix = _arm(hdus, arm, fibres, channel, mjd, offset)
                parts.append(part)
                offset += npix
            except (KeyError, ValueError, TypeError, OSError, IndexError) as exc:
                quarantine.append(_row(unit, "file", f"arm {arm} skipped: {type(exc).__name__}: {exc}"))
        n_bands = 0
        for channel, (band, (_, wavelength)) in enumerate(PHOTOMETRY.items(), start=len(ARMS)):
            if not {f"FLUX_{band}", f"FLUX_IVAR_{band}"} <= set(fibermap.columns.names):
                why = f"FIBERMAP lacks FLUX_{band} or FLUX_IVAR_{band}: band skipped"
                quarantine.append(_row(unit, "file", why))
                continue
            value = np.asarray(fibermap[f"FLUX_{band}"], np.float64)[fibres]
            ivar = np.asarray(fibermap[f"FLUX_IVAR_{band}"], np.float64)[fibres]
            parts.append(_columns(np.arange(len(fibres)), np.nan, channel, value, _error(ivar), wavelength,
                                  fibres + 1))
            n_bands += 1
        # one row per sky fibre, counting the pixels and fluxes it has in this file as read and quarantined
        per_fibre = offset + n_bands
        quarantine[:0] = pd.DataFrame({
            "source_file": unit.name, "row": np.flatnonzero(sky) + 1, "record_id": tid[sky].astype(str),
            "field": "record", "elements": per_fibre,
            "reason": np.where(tid[sky] < 0, "negative TARGETID (sky or unassigned fibre)",
                               "sky fibre (OBJTYPE SKY)")})[QUARANTINE_COLUMNS].to_dict("records")
        cols = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in _COLUMNS}
        return _text.elements(records, cols["record"], cols["time"], cols["channel"], cols["value"],
                              cols["error"], cols["coord"], cols["row"], quarantine=quarantine)


_COLUMNS = ("record", "time", "channel", "value", "error", "coord", "row")


def _columns(*values) -> dict[str, np.ndarray]:
    n = len(values[0])
    return {k: np.broadcast_to(v, (n,)) for k, v in zip(_COLUMNS, values, strict=True)}


def _arm(hdus: fits.HDUList, arm: str, fibres: np.ndarray, channel: int, mjd: np.ndarray,
         offset: int) -> tuple[dict[str, np.ndarray], int]:
    """The pixels of one arm for the given fibres (record-major), and the arm's pixel count."""
    wave = np.asarray(hdus[f"{arm}_WAVELENGTH"].data, np.float64)
    flux = np.asarray(hdus[f"{arm}_FLUX"].data, np.float64)
    ivar = np.asarray(hdus[f"{arm}_IVAR"].data, np.float64)
    mask = np.asarray(hdus[f"{arm}_MASK"].data) if f"{arm}_MASK" in hdus else np.zeros(ivar.shape, np.int64)
    npix = len(wave)
    expected = (hdus["FIBERMAP"].data.shape[0], npix)
    for name, a in (("FLUX", flux), ("IVAR", ivar), ("MASK", mask)):
        if a.shape != expected:
            raise ValueError(f"{arm}_{name} has shape {a.shape}, expected {expected} (fibres, pixels)")
    error = np.where(mask == 0, _error(ivar), np.inf)[fibres]
    n = len(fibres)
    record = np.repeat(np.arange(n), npix)
    return _columns(record, mjd[record], channel, flux[fibres].ravel(), error.ravel(), np.tile(wave, n),
                    np.tile(np.arange(offset + 1, offset + npix + 1), n)), npix


def _error(ivar: np.ndarray) -> np.ndarray:
    """``1/sqrt(ivar)``; infinite where ``ivar <= 0`` or NaN (no information)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.inf)


def _mean_mjd(hdus: fits.HDUList, fibermap: fits.FITS_rec, tid: np.ndarray) -> np.ndarray:
    """Per fibre: ``MEAN_MJD``, else the mean ``EXP_FIBERMAP.MJD`` of its TARGETID, else NaN."""
    if "MEAN_MJD" in fibermap.columns.names:
        return np.asarray(fibermap["MEAN_MJD"], np.float64)
    if "EXP_FIBERMAP" in hdus and {"TARGETID", "MJD"} <= set(hdus["EXP_FIBERMAP"].columns.names):
        exp = hdus["EXP_FIBERMAP"].data
        mjd = pd.Series(np.asarray(exp["MJD"], np.float64))
        return mjd.groupby(np.asarray(exp["TARGETID"], np.int64)).mean().reindex(tid).to_numpy()
    return np.full(len(tid), np.nan)


def _row(unit: Unit, field: str, reason: str, row: int = -1, record_id: str = "") -> dict:
    return {"source_file": unit.name, "row": int(row), "record_id": record_id, "field": field,
            "reason": reason, "elements": 0}


SOURCE = Desi
