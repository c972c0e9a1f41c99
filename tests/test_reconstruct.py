"""The reconstruct flow: aligned outputs, provenance, kill -9 then resume, the Dask path; the train flow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from datasets.normalise import denormalise
from datasets.store import open_store
from datasets.store.reconstruction import open_reconstruction
from pipelines.reconstruct import reconstruct_flow


def test_reconstruct_writes_aligned_outputs_with_provenance(tmp_path, physionet_sample_store, tiny_checkpoint):
    out = str(tmp_path / "rec.zarr")
    summary = reconstruct_flow(physionet_sample_store, tiny_checkpoint, out, records_per_shard=128, grid_times=5)
    assert summary["records"] == 300 and summary["shards"] == 3
    store = open_store(physionet_sample_store)
    r = open_reconstruction(out)
    assert list(r["records"]["record_id"]) == list(store.records["record_id"])
    np.testing.assert_array_equal(r["records"]["row_size"], store.records["row_size"])
    assert len(r["mean"]) == store.n_elements and np.isfinite(r["mean"]).all() and (r["sigma"] > 0).all()
    # physical = denormalised normalised, element for element
    ch = store.read().channel.astype(np.int64)
    m, s = denormalise(r["mean_normalised"], r["sigma_normalised"], ch, store.channels)
    np.testing.assert_allclose(m, r["mean"], rtol=1e-5)
    # a grid of 5 times per timed channel of each record, inside the record's time span
    first = store.record("p000001")
    timed = first[np.isfinite(first["time"])]
    assert r["records"]["grid_row_size"][0] == 5 * timed["channel"].nunique()
    n0 = r["records"]["grid_row_size"][0]
    assert r["grid_time"][:n0].min() == timed["time"].min() and r["grid_time"][:n0].max() == timed["time"].max()
    assert r["latent"].shape == (300, 32)
    meta = r["meta"]
    assert meta["checkpoint_sha256"] and meta["model_config"]["model"]["d_latent"] == 32 and meta["code_version"]
    ds = xr.open_zarr(out)
    assert ds.sizes["element"] == store.n_elements and ds["row_size"].attrs["sample_dimension"] == "element"

    again = reconstruct_flow(physionet_sample_store, tiny_checkpoint, out, records_per_shard=128, grid_times=5)
    assert again["shards"] == 0 and open_reconstruction(out)["content_hash"] == r["content_hash"]


KILL_SCRIPT = """
import sys
from pipelines.reconstruct import reconstruct_flow
if __name__ == "__main__":
    reconstruct_flow(sys.argv[1], sys.argv[2], sys.argv[3], records_per_shard=20, grid_times=3)
"""


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, physionet_sample_store, tiny_checkpoint):
    ref = str(tmp_path / "ref.zarr")
    reconstruct_flow(physionet_sample_store, tiny_checkpoint, ref, records_per_shard=20, grid_times=3)
    out = str(tmp_path / "killed.zarr")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), physionet_sample_store, tiny_checkpoint, out],
                            env=dict(os.environ, PYTHONPATH=os.getcwd()), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            committed = open_reconstruction(out)["meta"]["commit"]["completed_shard"]
        except Exception:
            committed = 0
        if committed >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its temporary Prefect server, as a crash would
    proc.wait()
    partial = open_reconstruction(out)
    assert 0 < len(partial["records"]) < 300
    summary = reconstruct_flow(physionet_sample_store, tiny_checkpoint, out, records_per_shard=20, grid_times=3)
    assert summary["records"] == 300 - len(partial["records"])
    assert open_reconstruction(out)["content_hash"] == open_reconstruction(ref)["content_hash"]


@pytest.mark.slow
def test_dask_two_workers_equals_single_process(tmp_path, physionet_sample_store, tiny_checkpoint):
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    reconstruct_flow(physionet_sample_store, tiny_checkpoint, one, records_per_shard=100, grid_times=3)
    summary = reconstruct_flow(physionet_sample_store, tiny_checkpoint, two, records_per_shard=100, grid_times=3,
                               workers=2)
    assert summary["records"] == 300
    assert open_reconstruction(one)["content_hash"] == open_reconstruction(two)["content_hash"]
