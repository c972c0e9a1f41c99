"""Bad-input corpus builders shared by the source tests, tests/test_faults.py and bench/faults.py.

The small builders (a PhysioNet stay, a zip, an edited ZTF file) are what the source tests use one by one;
:func:`build_corpus` lays out every kind of bad input at once, beside good files, one folder per source, and
says for each kind which file it is in and what quarantine reason (or error) it must give.
"""

from __future__ import annotations

import gzip
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "datasets" / "samples"


# -- PhysioNet 2019 ---------------------------------------------------------------------------------------
def physionet_columns() -> list[str]:
    from datasets.sources.physionet2019 import COLUMNS

    return list(COLUMNS)


def stay(rows: list[list[str]]) -> bytes:
    """A PhysioNet ``.psv`` stay: the header line, then ``rows`` (lists of cells)."""
    cols = physionet_columns()
    return ("|".join(cols) + "\n" + "".join("|".join(r) + "\n" for r in rows)).encode()


def stay_row(hour: int, hr: str = "80", **cells: str) -> list[str]:
    """One hourly row with HR, Age and ICULOS set (everything else NaN); ``cells`` set more columns."""
    cols = physionet_columns()
    r = ["NaN"] * len(cols)
    r[cols.index("HR")] = hr
    r[cols.index("Age")] = "60"
    r[cols.index("ICULOS")] = str(hour)
    r[cols.index("SepsisLabel")] = "0"
    for k, val in cells.items():
        r[cols.index(k)] = val
    return r


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return path


# -- ZTF BTS ----------------------------------------------------------------------------------------------
def write_desi_files(folder: Path) -> None:
    """The DESI sample as ``coadd-good.fits`` beside corrupt, truncated and empty copies and copies missing the
    FIBERMAP HDU (``coadd-nofibermap.fits``) or one arm's flux (``coadd-noarm.fits``)."""
    from astropy.io import fits

    desi = SAMPLES / "desi" / "coadd-sv3-dark-26065.fits"
    data = desi.read_bytes()
    shutil.copy(desi, folder / "coadd-good.fits")
    (folder / "coadd-corrupt.fits").write_bytes(data[:5000])
    (folder / "coadd-truncated.fits").write_bytes(data[: len(data) // 3])
    (folder / "coadd-empty.fits").write_bytes(b"")
    with fits.open(desi) as hdus:
        fits.HDUList([h for h in hdus if h.name != "FIBERMAP"]).writeto(folder / "coadd-nofibermap.fits")
        fits.HDUList([h for h in hdus if h.name != "R_FLUX"]).writeto(folder / "coadd-noarm.fits")


def ztf_bad_values(lines: list[bytes]) -> list[bytes]:
    """Lines 20..25 (1-based) of the ZTF sample: nan, inf, text, zero error, negative error, unknown filter."""
    header = (SAMPLES / "ztf_bts" / "ZTF20acvmzfv_bl.csv").read_text().split("\n")[18].split(",")
    amp, err, flt = header.index("ampl_corr"), header.index("ampl_err_corr"), header.index("filter")
    lines[19] = set_field(lines[19], amp, "nan")
    lines[20] = set_field(lines[20], amp, "inf")
    lines[21] = set_field(lines[21], amp, "abc")
    lines[22] = set_field(lines[22], err, "0")
    lines[23] = set_field(lines[23], err, "-1.5")
    lines[24] = set_field(lines[24], flt, "ZTF_x")
    return lines


def ztf_variant(folder: Path, tag: str, edit) -> str:
    """A copy of a sample ZTF file with its own object name, edited line by line (``edit(lines) -> lines``)."""
    lines = (SAMPLES / "ztf_bts" / "ZTF20acvmzfv_bl.csv").read_bytes().split(b"\n")
    lines[0] = f"#name=ZTF{tag}".encode()
    (folder / f"ZTF{tag}_bl.csv").write_bytes(b"\n".join(edit(lines)))
    return f"ZTF{tag}_bl.csv"


def set_field(line: bytes, index: int, value: str) -> bytes:
    fields = line.split(b",")
    fields[index] = value.encode()
    return b",".join(fields)


# -- the corpus -------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One kind of bad input: where it is and what it must give (a quarantine reason, or being sorted)."""

    kind: str
    source: str
    file: str  # the quarantine row's source_file (or its ``archive.zip:member`` suffix)
    reason: str  # a substring of that row's reason
    options: dict = field(default_factory=dict)


@dataclass
class Corpus:
    root: Path
    cases: list[Case]
    #: per source: the folder to ingest, the options, and the good files' record ids (nothing may change them)
    folders: dict[str, Path]
    options: dict[str, dict]
    good_records: dict[str, list[str]]


def build_corpus(root: Path) -> Corpus:
    """Every kind of bad input, each beside good files of its source."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    folders: dict[str, Path] = {}
    options: dict[str, dict] = {}
    good: dict[str, list[str]] = {}

    # PhysioNet: the bundled set B sample (100 good stays) and one zip of broken stays.
    d = folders["physionet2019"] = root / "physionet2019"
    d.mkdir()
    shutil.copy(SAMPLES / "physionet2019" / "training_setB_sample.zip", d / "a_good.zip")
    ok = stay([stay_row(1), stay_row(2)])
    huge_cells = {c: "1" for c in physionet_columns()[:34]}
    members = {
        "bad/q01.psv": stay([stay_row(1), stay_row(2)])[:-1] + b"|extra|fields\n",
        "bad/q02.psv": stay([stay_row(1, hr="eighty"), stay_row(2)]),
        "bad/q03.psv": stay([stay_row(1, hr="inf"), stay_row(2)]),
        "bad/q04.psv": stay([stay_row(1, hr="NaN", Temp="nan"), stay_row(2)]),
        "bad/q05.psv": b"\xff\xfe" + ok,
        "bad/q06.psv": ok.replace(b"|", b","),
        "bad/q07.psv": b"",
        "bad/q08.psv": stay([stay_row(2), stay_row(1), stay_row(1, hr="81")]),
        "bad/q09.psv": stay([]),
        "bad/q10.psv": stay([stay_row(h, **huge_cells) for h in range(1, 6002)]),
        "bad/p100001.psv": ok,  # the same stay id as one in a_good.zip
        "../../evil.psv": ok,
        "/abs/evil2.psv": ok,
    }
    write_zip(d / "b_bad.zip", members)
    (d / "c_truncated.zip").write_bytes((d / "b_bad.zip").read_bytes()[:300])
    (d / "d_corrupt.zip").write_bytes(b"PK\x03\x04" + bytes(np.random.default_rng(0).integers(0, 256, 4000,
                                                                                              dtype=np.uint8)))
    pn = "physionet2019"
    cases += [
        Case("malformed row (too many fields)", pn, "bad/q01.psv", "malformed row"),
        Case("wrong dtype (text in a numeric cell)", pn, "bad/q02.psv", "not a number: 'eighty'"),
        Case("infinite value", pn, "bad/q03.psv", "value is not finite"),
        Case("non-UTF-8 bytes", pn, "bad/q05.psv", "UnicodeDecodeError"),
        Case("wrong delimiter", pn, "bad/q06.psv", "missing columns"),
        Case("empty file", pn, "bad/q07.psv", "empty file"),
        Case("unsorted and duplicate times", pn, "bad/q08.psv", "duplicate (time, channel, coord)"),
        Case("record with no rows", pn, "bad/q09.psv", "empty"),
        Case("huge record", pn, "bad/q10.psv", "record has more than"),
        Case("duplicate record id (already stored)", pn, "bad/p100001.psv", "duplicate record id"),
        Case("path traversal name in an archive", pn, "../../evil.psv", "unsafe path"),
        Case("absolute path name in an archive", pn, "/abs/evil2.psv", "unsafe path"),
        Case("truncated zip", pn, "c_truncated.zip", "BadZipFile"),
        Case("corrupt zip", pn, "d_corrupt.zip", "BadZipFile"),
    ]
    good[pn] = _physionet_ids(SAMPLES / "physionet2019" / "training_setB_sample.zip")

    # PLAsTiCC: the sample with edited lines; a truncated gzip and a corrupt gzip, each with its metadata.
    d = folders["plasticc"] = root / "plasticc"
    d.mkdir()
    meta = (SAMPLES / "plasticc" / "plasticc_train_metadata.csv.gz").read_bytes()
    with gzip.open(SAMPLES / "plasticc" / "plasticc_train_lightcurves.csv.gz", "rt") as f:
        lines = f.readlines()
    oid = lines[1].split(",")[0]
    lines[5] = "this,row,is,short\n"
    lines[6] = f"{oid},60000.0,9,1.0,1.0,0\n"
    lines[7] = f"{oid},60001.0,1,1.0,-2.0,0\n"
    lines[8] = f"{oid},60002.0,1,1.0,0.0,0\n"
    lines[9] = f"{oid},60003.0,1,1.0,inf,0\n"
    lines.append("999999999,60000.0,1,1.0,1.0,0\n")
    (d / "a_metadata.csv.gz").write_bytes(meta)
    with gzip.open(d / "a_lightcurves.csv.gz", "wt") as f:
        f.writelines(lines)
    full = gzip.compress("".join(lines[:400]).encode())
    (d / "b_metadata.csv.gz").write_bytes(meta)
    (d / "b_lightcurves.csv.gz").write_bytes(full[: len(full) // 2])
    (d / "c_metadata.csv.gz").write_bytes(meta)
    (d / "c_lightcurves.csv.gz").write_bytes(full[:10] + b"\x00garbage, not deflate" * 40)
    pl = "plasticc"
    cases += [
        Case("short row", pl, "a_lightcurves.csv.gz", "malformed row"),
        Case("unknown channel (passband 9)", pl, "a_lightcurves.csv.gz", "unknown channel 'passband 9'"),
        Case("negative error", pl, "a_lightcurves.csv.gz", "error is infinite, zero or negative"),
        Case("object without a metadata row", pl, "a_lightcurves.csv.gz", "object without metadata row"),
        Case("truncated gzip", pl, "b_lightcurves.csv.gz", "unreadable"),
        Case("corrupt gzip", pl, "c_lightcurves.csv.gz", "unreadable"),
    ]
    good[pl] = []  # the edited file is the good data here; its other objects are checked by counts

    # ZTF BTS: a good copy and edited copies (as tests/test_sources_astro.py builds them).
    d = folders["ztf_bts"] = root / "ztf_bts"
    d.mkdir()
    ztf_variant(d, "good", lambda lines: lines)
    trunc = ztf_variant(d, "trunc", lambda lines: [*lines[:-2], lines[-2][:40]])
    delim = ztf_variant(d, "delim", lambda lines: [x.replace(b",", b";") for x in lines])
    latin = ztf_variant(d, "latin", lambda lines: [*lines[:29], lines[29] + b"\xff\xfe", *lines[30:]])
    vals = ztf_variant(d, "values", ztf_bad_values)
    zt = "ztf_bts"
    cases += [
        Case("truncated last line", zt, trunc, "malformed line"),
        Case("wrong delimiter (;)", zt, delim, "missing column(s) 'obsmjd'"),
        Case("non-UTF-8 line", zt, latin, "line is not valid UTF-8"),
        Case("NaN value", zt, vals, "value is not finite"),
        Case("zero error", zt, vals, "error is infinite, zero or negative"),
        Case("unknown channel (filter ZTF_x)", zt, vals, "unknown channel 'ZTF_x'"),
    ]
    good[zt] = ["ZTFgood"]

    # MACHO: a good star; a star with edited lines; an empty band file.
    d = folders["macho"] = root / "macho"
    d.mkdir()
    shutil.copy(SAMPLES / "macho" / "lc_2.4907.2086.B.mjd", d)
    shutil.copy(SAMPLES / "macho" / "lc_2.4907.2086.R.mjd", d)
    lines = (SAMPLES / "macho" / "lc_1.4418.1930.R.mjd").read_text().split("\n")
    lines[5] = "48965.5 -4.6"
    lines[6] = "48984.4 abc 0.1"
    lines[8] = "48987.4 -4.5 0"
    lines[9], lines[10] = lines[10], lines[9]  # unsorted: sorted, not rejected
    (d / "lc_1.4418.1930.R.mjd").write_text("\n".join(lines))
    (d / "lc_7.7.7.B.mjd").write_text("#MJD Mag Err\n49000.1 -5.0 0.02\n")
    (d / "lc_7.7.7.R.mjd").write_bytes(b"")
    mc = "macho"
    cases += [
        Case("too few fields", mc, "lc_1.4418.1930.R.mjd", "malformed line: 2 field(s)"),
        Case("text where a number belongs", mc, "lc_1.4418.1930.R.mjd", "Mag 'abc' is not a number"),
        Case("empty band file", mc, "lc_7.7.7.R.mjd", "empty file"),
    ]
    good[mc] = ["2.4907.2086"]

    # DESI: a good coadd; corrupt, truncated, empty files; files missing an HDU.

    d = folders["desi"] = root / "desi"
    d.mkdir()
    write_desi_files(d)
    de = "desi"
    cases += [
        Case("corrupt FITS", de, "coadd-corrupt.fits", "Empty or corrupt FITS file"),
        Case("truncated FITS", de, "coadd-truncated.fits", "file may be truncated"),
        Case("empty FITS", de, "coadd-empty.fits", "unreadable: OSError"),
        Case("FITS without its FIBERMAP HDU", de, "coadd-nofibermap.fits", "missing FIBERMAP HDU"),
        Case("FITS without one arm's HDU", de, "coadd-noarm.fits", "arm R skipped"),
    ]
    good[de] = []  # every file repeats the same TARGETIDs: the good file's are stored first (checked by counts)

    # Generic table: bad rows, units, a parquet file with a text value column, a file without the value column.
    import pandas as pd

    d = folders["table"] = root / "table"
    d.mkdir()
    text = ("id,t,ch,v,e,unit\n"
            "a,1.0,flux,10,1,mJy\n"
            "a,2.0,flux,20,1,Jy\n"
            "a,3.0,flux,30,1,s\n"
            "a,4.0,flux,40\n"
            "a,5.0,flux,abc,1,mJy\n"
            "a,7.0,flux,9,-inf,mJy\n"
            ",11.0,flux,9,1,mJy\n"
            "a,inf,flux,9,1,mJy\n")
    (d / "a.csv").write_text(text)
    (d / "b.csv").write_text("id,t,ch,v,e,unit\nb,1.0,flux,1,0.1,mJy\nb,2.0,flux,2,0.1,mJy\n")
    pd.DataFrame({"id": ["d", "d"], "t": [1.0, 2.0], "ch": ["flux", "flux"], "v": ["3.0", "x"],
                  "e": [0.1, 0.1], "unit": ["mJy", "mJy"]}).to_parquet(d / "d.parquet")
    (d / "e.csv").write_text("id,t,ch,flux\ne,1.0,flux,3\n")
    options["table"] = dict(record_id="id", time="t", channel="ch", value="v", error="e", unit="unit")
    tb = "table"
    cases += [
        Case("unit that does not convert", tb, "a.csv", "unknown channel 'flux [s]'"),
        Case("missing record id", tb, "a.csv", "id is missing"),
        Case("infinite error", tb, "a.csv", "error is infinite, zero or negative"),
        Case("infinite time", tb, "a.csv", "time is infinite"),
        Case("wrong dtype (text column in parquet)", tb, "d.parquet", "not a number"),
        Case("file without the value column", tb, "e.csv", "missing column(s) 'v'"),
    ]
    good[tb] = ["b"]
    return Corpus(root, cases, folders, options, good)


def _physionet_ids(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return sorted(Path(n).stem for n in z.namelist() if n.endswith(".psv"))
