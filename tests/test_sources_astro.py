"""Astronomy sources (ZTF BTS, MACHO, DESI) and the generic table source, on the bundled samples and on
bad input made here. Counts are checked against independent counts (csv module, line counting, astropy)."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import astropy.units as u
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table
from corpus import write_desi_files, ztf_bad_values, ztf_variant

import datasets
from datasets.schema import validate
from datasets.sources import get_source

SAMPLES = Path(datasets.__file__).parent / "samples"
ZTF_SPELLING = {"ZTF_g": "ztf_g", "ZTF g": "ztf_g", "ZTF_r": "ztf_r", "ZTF r": "ztf_r", "ZTF_i": "ztf_i",
                "ZTF i": "ztf_i"}
TABLE_MAPPING = dict(record_id="star", time="mjd", channel="band", value="mag", error="mag_err", unit="unit",
                     labels={"field": "float"}, channel_coords={"B": 5150.0, "R": 6850.0},
                     default_modality="photometry")


def ingest(src, path):
    """discover + read + validate; asserts reconciliation (read == stored + quarantined per file), where
    read = raw elements + elements the source itself quarantined (lines it could not parse)."""
    raw = src.read(src.discover(str(path)))
    checked = validate(raw, src.channels())
    c = checked.counts
    assert (c["read"] == c["stored"] + c["quarantined"]).all(), c
    assert c["read"].sum() == len(raw.record) + sum(q["elements"] for q in raw.quarantine)
    return raw, checked


def reasons(raw, checked=None, file=None) -> list[str]:
    q = checked.quarantine if checked is not None else pd.DataFrame(raw.quarantine)
    if file is not None and len(q):
        q = q[q["source_file"] == file]
    return list(q["reason"]) if len(q) else []


def names(raw, src) -> np.ndarray:
    table = [c.name for c in src.channels()]
    return np.array([table[i] if i >= 0 else "?" for i in raw.channel])


@pytest.mark.parametrize("source", ["ztf_bts", "macho", "desi"])
def test_channel_units_parse_and_discovery_is_stable(source):
    src = get_source(source)
    for ch in src.channels():
        u.Unit(ch.unit)
    u.Unit(src.time_unit)
    first = src.discover(str(SAMPLES / source))
    assert first == src.discover(str(SAMPLES / source)) and first
    assert all(unit.fingerprint for unit in first)


# -- ZTF BTS -----------------------------------------------------------------------------------------


def test_ztf_sample_counts_values_and_labels():
    src = get_source("ztf_bts")
    raw, checked = ingest(src, SAMPLES / "ztf_bts")
    headers = json.loads((SAMPLES / "ztf_bts" / "headers.json").read_text())
    expected: Counter = Counter()
    first_row = {}
    for path in sorted((SAMPLES / "ztf_bts").glob("ZTF*_bl.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
        expected.update(ZTF_SPELLING[r["filter"]] for r in rows)
        first_row[path.name] = rows[0]
    expected["redshift"] = len(headers)  # both objects have a numeric bts_z
    assert Counter(names(raw, src)) == expected
    assert checked.quarantine.empty and checked.elements.n_elements == sum(expected.values())

    recs = raw.records.set_index("record_id")
    for name, entry in headers.items():
        assert recs.loc[name, "class"] == entry["bts_class"]
        assert recs.loc[name, "t0"] == pytest.approx(float(entry["bts_peak_jd"]) - 2400000.5)
        i = recs.index.get_loc(name)
        z = raw.value[(raw.record == i) & (names(raw, src) == "redshift")]
        assert z == pytest.approx([float(entry["bts_z"])])
        assert np.isnan(raw.time[(raw.record == i) & (names(raw, src) == "redshift")]).all()
    # first data row of a file (line 20: 18 header lines, the column line): flux on the AB uJy scale
    r = first_row["ZTF20acvmzfv_bl.csv"]
    at = (raw.row == 20) & (raw.records["record_id"].to_numpy()[raw.record] == "ZTF20acvmzfv")
    scale = 10 ** (-0.4 * (float(r["magzp"]) - 23.9))
    assert raw.time[at] == pytest.approx([float(r["obsmjd"])])
    assert raw.value[at] == pytest.approx([float(r["ampl_corr"]) * scale], rel=1e-6)
    assert raw.error[at] == pytest.approx([float(r["ampl_err_corr"]) * scale], rel=1e-6)
    wavelength = {c.name: c.coord for c in src.channels()}[ZTF_SPELLING[r["filter"]]]
    assert raw.coord[at] == pytest.approx([wavelength])


def test_ztf_both_filter_spellings_map_to_one_channel():
    src = get_source("ztf_bts")
    raw = src.read(src.discover(str(SAMPLES / "ztf_bts" / "ZTF20acuobve_bl.csv")))
    spelled = raw.channel_name
    assert {"ZTF r", "ZTF_r", "ZTF g", "ZTF_g"} <= set(spelled)
    ch = {c.name: i for i, c in enumerate(src.channels())}
    assert (raw.channel[np.isin(spelled, ["ZTF r", "ZTF_r"])] == ch["ztf_r"]).all()
    assert (raw.channel[np.isin(spelled, ["ZTF g", "ZTF_g"])] == ch["ztf_g"]).all()
    assert (raw.coord[raw.channel == ch["ztf_r"]] == np.float32(6366.4)).all()


def test_ztf_bad_input_is_quarantined_and_other_files_come_through(tmp_path):
    files = {
        "good": ztf_variant(tmp_path, "good", lambda lines: lines),
        "truncated": ztf_variant(tmp_path, "trunc", lambda lines: [*lines[:-2], lines[-2][:40]]),
        "delimiter": ztf_variant(tmp_path, "delim", lambda lines: [x.replace(b",", b";") for x in lines]),
        "utf8": ztf_variant(tmp_path, "latin",
                             lambda lines: [*lines[:29], lines[29] + b"\xff\xfe", *lines[30:]]),
        "values": ztf_variant(tmp_path, "values", ztf_bad_values),
    }
    (tmp_path / "ZTFempty_bl.csv").write_bytes(b"")
    src = get_source("ztf_bts")
    raw, checked = ingest(src, tmp_path)
    n_rows = 513

    assert "unreadable: ValueError: empty file" in reasons(raw, file="ZTFempty_bl.csv")
    [why] = reasons(raw, file=files["delimiter"])
    assert "missing column(s) 'obsmjd'" in why and files["delimiter"] in why
    last = (SAMPLES / "ztf_bts" / "ZTF20acvmzfv_bl.csv").read_bytes().split(b"\n")[-2]
    n_fields = last[:40].count(b",") + 1
    assert reasons(raw, file=files["truncated"]) == [f"malformed line: {n_fields} field(s), expected 57"]
    assert raw.quarantine[[q["source_file"] for q in raw.quarantine].index(files["truncated"])]["row"] == 532
    assert reasons(raw, file=files["utf8"]) == ["line is not valid UTF-8"]
    assert reasons(raw, file=files["values"]) == ["ampl_corr 'abc' is not a number"]
    q = checked.quarantine.set_index("source_file").loc[[files["values"]]].set_index("reason")
    assert q.loc["value is not finite", "elements"] == 2
    assert q.loc["error is infinite, zero or negative", "elements"] == 2
    assert q.loc["unknown channel 'ZTF_x'", ["elements", "row"]].tolist() == [1, 25]

    read = checked.counts.set_index("source_file")["read"]
    assert read[files["truncated"]] == read[files["utf8"]] == n_rows + 1  # dropped lines count as read
    stored = checked.counts.set_index("source_file")["stored"]
    assert stored[files["good"]] == n_rows + 1  # + redshift
    assert stored[files["truncated"]] == n_rows  # one line lost, redshift kept
    assert stored[files["utf8"]] == n_rows
    assert stored[files["values"]] == n_rows + 1 - 6
    assert set(checked.elements.records["record_id"]) == {"ZTFgood", "ZTFtrunc", "ZTFlatin", "ZTFvalues"}


# -- MACHO -------------------------------------------------------------------------------------------


def _data_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


def test_macho_sample_counts_and_star_with_only_r():
    src = get_source("macho")
    raw, checked = ingest(src, SAMPLES / "macho")
    folder = SAMPLES / "macho"
    assert checked.quarantine.empty
    recs = list(raw.records["record_id"])
    assert sorted(recs) == ["1.4418.1930", "2.4907.2086"]
    got = Counter(zip(raw.records["record_id"].to_numpy()[raw.record], names(raw, src), strict=True))
    assert got == {("2.4907.2086", "macho_B"): _data_lines(folder / "lc_2.4907.2086.B.mjd"),
                   ("2.4907.2086", "macho_R"): _data_lines(folder / "lc_2.4907.2086.R.mjd"),
                   ("1.4418.1930", "macho_R"): _data_lines(folder / "lc_1.4418.1930.R.mjd")}
    only_r = recs.index("1.4418.1930")
    assert raw.records["source_file"][only_r] == "lc_1.4418.1930.R.mjd"
    # discovery puts the two bands of a star next to each other
    listed = [unit.name for unit in src.discover(str(folder))]
    assert listed.index("lc_2.4907.2086.R.mjd") == listed.index("lc_2.4907.2086.B.mjd") + 1
    # first data line of the B file is line 4 (three # lines)
    first = np.flatnonzero((raw.row == 4) & (names(raw, src) == "macho_B"))
    assert raw.time[first] == pytest.approx([48884.492569]) and raw.value[first] == pytest.approx([-7.008])


def test_macho_bad_input(tmp_path):
    folder = SAMPLES / "macho"
    shutil.copy(folder / "lc_2.4907.2086.B.mjd", tmp_path)
    shutil.copy(folder / "lc_2.4907.2086.R.mjd", tmp_path)
    lines = (folder / "lc_1.4418.1930.R.mjd").read_text().split("\n")
    lines[5] = "48965.5 -4.6"  # line 6: two fields
    lines[6] = "48984.4 abc 0.1"  # line 7: not a number
    lines[7] = "48985.4 nan 0.1"  # line 8: NaN value
    lines[8] = "48987.4 -4.5 0"  # line 9: zero error
    (tmp_path / "lc_1.4418.1930.R.mjd").write_text("\n".join(lines))
    (tmp_path / "lc_7.7.7.B.mjd").write_text("#MJD Mag Err\n49000.1 -5.0 0.02\n49001.1 -5.1 0.02\n")
    (tmp_path / "lc_7.7.7.R.mjd").write_bytes(b"")
    src = get_source("macho")
    raw, checked = ingest(src, tmp_path)

    assert reasons(raw, file="lc_7.7.7.R.mjd") == ["unreadable: ValueError: empty file"]
    q = pd.DataFrame(raw.quarantine).set_index("row")
    assert q.loc[6, "reason"] == "malformed line: 2 field(s), expected 3"
    assert q.loc[7, "reason"] == "Mag 'abc' is not a number" and q.loc[7, "record_id"] == "1.4418.1930"
    vq = checked.quarantine.set_index("reason")
    assert vq.loc["value is not finite", "row"] == 8
    assert vq.loc["error is infinite, zero or negative", "row"] == 9
    by_star = dict(zip(checked.elements.records["record_id"], checked.elements.row_size, strict=True))
    assert by_star == {"2.4907.2086": 109, "1.4418.1930": 503 - 4, "7.7.7": 2}  # star 7.7.7: B only


# -- DESI --------------------------------------------------------------------------------------------

DESI_SAMPLE = SAMPLES / "desi" / "coadd-sv3-dark-26065.fits"


def test_desi_sample_counts_sky_fibres_and_masked_pixels():
    src = get_source("desi")
    raw, checked = ingest(src, SAMPLES / "desi")
    fibermap = Table.read(DESI_SAMPLE, hdu="FIBERMAP")
    objtype = np.char.strip(np.ma.filled(fibermap["OBJTYPE"], "").astype(str))
    sky = np.asarray((fibermap["TARGETID"] < 0) | (objtype == "SKY"))
    targets = fibermap[~sky]
    npix = sum(len(fits.getdata(DESI_SAMPLE, f"{arm}_WAVELENGTH")) for arm in "BRZ")
    assert len(raw.record) == len(targets) * (npix + 5)
    assert list(raw.records["record_id"]) == [str(t) for t in targets["TARGETID"]]

    sky_rows = [q for q in raw.quarantine if q["field"] == "record"]
    assert len(sky_rows) == int(sky.sum()) == 3
    assert [q["elements"] for q in sky_rows] == [npix + 5] * 3
    assert checked.counts["read"].tolist() == [len(fibermap) * (npix + 5)]
    assert {q["reason"] for q in sky_rows} == {"negative TARGETID (sky or unassigned fibre)",
                                               "sky fibre (OBJTYPE SKY)"}
    assert {q["record_id"] for q in sky_rows} == {str(t) for t in fibermap["TARGETID"][sky]}

    # masked pixels (MASK != 0 or IVAR <= 0) and photometry without IVAR are counted, not lost
    unusable = 0
    for arm in "BRZ":
        mask = fits.getdata(DESI_SAMPLE, f"{arm}_MASK")[~sky]
        ivar = fits.getdata(DESI_SAMPLE, f"{arm}_IVAR")[~sky]
        unusable += int(((mask != 0) | (ivar <= 0)).sum())
    unusable += sum(int((targets[f"FLUX_IVAR_{b}"] <= 0).sum()) for b in ("G", "R", "Z", "W1", "W2"))
    assert unusable > 0
    q = checked.quarantine
    assert q.loc[q["reason"] == "error is infinite, zero or negative", "elements"].sum() == unusable
    assert checked.elements.n_elements == len(raw.record) - unusable

    # spectral time = mean exposure MJD of the target; photometry is static (time NaN)
    exp = Table.read(DESI_SAMPLE, hdu="EXP_FIBERMAP")
    for i, tid in enumerate(targets["TARGETID"]):
        mjd = float(np.mean(exp["MJD"][exp["TARGETID"] == tid]))
        assert raw.records["t0"][i] == pytest.approx(mjd)
        spectral = (raw.record == i) & (raw.channel < 3)
        assert np.allclose(raw.time[spectral], mjd)
    assert np.isnan(raw.time[names(raw, src) == "wise_w1"]).all()


def test_desi_bad_files(tmp_path):
    write_desi_files(tmp_path)
    src = get_source("desi")
    raw = src.read(src.discover(str(tmp_path)))

    assert reasons(raw, file="coadd-corrupt.fits") == ["unreadable: OSError: Empty or corrupt FITS file"]
    assert reasons(raw, file="coadd-empty.fits")[0].startswith("unreadable: OSError")
    assert reasons(raw, file="coadd-nofibermap.fits") == ["missing FIBERMAP HDU: no TARGETIDs, no records"]
    noarm = [r for r in reasons(raw, file="coadd-noarm.fits") if "arm" in r]
    assert noarm == ["arm R skipped: KeyError: \"Extension 'R_FLUX' not found.\""]
    truncated = reasons(raw, file="coadd-truncated.fits")
    assert any(r.startswith("file may be truncated") for r in truncated)
    assert any(r.startswith("arm R skipped") for r in truncated) and any(r.startswith("arm Z skipped")
                                                                          for r in truncated)

    per_file = Counter(raw.records["source_file"].to_numpy()[raw.record])
    n_targets, arm = 2, {a: len(fits.getdata(DESI_SAMPLE, f"{a}_WAVELENGTH")) for a in "BRZ"}
    assert per_file["coadd-good.fits"] == n_targets * (sum(arm.values()) + 5)
    assert per_file["coadd-noarm.fits"] == n_targets * (arm["B"] + arm["Z"] + 5)
    assert per_file["coadd-truncated.fits"] == n_targets * (arm["B"] + 5)
    checked = validate(raw, len(src.channels()))
    c = checked.counts
    assert (c["read"] == c["stored"] + c["quarantined"]).all()
    assert (checked.elements.records["source_file"] == "coadd-good.fits").sum() == n_targets


# -- generic table -----------------------------------------------------------------------------------


def test_table_sample_with_custom_mapping():
    src = get_source("table", **TABLE_MAPPING)
    raw, checked = ingest(src, SAMPLES / "table")
    with open(SAMPLES / "table" / "macho_long.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(raw.record) == len(rows) == checked.elements.n_elements
    assert [(c.name, c.unit, c.modality, c.coord) for c in src.channels()] == [
        ("B", "mag", "photometry", 5150.0), ("R", "mag", "photometry", 6850.0)]
    got = Counter(zip(raw.records["record_id"].to_numpy()[raw.record], names(raw, src), strict=True))
    assert got == Counter((r["star"], r["band"]) for r in rows)
    recs = raw.records.set_index("record_id")
    assert recs.loc["2.4907.2086", "field"] == 2.0 and recs.loc["1.4418.1930", "field"] == 1.0
    assert raw.coord[names(raw, src) == "B"] == pytest.approx(5150.0)
    # the table holds the MACHO sample: same elements as the macho source
    macho = get_source("macho").read(get_source("macho").discover(str(SAMPLES / "macho")))
    assert np.sort(raw.value) == pytest.approx(np.sort(macho.value))
    assert raw.row.min() == 2 and raw.row.max() == len(rows) + 1


def test_table_valid_ranges_from_options_quarantine_what_lies_outside():
    src = get_source("table", **TABLE_MAPPING, valid_max={"R": -4.0}, nonnegative=["B"])
    raw, checked = ingest(src, SAMPLES / "table")
    bounds = {c.name: (c.valid_min, c.valid_max) for c in src.channels()}
    assert bounds["B"][0] == 0.0 and np.isnan(bounds["B"][1]) and np.isnan(bounds["R"][0]) and bounds["R"][1] == -4.0
    b, r = names(raw, src) == "B", names(raw, src) == "R"
    expected = int((raw.value[b] < 0).sum() + (raw.value[r] > -4.0).sum())
    q = checked.quarantine
    outside = q[q["reason"].str.startswith("value outside the channel's valid range")]
    assert expected > 0 and outside["elements"].sum() == expected
    assert outside["reason"].str.contains(r"'R=-?[\d.]+ not in \[nan, -4\]'").any()
    assert checked.elements.n_elements == len(raw.value) - expected
    with pytest.raises(ValueError, match="channel 'B': valid_min 1 is above valid_max 0"):
        get_source("table", **TABLE_MAPPING, valid_min={"B": 1.0}, valid_max={"B": 0.0}).discover(
            str(SAMPLES / "table"))


def test_table_bad_rows_parquet_gzip_and_units(tmp_path):
    text = ("id,t,ch,v,e,unit\n"
            "a,1.0,flux,10,1,mJy\n"
            "a,2.0,flux,20,1,Jy\n"  # converted to mJy
            "a,3.0,flux,30,1,s\n"  # not convertible: unknown channel 'flux [s]'
            "a,4.0,flux,40\n"  # too few fields
            "a,5.0,flux,abc,1,mJy\n"  # not a number
            "a,later,flux,5,1,mJy\n"  # time not a number
            "a,7.0,flux,nan,1,mJy\n"  # NaN value
            "a,8.0,flux,inf,1,mJy\n"  # infinite value
            "a,9.0,flux,9,0,mJy\n"  # zero error
            "a,10.0,flux,9,-1,mJy\n"  # negative error
            ",11.0,flux,9,1,mJy\n"  # no record id
            "a,,z,0.5,,\n"  # static element (no time), no error
            "b,1.0,flux,1,0.1,mJy\n")
    (tmp_path / "a.csv").write_bytes(text.encode() + b"b,2.0,flux,2,0.1,mJy\xff\n")
    with gzip.open(tmp_path / "c.csv.gz", "wt") as f:
        f.write("id,t,ch,v,e,unit\nc,1.0,flux,1,0.1,mJy\nc,2.0,flux,2,0.1,mJy\n")
    pd.DataFrame({"id": ["d", "d"], "t": [1.0, 2.0], "ch": ["flux", "flux"], "v": [3.0, 4.0], "e": [0.1, 0.1],
                  "unit": ["mJy", "mJy"]}).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text("id,t,ch,flux\ne,1.0,flux,3\n")  # no value column
    (tmp_path / "f.csv").write_text("")
    src = get_source("table", record_id="id", time="t", channel="ch", value="v", error="e", unit="unit",
                     transforms={"flux": "asinh"})
    raw, checked = ingest(src, tmp_path)

    assert [(c.name, c.unit, c.transform) for c in src.channels()] == [("flux", "mJy", "asinh"),
                                                                       ("z", "", "identity")]
    q = pd.DataFrame(raw.quarantine)
    by_line = q[q["source_file"] == "a.csv"].set_index("row")["reason"].to_dict()
    assert by_line == {5: "malformed line: 4 field(s), expected 6", 6: "v 'abc' is not a number",
                       7: "t 'later' is not a number", 12: "id is missing", 15: "line is not valid UTF-8"}
    [why] = reasons(raw, file="e.csv")
    assert "e.csv" in why and "missing column(s) 'v'" in why
    assert reasons(raw, file="f.csv") == ["unreadable: ValueError: empty file"]
    vq = checked.quarantine.set_index("reason")["elements"]
    assert vq["unknown channel 'flux [s]'"] == 1
    assert vq["value is not finite"] == 2 and vq["error is infinite, zero or negative"] == 2

    els = checked.elements
    recs = list(els.records["record_id"])
    assert sorted(recs) == ["a", "b", "c", "d"]
    a = els.elements(recs.index("a"))
    assert a["value"].tolist()[:3] == pytest.approx([0.5, 10.0, 20000.0])  # static first; Jy -> mJy
    assert np.isnan(a["time"][0]) and np.isnan(a["error"][0])
    d = raw.records["source_file"].to_numpy()[raw.record] == "d.parquet"
    assert raw.row[d].tolist() == [1, 2]


def test_table_missing_columns_everywhere_is_a_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("a;b;c\n1;2;3\n")
    with pytest.raises(ValueError, match=r"x\.csv: missing column\(s\) 'record_id'"):
        get_source("table").discover(str(tmp_path))


def test_table_datetime_times(tmp_path):
    (tmp_path / "t.csv").write_text("record_id,time,channel,value\n"
                                    "r,2000-01-01T00:00:00,hr,60\nr,soon,hr,61\n")
    src = get_source("table", time_format="datetime", unit={"hr": "1 / min"})
    raw, _ = ingest(src, tmp_path)
    assert raw.time.tolist() == [51544.0] and src.time_unit == "d"
    assert reasons(raw) == ["time 'soon' is not a time"]


def test_table_many_bad_lines_are_capped_and_read_works_without_discover(tmp_path):
    from datasets.sources._text import MAX_ROWS_PER_REASON
    from datasets.sources.base import Unit

    body = "".join(f"r,{i},x,abc\n" for i in range(MAX_ROWS_PER_REASON + 50))
    (tmp_path / "bad.csv").write_text("record_id,time,channel,value\nr,0,x,1\n" + body)
    src = get_source("table", unit={"x": "K"})
    raw = src.read([Unit(str(tmp_path / "bad.csv"))])  # channels learnt from the units read
    assert [c.name for c in src.channels()] == ["x"] and len(raw.record) == 1
    rows = [q for q in raw.quarantine if q["field"] == "value"]
    assert len(rows) == MAX_ROWS_PER_REASON + 1
    assert rows[-1]["reason"] == "value 'abc' is not a number (and 49 more lines with this kind of problem)"
    assert rows[0]["row"] == 3 and rows[-1]["row"] == 3 + MAX_ROWS_PER_REASON


def test_macho_shards_never_split_a_star():
    src = get_source("macho")
    units = src.discover(str(SAMPLES / "macho"))
    for size in (1, 2, 3):
        shards = src.shard(units, size)
        assert [u for s in shards for u in s] == units
        stars = [{u.name.rsplit(".", 2)[0] for u in s} for s in shards]
        assert all(not (a & b) for i, a in enumerate(stars) for b in stars[i + 1:])


def test_table_resolved_options_pin_the_channel_table():
    src = get_source("table", **TABLE_MAPPING)
    units = src.discover(str(SAMPLES / "table"))
    fresh = get_source("table", **src.resolved_options())  # as a worker process would build it
    assert fresh.channels() == src.channels()
    assert np.array_equal(fresh.read(units).channel, src.read(units).channel)
