"""Reliability: the fast parts of the fault campaign (:mod:`pipelines.faults`, run in full by bench/faults.py: a
few kill -9 moments, the bad-input corpus, untrusted files, injected I/O errors with Prefect retries, concurrent
writers), plus one test per bug the campaign found."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import build_corpus, stay, stay_row

from datasets.ingest import ingest
from datasets.store import StoreError, StoreWriter, open_store
from datasets.store.reconstruction import GRID_ARRAYS, ReconstructionWriter, open_reconstruction
from pipelines import faults

PHYSIONET = faults.PHYSIONET


def all_held(rows) -> None:
    for r in rows:
        assert r.tried > 0 and r.held == r.tried, (r.what, r.failures)


def test_kill_9_during_ingest_with_a_reader_watching(tmp_path):
    all_held(faults.kill_ingest(tmp_path, moments=1, seed=3))


def test_kill_9_during_ingest_into_an_object_store(tmp_path, s3_server):
    """The same guarantees in a bucket (an Icechunk repository on an S3-compatible server): the re-run store
    equals a local ingest, and a reader never sees a torn store."""
    bucket = s3_server.new_bucket()
    all_held(faults.kill_ingest(tmp_path, moments=1, seed=4, store_root=f"s3://{bucket}/kills"))


def test_concurrent_writers_to_an_object_store_both_finish_and_never_duplicate(tmp_path, s3_server):
    bucket = s3_server.new_bucket()
    all_held([faults.concurrent_writers(tmp_path, f"s3://{bucket}/race")])


def test_kill_9_during_training_then_resume(tmp_path, physionet_sample_store):
    all_held([faults.kill_train(tmp_path, physionet_sample_store, moments=1, seed=5)])


def test_bad_input_corpus_is_quarantined_and_reconciles(tmp_path):
    kinds, totals = faults.bad_input(tmp_path, build_corpus(tmp_path / "corpus"))
    assert kinds.tried >= 25
    all_held([kinds, totals, faults.vanishing_file(tmp_path, stay([stay_row(1), stay_row(2)]))])


def test_full_disk_then_rerun(tmp_path):
    row = faults.full_disk(tmp_path)
    if row.tried == 0:
        pytest.skip(row.note)
    all_held([row])


def test_injected_write_errors_leave_the_last_commit(tmp_path):
    all_held([faults.write_errors(tmp_path, moments=1, seed=1)])


def test_untrusted_checkpoints_and_configs_never_run_code(tmp_path, tiny_checkpoint):
    all_held([faults.untrusted_files(tmp_path, tiny_checkpoint)])


def test_flow_retries_transient_and_fails_cleanly_on_permanent_errors(tmp_path, physionet_sample_store,
                                                                       tiny_checkpoint):
    # the bench runs all four (transient and permanent, ingest and reconstruct); two here keep the test short
    all_held(faults.retries(tmp_path, physionet_sample_store, tiny_checkpoint,
                            parts=("ingest", "reconstruct-permanent")))


# -- the bugs found, one test each ------------------------------------------------------------------------
class Crash(Exception):
    pass


def test_statistics_missed_by_a_killed_run_are_written_by_the_next(tmp_path):
    """Bug: a run killed after its last shard's commit, before the statistics, left location 0 / scale 1 for
    ever (the re-run skipped every unit and so never recomputed them)."""
    ref = str(tmp_path / "ref.zarr")
    ingest("physionet2019", PHYSIONET, ref, shard_size=64)

    def crash_after_last(index: int, report) -> None:
        if index == report.shards_planned - 1:
            raise Crash

    path = str(tmp_path / "k.zarr")
    with pytest.raises(Crash):
        ingest("physionet2019", PHYSIONET, path, shard_size=64, progress=crash_after_last)
    assert open_store(path).meta["statistics_current"] is False
    report = ingest("physionet2019", PHYSIONET, path, shard_size=64)
    assert report.shards == 0 and open_store(path).meta["statistics_current"] is True
    assert open_store(path).content_hash() == open_store(ref).content_hash()


def test_a_second_writer_waits_for_the_lock_and_does_not_redo_the_work(tmp_path, monkeypatch):
    """Bug: a second ingest refused at once (StoreError) or, had it waited, re-appended every unit it planned
    before the lock (all its records quarantined as duplicates). Now it waits, then re-reads the ledger."""
    path = str(tmp_path / "s.zarr")
    from datasets.sources import get_source

    holder = StoreWriter(path, get_source("physionet2019"))
    done: dict = {}

    def second() -> None:
        done["report"] = ingest("physionet2019", PHYSIONET, path, shard_size=100)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert t.is_alive()  # waiting for the lock, not failed
    holder.close()
    t.join(60)
    assert done["report"].records_stored == 300
    third = ingest("physionet2019", PHYSIONET, path, shard_size=100)
    assert third.shards == 0 and open_store(path).quarantine.empty

    monkeypatch.setenv("PERCIVAL_LOCK_TIMEOUT", "0.2")
    with StoreWriter(path, get_source("physionet2019")):
        t0 = time.monotonic()
        err: list = []
        th = threading.Thread(target=lambda: _expect_store_error(path, err))
        th.start()
        th.join(10)
        assert err and "waited 0.2 s" in err[0] and time.monotonic() - t0 < 5


def _expect_store_error(path: str, err: list) -> None:
    try:
        ingest("physionet2019", PHYSIONET, path)
    except StoreError as e:
        err.append(str(e))


def test_a_writer_that_failed_to_open_releases_its_lock(tmp_path):
    """Bug: an error while opening a writer (a retried I/O error) kept the lock, so the retry was refused."""
    from datasets.sources import get_source

    path = str(tmp_path / "s.zarr")
    ingest("physionet2019", PHYSIONET, path)
    with pytest.raises(StoreError, match="holds source"):
        StoreWriter(path, get_source("plasticc"))
    StoreWriter(path, get_source("physionet2019")).close()  # not locked by the failed attempt


def test_reconstruction_commits_never_duplicate_or_skip_records(tmp_path):
    """Bug: two reconstruct runs into one output with different shard sizes appended overlapping shards
    (keys '0-50' and '0-80' differ), storing records twice. Commits now extend the committed prefix only."""
    def shard(a: int, b: int) -> dict:
        n = b - a
        rs = np.full(n, 2, np.int64)
        return {"record_id": np.array([f"r{i}" for i in range(a, b)]), "row_size": rs, "grid_row_size": rs,
                "latent": np.arange(a, b, dtype=np.float32)[:, None].repeat(4, 1),
                **{k: np.repeat(np.arange(a, b, dtype=np.float32), 2) for k in
                   ("mean", "sigma", "lower95", "upper95", "mean_normalised", "sigma_normalised")},
                **{f"grid_{k}": np.repeat(np.arange(a, b), 2).astype(dt) for k, dt in GRID_ARRAYS.items()}}

    prov = {"input_store": "x", "checkpoint_sha256": "y"}
    with ReconstructionWriter(str(tmp_path / "a.zarr"), prov, 4) as w:
        assert [w.append_range(a, b, shard(a, b)) for a, b in ((0, 50), (0, 80), (50, 100), (80, 100))] == \
            [50, 30, 20, 0]
        with pytest.raises(StoreError, match="gap"):
            w.append_range(120, 130, shard(120, 130))
    with ReconstructionWriter(str(tmp_path / "b.zarr"), prov, 4) as w:
        w.append_range(0, 100, shard(0, 100))
    a, b = open_reconstruction(str(tmp_path / "a.zarr")), open_reconstruction(str(tmp_path / "b.zarr"))
    assert a["records"]["record_id"].tolist() == [f"r{i}" for i in range(100)]
    for k in ("mean", "grid_time", "latent"):
        np.testing.assert_array_equal(a[k], b[k])


def test_reader_takes_counts_and_shapes_from_one_commit(tmp_path):
    """Bug: the reader read the root document twice (counts, then shapes): a commit in between paired one
    commit's counts with the next one's arrays. Now both come from one read."""
    path = str(tmp_path / "s.zarr")
    ingest("physionet2019", str(Path(PHYSIONET) / "training_setA_sample.zip"), path)
    s = open_store(path)
    ingest("physionet2019", PHYSIONET, path)  # commits after s was opened: s still shows its own commit
    assert len(s.records) == s.n_records == 200 and s.group["value"].shape[0] == s.n_elements


def test_concurrent_flows_in_threads_equal_sequential(tmp_path, physionet_sample_store, tiny_checkpoint):
    """Two ingest flows into one store and two reconstruct flows into one output, at once (threads, one API):
    the later writer waits for the lock and continues from the earlier one's commits."""
    from pipelines.ingest import ingest_flow
    from pipelines.reconstruct import reconstruct_flow

    seq_store, par_store = str(tmp_path / "seq.zarr"), str(tmp_path / "par.zarr")
    seq_rec, par_rec = str(tmp_path / "seq-rec.zarr"), str(tmp_path / "par-rec.zarr")
    ingest("physionet2019", PHYSIONET, seq_store)
    reconstruct_flow(physionet_sample_store, tiny_checkpoint, seq_rec, records_per_shard=100, grid_times=3)
    errors: list = []

    def run(fn, **kw) -> None:
        try:
            fn(**kw)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    jobs = [(ingest_flow, {"source": "physionet2019", "path": PHYSIONET, "store": par_store, "workers": 1})] * 2
    jobs += [(reconstruct_flow, {"store": physionet_sample_store, "checkpoint": tiny_checkpoint, "out": par_rec,
                                 "records_per_shard": 100, "grid_times": 3})] * 2
    threads = [threading.Thread(target=run, args=(fn,), kwargs=kw) for fn, kw in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert open_store(par_store).content_hash() == open_store(seq_store).content_hash()
    assert open_reconstruction(par_rec)["content_hash"] == open_reconstruction(seq_rec)["content_hash"]
