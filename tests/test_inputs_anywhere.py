"""Archives where they live: ingest from an S3 server (moto, server mode), clear errors for missing inputs, and
the PLAsTiCC test layout streamed in pieces that never split an object."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasets.ingest import ingest
from datasets.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def _hash_without_fingerprints(path: str) -> str:
    """SHA-256 of every array of a store (local path or URL) except the ledger's ``unit_fingerprint`` (local
    files are fingerprinted by mtime, S3 objects by ETag: the same bytes give other fingerprints)."""
    group = open_store(path).group
    h = hashlib.sha256()
    for name in sorted(k for k in group.array_keys() if k != "unit_fingerprint"):
        data = group[name][:]
        h.update(name.encode() + str(data.dtype).encode())
        h.update("\x1f".join(map(str, data.ravel().tolist())).encode() if data.dtype.kind in "TUO"
                 else np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["physionet2019", "plasticc"])
def test_ingest_from_s3_equals_local(name, samples, s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    url = s3_server.upload(str(samples / name), bucket, f"archive/{name}")
    # the store lives in the bucket too (an Icechunk repository): the "archive and store in S3"
    local, remote = str(tmp_path / "local.zarr"), f"s3://{bucket}/stores/{name}.zarr"
    ingest(name, str(samples / name), local)
    report = ingest(name, url, remote, workers=2, shard_size=60 if name == "physionet2019" else None)
    assert report.reconciles and report.records_stored == open_store(local).n_records > 0
    a, b = open_store(local), open_store(remote)
    assert list(a.records["source_file"]) == list(b.records["source_file"])
    assert _hash_without_fingerprints(local) == _hash_without_fingerprints(remote)
    if name == "physionet2019":  # zip members are fingerprinted by size and CRC: the whole store is equal
        assert a.content_hash() == b.content_hash()
    again = ingest(name, url, remote)  # an unchanged bucket changes nothing
    assert again.shards == 0 and open_store(remote).content_hash() == b.content_hash()


def test_storage_options_reach_the_filesystem(samples, s3_server, tmp_path, monkeypatch):
    """Credentials and endpoint given as storage options (not the environment) read the bucket."""
    bucket = s3_server.new_bucket()
    url = s3_server.upload(str(samples / "plasticc"), bucket, "p")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_server.endpoint}
    report = ingest("plasticc", url, str(tmp_path / "s.zarr"), input_storage_options=options)
    assert report.reconciles and report.records_stored > 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", *args, "--no-prefect"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["s3://no-such-bucket-percival/x", "missing-local-dir"])
def test_missing_input_is_a_one_line_error(where, s3_server, tmp_path):
    path = where if "://" in where else str(tmp_path / where)
    done = _cli("plasticc", path, "--store", str(tmp_path / "out.zarr"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "error" in lines[0], done.stderr
    assert not (tmp_path / "out.zarr").exists()


def test_archive_without_units_is_an_error(tmp_path, samples):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing to ingest")
    done = _cli("plasticc", str(tmp_path / "empty"), "--store", str(tmp_path / "out.zarr"))
    assert done.returncode != 0 and "finds no files" in done.stderr and str(tmp_path / "empty") in done.stderr


def test_storage_option_flag_is_parsed(s3_server, samples, tmp_path):
    bucket = s3_server.new_bucket()
    url = s3_server.upload(str(samples / "plasticc"), bucket, "p")
    done = _cli("plasticc", url, "--store", str(tmp_path / "out.zarr"), "--workers", "1",
                "--storage-option", f"endpoint_url={s3_server.endpoint}", "--storage-option", "use_ssl=false")
    assert done.returncode == 0, done.stderr
    assert open_store(str(tmp_path / "out.zarr")).n_records > 0


@pytest.fixture(scope="module")
def test_layout(tmp_path_factory) -> Path:
    from bench.plasticc_archive import write_archive

    out = tmp_path_factory.mktemp("plasticc-test")
    write_archive(out, rows=20_000, batches=2, seed=3)
    return out


def test_generator_is_seeded_and_exact(test_layout, tmp_path):
    from bench.plasticc_archive import write_archive

    write_archive(tmp_path, rows=20_000, batches=2, seed=3)
    for f in ("plasticc_test_set_batch1.csv", "plasticc_test_set_batch2.csv", "plasticc_test_metadata.csv"):
        assert (tmp_path / f).read_bytes() == (test_layout / f).read_bytes()
    lc = pd.concat([pd.read_csv(tmp_path / f"plasticc_test_set_batch{k}.csv") for k in (1, 2)])
    assert len(lc) == 20_000 and lc["object_id"].is_monotonic_increasing
    assert set(lc["passband"]) <= set(range(6)) and (lc["flux_err"] > 0).all()


@pytest.mark.parametrize("compress", [False, True])
def test_test_layout_pieces_keep_objects_whole(test_layout, tmp_path, compress):
    archive = test_layout
    if compress:  # the same archive gzipped: pieces of the uncompressed text
        import gzip

        archive = tmp_path / "gz"
        archive.mkdir()
        for f in test_layout.iterdir():
            (archive / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    lc = pd.concat([pd.read_csv(test_layout / f"plasticc_test_set_batch{k}.csv") for k in (1, 2)])
    meta = pd.read_csv(test_layout / "plasticc_test_metadata.csv").set_index("object_id")
    store = str(tmp_path / "pieces.zarr")
    # ~7 KiB pieces (~140 rows; objects have ~100-300 rows): most objects straddle a piece boundary
    report = ingest("plasticc", str(archive), store, options={"piece_bytes": 7000}, workers=2)
    assert report.units_found > 80 and report.reconciles
    assert report.elements_read == report.elements_stored + report.elements_quarantined
    assert report.elements_read == len(lc) + 2 * lc["object_id"].nunique()  # rows + 2 static elements
    s = open_store(store)
    counts = lc.groupby("object_id").size()
    assert s.n_records == len(counts) and s.records["record_id"].is_unique
    stored = pd.Series(s.records["row_size"].to_numpy(), index=s.records["record_id"].astype(np.int64)).sort_index()
    assert (stored == counts.reindex(stored.index) + 2).all()  # every object once, whole
    assert set(s.records["source_file"].str.split(":").str[0]) == {
        f"plasticc_test_set_batch{k}.csv" + (".gz" if compress else "") for k in (1, 2)}
    recs = s.records.assign(object_id=s.records["record_id"].astype(np.int64)).set_index("object_id")
    np.testing.assert_array_equal(recs["target"].to_numpy(), meta.loc[recs.index, "true_target"].to_numpy())
    # the same archive read whole (one piece per file) gives the same records and elements
    whole = str(tmp_path / "whole.zarr")
    ingest("plasticc", str(archive), whole, options={"piece_bytes": 1 << 30})
    w = open_store(whole)
    pd.testing.assert_frame_equal(w.read().records.drop(columns="source_file"),
                                  s.read().records.drop(columns="source_file"))
    assert _element_hash(w) == _element_hash(s)
    # a re-run changes nothing
    before = s.content_hash()
    again = ingest("plasticc", str(archive), store, options={"piece_bytes": 7000})
    assert again.shards == 0 and open_store(store).content_hash() == before


def _element_hash(store) -> str:
    h = hashlib.sha256()
    elements = store.read()
    for name in ("time", "channel", "value", "error", "coord", "row_size"):
        h.update(np.ascontiguousarray(getattr(elements, name)).tobytes())
    return h.hexdigest()


def test_test_layout_bad_rows_and_missing_metadata(test_layout, tmp_path):
    """A malformed row is quarantined with its line in the piece; an object without a metadata row is
    quarantined whole; a blinded metadata file (no target) gives NaN targets."""
    d = tmp_path / "bad"
    d.mkdir()
    lines = (test_layout / "plasticc_test_set_batch1.csv").read_text().splitlines(keepends=True)
    lines[5] = "1,2,3\n"
    (d / "plasticc_test_set_batch1.csv").write_text("".join(lines))
    meta = pd.read_csv(test_layout / "plasticc_test_metadata.csv")
    first = int(pd.read_csv(test_layout / "plasticc_test_set_batch1.csv", nrows=1)["object_id"].iloc[0])
    meta[meta["object_id"] != first].drop(columns="true_target").to_csv(d / "plasticc_test_metadata.csv",
                                                                          index=False)
    report = ingest("plasticc", str(d), str(tmp_path / "s.zarr"), options={"piece_bytes": 5000})
    assert report.reconciles
    q = report.quarantine
    assert ((q["reason"].str.startswith("malformed row")) & (q["row"] == 6)
            & q["source_file"].str.endswith(":bytes 0-5000")).any()
    assert (q["reason"].str.contains("object without metadata row") & (q["record_id"] == str(first))).any()
    s = open_store(str(tmp_path / "s.zarr"))
    assert str(first) not in set(s.records["record_id"]) and s.records["target"].isna().all()
