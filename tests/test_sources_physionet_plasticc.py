"""PhysioNet 2019 and PLAsTiCC readers: counts against an independent count, and broken inputs."""

from __future__ import annotations

import csv
import gzip
import io
import math
import shutil
import zipfile

import numpy as np
import pytest
from corpus import stay, stay_row, write_zip

from datasets.schema import validate
from datasets.sources import get_source
from datasets.sources.physionet2019 import COLUMNS, N_SERIES, STATIC

MEASURED = COLUMNS[:N_SERIES]


def count_psv(text: str) -> tuple[int, int, int]:
    """(time-series elements, static elements, sepsis) of one stay, by the csv module."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter="|"))
    series = sum(1 for r in rows for c in MEASURED if r[c] != "NaN")
    static = sum(1 for c in STATIC if rows and rows[0][c] != "NaN")
    return series, static, int(any(r["SepsisLabel"] == "1" for r in rows))


def read_validated(name: str, path, **options):
    src = get_source(name, **options)
    raw = src.read(src.discover(str(path)))
    return src, raw, validate(raw, len(src.channels()))


def test_physionet_counts_match_an_independent_count(samples):
    expected_series = expected_static = 0
    sepsis = {}
    for z in sorted((samples / "physionet2019").glob("*.zip")):
        with zipfile.ZipFile(z) as zf:
            for name in zf.namelist():
                if name.endswith(".psv"):
                    s, st, lab = count_psv(zf.read(name).decode())
                    expected_series += s
                    expected_static += st
                    sepsis[name.split("/")[-1][:-4]] = lab
    src, raw, v = read_validated("physionet2019", samples / "physionet2019")
    static = np.isnan(v.elements.time)
    assert (~static).sum() == expected_series and static.sum() == expected_static
    assert v.elements.n_records == len(sepsis) == 300
    got = dict(zip(v.elements.records["record_id"], v.elements.records["sepsis"], strict=True))
    assert got == sepsis and sum(sepsis.values()) > 0
    assert v.quarantine.empty and (v.counts["read"] == v.counts["stored"]).all()
    names = [c.name for c in src.channels()]
    assert names[:N_SERIES] == MEASURED
    assert {c.modality for c in src.channels()} == {"vitals", "labs", "static"}


def test_channel_units_parse_with_astropy():
    from datasets.units import parse_unit

    for name in ("physionet2019", "plasticc"):
        for ch in get_source(name).channels():
            parse_unit(ch.unit)


def test_plasticc_counts_match_an_independent_count(samples):
    d = samples / "plasticc"
    with gzip.open(d / "plasticc_train_lightcurves.csv.gz", "rt") as f:
        obs = list(csv.DictReader(f))
    with gzip.open(d / "plasticc_train_metadata.csv.gz", "rt") as f:
        meta = list(csv.DictReader(f))
    _, _, v = read_validated("plasticc", d)
    es = v.elements
    assert es.n_records == len(meta) == 300
    assert (~np.isnan(es.time)).sum() == len(obs)
    assert np.isnan(es.time).sum() == 2 * len(meta)  # host photo-z and MW E(B-V) per object
    first = es.records["record_id"].tolist().index(obs[0]["object_id"])
    rec = es.elements(first)
    mine = rec[~np.isnan(rec["time"])]
    theirs = [o for o in obs if o["object_id"] == obs[0]["object_id"]]
    assert len(mine) == len(theirs)
    assert math.isclose(float(mine["value"].sum()), sum(float(o["flux"]) for o in theirs), rel_tol=1e-5)
    assert set(es.records["target"].astype(int)) == {int(m["target"]) for m in meta}


# -- broken inputs -----------------------------------------------------------------------------------
def test_physionet_broken_inputs_are_quarantined_and_the_rest_is_read(tmp_path):
    good = stay([stay_row(1), stay_row(2)])
    members = {
        "set/p1.psv": good,
        "set/p2.psv": stay([stay_row(1), stay_row(2)])[:-1] + b"|extra|fields\n",        # malformed row
        "set/p3.psv": stay([stay_row(1, hr="eighty"), stay_row(2)]),                      # non-numeric cell
        "set/p4.psv": stay([stay_row(1, hr="inf"), stay_row(2)]),                          # infinite value
        "set/p5.psv": b"\xff\xfe" + good,                                           # not UTF-8
        "set/p6.psv": good.replace(b"|", b","),                                     # wrong delimiter
        "set/p7.psv": b"",                                                          # empty file
        "set/p8.psv": stay([stay_row(2), stay_row(1), stay_row(1, hr="81")]),                  # unsorted + duplicate
        "../../evil.psv": good,                                                     # path traversal
    }
    write_zip(tmp_path / "a.zip", members)
    (tmp_path / "b.zip").write_bytes((tmp_path / "a.zip").read_bytes()[:300])      # truncated zip
    src = get_source("physionet2019")
    units = src.discover(str(tmp_path))
    raw = src.read(units)
    v = validate(raw, len(src.channels()))
    q = v.quarantine
    why = {r.source_file.split(":")[-1]: r.reason for r in q.itertuples()}
    assert "malformed row" in why["set/p2.psv"]
    assert "not a number: 'eighty'" in why["set/p3.psv"]
    assert why["set/p4.psv"] == "value is not finite"
    assert "UnicodeDecodeError" in why["set/p5.psv"]
    assert "missing columns" in why["set/p6.psv"]
    assert "empty file" in why["set/p7.psv"]
    assert why["set/p8.psv"] == "duplicate (time, channel, coord)"
    assert "unsafe path" in why["../../evil.psv"]
    assert "BadZipFile" in why["b.zip"]
    assert v.records_resorted >= 1
    stored = set(v.elements.records["record_id"])
    assert {"p1", "p2", "p3", "p4", "p8"} <= stored   # the good rows of damaged stays survive
    assert (v.counts["read"] == v.counts["stored"] + v.counts["quarantined"]).all()


def test_physionet_file_that_vanishes_before_reading(tmp_path):
    d = tmp_path / "stays"
    d.mkdir()
    for i in range(3):
        (d / f"p{i}.psv").write_bytes(stay([stay_row(1)]))
    src = get_source("physionet2019")
    units = src.discover(str(d))
    (d / "p1.psv").unlink()
    v = validate(src.read(units), len(src.channels()))
    assert v.elements.n_records == 2
    assert "FileNotFoundError" in v.quarantine["reason"].iloc[0]


def test_plasticc_broken_inputs(tmp_path, samples):
    d = tmp_path / "p"
    d.mkdir()
    shutil.copy(samples / "plasticc" / "plasticc_train_metadata.csv.gz", d)
    with gzip.open(samples / "plasticc" / "plasticc_train_lightcurves.csv.gz", "rt") as f:
        lines = f.readlines()[:200]
    oid = lines[1].split(",")[0]
    lines[5] = "this,row,is,short\n"
    lines[6] = f"{oid},60000.0,9,1.0,1.0,0\n"           # unknown passband
    lines[7] = f"{oid},60001.0,1,1.0,-2.0,0\n"          # negative error
    lines.append("999999999,60000.0,1,1.0,1.0,0\n")     # object without a metadata row
    with gzip.open(d / "plasticc_train_lightcurves.csv.gz", "wt") as f:
        f.writelines(lines)
    src = get_source("plasticc")
    raw = src.read(src.discover(str(d)))
    v = validate(raw, len(src.channels()))
    q = v.quarantine.set_index("reason")
    assert q.loc[[r for r in q.index if r.startswith("malformed row")][0], "row"] == 6
    assert q.loc["unknown channel 'passband 9'", "row"] == 7
    assert q.loc["error is infinite, zero or negative", "row"] == 8
    assert "unknown channel 'object without metadata row'" in q.index
    assert (v.counts["read"] == v.counts["stored"] + v.counts["quarantined"]).all()
    assert v.elements.n_elements > 0


def test_plasticc_truncated_gzip_and_missing_metadata(tmp_path, samples):
    d = tmp_path / "p"
    d.mkdir()
    data = (samples / "plasticc" / "plasticc_train_lightcurves.csv.gz").read_bytes()
    (d / "plasticc_train_lightcurves.csv.gz").write_bytes(data[: len(data) // 2])
    shutil.copy(samples / "plasticc" / "plasticc_train_metadata.csv.gz", d)
    (d / "other_lightcurves.csv").write_text("object_id,mjd,passband,flux,flux_err,detected_bool\n")
    src = get_source("plasticc")
    units = src.discover(str(d))
    v = validate(src.read(units), len(src.channels()))
    reasons = " ".join(v.quarantine["reason"])
    assert "no metadata file" in reasons
    assert v.quarantine["source_file"].nunique() == 2


@pytest.mark.parametrize("name", ["physionet2019", "plasticc"])
def test_unknown_path_finds_nothing(tmp_path, name):
    assert get_source(name).discover(str(tmp_path)) == []
