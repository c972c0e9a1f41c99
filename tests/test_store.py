"""The Zarr store: round trip, xarray, idempotent re-ingest, kill -9 then re-run, locking, URLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from datasets.ingest import ingest
from datasets.schema import validate
from datasets.sources import get_source
from datasets.store import StoreError, StoreWriter, open_store


@pytest.fixture(scope="module")
def physionet_store(tmp_path_factory, samples):
    path = str(tmp_path_factory.mktemp("store") / "pn.zarr")
    report = ingest("physionet2019", str(samples / "physionet2019"), path, shard_size=64)
    return path, report


def test_round_trip_store_xarray_records(physionet_store, samples):
    path, report = physionet_store
    assert report.reconciles and report.shards == 5
    src = get_source("physionet2019")
    direct = validate(src.read(src.discover(str(samples / "physionet2019"))), len(src.channels())).elements

    ds = xr.open_zarr(path)  # plain xarray, no Percival code
    assert ds.sizes["record"] == 300 and ds.sizes["element"] == direct.n_elements
    assert ds["row_size"].attrs["sample_dimension"] == "element" and ds.attrs["Conventions"] == "CF-1.11"
    offsets = np.concatenate([[0], np.cumsum(ds["row_size"].values)])
    i = list(ds["record_id"].values).index("p000005")
    values = ds["value"].values[offsets[i]:offsets[i + 1]]
    j = list(direct.records["record_id"]).index("p000005")
    np.testing.assert_array_equal(values, direct.elements(j)["value"].to_numpy())

    store = open_store(path)
    rec = store.record("p000005")
    assert rec["channel_name"].iloc[0] == "Age" and rec["modality"].iloc[0] == "static"
    np.testing.assert_array_equal(rec["value"].to_numpy(), values)
    chunks = list(store.iter_chunks(128))
    assert [c.n_records for c in chunks] == [128, 128, 44]
    assert sum(c.n_elements for c in chunks) == store.n_elements
    sel = store.select(["p000200", "p000003"])
    assert list(sel.records["record_id"]) == ["p000200", "p000003"]
    np.testing.assert_array_equal(sel.elements(1)["time"], store.record("p000003")["time"])
    assert set(store.records["split"]) == {"train", "val", "test"}
    train = store.channels.set_index("name")
    assert train.loc["HR", "count"] > 0 and 60 < train.loc["HR", "location"] < 110


def test_zarr_alone_reads_it(physionet_store):
    path, _ = physionet_store
    g = zarr.open_group(path, mode="r")
    assert g["time"].shape == g["value"].shape and g["record_id"].shape == (300,)
    assert json.loads(g.attrs["percival"])["commit"]["record"] == 300  # a JSON string (netCDF holds no dicts)


def test_reingest_of_unchanged_source_changes_nothing(physionet_store, samples):
    path, _ = physionet_store
    before = open_store(path)
    h, gen = before.content_hash(), before.meta["commit"]["generation"]
    report = ingest("physionet2019", str(samples / "physionet2019"), path, shard_size=64)
    after = open_store(path)
    assert report.units_skipped == 300 and report.shards == 0
    assert after.content_hash() == h and after.meta["commit"]["generation"] == gen


def test_split_is_stable_when_records_are_added(tmp_path, samples):
    a = str(tmp_path / "a.zarr")
    ingest("physionet2019", str(samples / "physionet2019" / "training_setA_sample.zip"), a)
    first = open_store(a).records.set_index("record_id")["split"]
    ingest("physionet2019", str(samples / "physionet2019"), a)
    both = open_store(a).records.set_index("record_id")["split"]
    assert len(both) == 300 and (both.loc[first.index] == first).all()


def test_a_reader_keeps_the_file_versions_it_opened_while_a_writer_rewrites_them(tmp_path, samples):
    """Appends rewrite partly filled shard files (atomically, by rename). A reader reads a shard in two steps
    (its index, then a chunk), so it must keep reading the version it opened, not pair two versions."""
    zips = sorted((samples / "physionet2019").glob("*.zip"))
    store = str(tmp_path / "s.zarr")
    ingest("physionet2019", str(zips[0]), store)
    reader = open_store(store)
    before = reader.read()
    shard = next(p for p in (tmp_path / "s.zarr" / "value").rglob("*") if p.is_file())
    inode = shard.stat().st_ino
    ingest("physionet2019", str(zips[1]), store)  # appends into the same shard files: they are replaced
    assert shard.stat().st_ino != inode
    # the next rewrite lands between the reader's index read and its chunk read: any bytes the old index does
    # not describe (here: garbage, put in place by rename as a writer does)
    for f in [p for p in (tmp_path / "s.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]:
        (f.parent / "garbage").write_bytes(os.urandom(f.stat().st_size))
        os.replace(f.parent / "garbage", f)
    again = reader.read()  # the versions it opened: same records, same values, no decode error
    assert again.n_records == before.n_records
    np.testing.assert_array_equal(again.value, before.value)
    np.testing.assert_array_equal(again.time, before.time)


def test_second_writer_is_refused_while_one_holds_the_store(tmp_path):
    src = get_source("physionet2019")
    path = str(tmp_path / "x.zarr")
    with StoreWriter(path, src):
        with pytest.raises(StoreError, match="being written by another process"):
            StoreWriter(path, src)
    StoreWriter(path, src).close()


def test_store_by_fsspec_url(samples):
    url = "memory://percival-test/pn.zarr"
    report = ingest("physionet2019", str(samples / "physionet2019" / "training_setB_sample.zip"), url)
    s = open_store(url)
    assert report.reconciles and s.n_records == 100 and s.record("p100001")["value"].notna().all()


def test_opening_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no Zarr store here"):
        open_store(str(tmp_path / "missing.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a Percival store"):
        open_store(str(tmp_path / "plain.zarr"))


KILL_SCRIPT = """
import sys
from datasets.ingest import ingest
ingest("physionet2019", sys.argv[1], sys.argv[2], shard_size=10)
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_during_ingest_then_rerun_equals_uninterrupted(tmp_path, samples, seed):
    src = str(samples / "physionet2019")
    reference = str(tmp_path / "ref.zarr")
    ingest("physionet2019", src, reference, shard_size=10)
    path = str(tmp_path / "killed.zarr")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, src, path], env=env)
    # Kill at a random moment after a few commits (30 shards of 10 stays; each commit is a few ms).
    rng = np.random.default_rng(seed)
    target = int(rng.integers(2, 20))
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if open_store(path).meta["commit"]["generation"] >= target:
                break
        except (StoreError, FileNotFoundError, KeyError, ValueError):
            pass
        time.sleep(0.005)
    time.sleep(float(rng.uniform(0, 0.02)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = open_store(path)  # always opens: the last commit is intact
    assert partial.n_records < 300 or proc.returncode == 0
    ref_ids = open_store(reference).records["record_id"].tolist()
    assert partial.records["record_id"].tolist() == ref_ids[:partial.n_records]  # a committed prefix
    assert len(partial.read().time) == partial.n_elements == int(partial.records["row_size"].sum())
    report = ingest("physionet2019", src, path, shard_size=10)
    assert report.reconciles
    final = open_store(path)
    assert final.n_records == 300 and final.records["record_id"].is_unique
    assert final.content_hash() == open_store(reference).content_hash()


def test_channel_table_carries_physical_ranges_into_the_model_contract(physionet_sample_store):
    from datasets.loader import fit_contract

    store = open_store(physionet_sample_store)
    table = store.channels.set_index("name")
    assert (table.loc["O2Sat", ["valid_min", "valid_max"]] == [0.0, 100.0]).all()
    assert table.loc["Lactate", "valid_min"] == 0.0 and np.isnan(table.loc["Lactate", "valid_max"])
    assert table.loc[["Temp", "BaseExcess", "HospAdmTime"], ["valid_min", "valid_max"]].isna().all().all()
    elements = store.read()
    lo = table["valid_min"].to_numpy()[elements.channel]
    hi = table["valid_max"].to_numpy()[elements.channel]
    assert not ((elements.value < lo) | (elements.value > hi)).any()  # what lay outside is in the quarantine
    spec = {c.name: c for c in fit_contract(elements, store.channels).channels}
    assert (spec["FiO2"].valid_min, spec["FiO2"].valid_max) == (0.0, 1.0)


def test_statistics_of_a_large_store_come_from_a_bounded_sample(tmp_path, samples, monkeypatch):
    """Channels with more train elements than STATISTICS_SAMPLE get their statistics from a fixed subset of
    that many (memory stays bounded); counts stay exact and the estimates stay close."""
    from datasets.store import writer

    full = str(tmp_path / "full.zarr")
    ingest("plasticc", str(samples / "plasticc"), full)
    monkeypatch.setattr(writer, "STATISTICS_SAMPLE", 2000)
    monkeypatch.setattr(writer, "STATISTICS_CHUNK", 7919)  # chunks that cut records: the sample must not care
    sampled = str(tmp_path / "sampled.zarr")
    ingest("plasticc", str(samples / "plasticc"), sampled)
    a, b = open_store(full).channels, open_store(sampled).channels
    assert (a["count"] > 2000).sum() >= 4 and (a["count"] == b["count"]).all()
    np.testing.assert_allclose(b["scale"], a["scale"], rtol=0.15)
    assert (np.abs(b["location"] - a["location"]) <= 0.15 * a["scale"]).all()
    monkeypatch.setattr(writer, "STATISTICS_CHUNK", 1 << 22)
    with writer.StoreWriter(sampled, get_source("plasticc")) as w:  # the same subset whatever the chunking
        again = w.update_statistics()
    np.testing.assert_array_equal(again["location"], b["location"])
