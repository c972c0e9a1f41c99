"""The reconstruct flow: aligned outputs, provenance, kill -9 then resume, the Dask path; the train flow.
Out-of-sample reconstructions: blind to the element's own value, deterministic folds, outliers stand out."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from datasets.format import ElementSet
from datasets.normalise import denormalise, normalise
from datasets.store import StoreError, open_store
from datasets.store.reconstruction import (
    OOS_ARRAYS,
    ReconstructionWriter,
    open_reconstruction,
    reconstruction_arrays,
)
from perceiver.checkpoint import load
from pipelines.reconstruct import reconstruct_flow
from pipelines.run.reconstruction import DEFAULT_FOLDS, fold_assignment, reconstruct


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
    # the 95 % interval: computed in normalised space and mapped back (symmetric only for identity channels)
    # (equal only where a bound is reached in float32)
    assert (r["lower95"] <= r["mean"]).all() and (r["mean"] <= r["upper95"]).all()
    identity = (store.channels["transform"].to_numpy() == "identity")[ch]
    valid_min, valid_max = (store.channels[k].to_numpy() for k in ("valid_min", "valid_max"))
    free = identity & np.isnan(valid_min[ch]) & np.isnan(valid_max[ch])  # linear: a symmetric interval
    asinh = ~identity
    assert free.any() and asinh.any()
    np.testing.assert_allclose((r["upper95"] - r["mean"])[free], 1.959964 * r["sigma"][free], rtol=1e-3)
    skew = (r["upper95"] - r["mean"]) / (r["mean"] - r["lower95"])
    assert np.abs(skew[asinh] - 1).max() > 0.05  # asymmetric where the transform is not linear
    assert (r["grid_lower95"] <= r["grid_mean"]).all() and (r["grid_mean"] <= r["grid_upper95"]).all()
    # means and intervals inside each channel's valid range, on the elements and on the grid, by construction
    for prefix, codes in (("", ch), ("grid_", r["grid_channel"].astype(np.int64))):
        lo, hi = np.nan_to_num(valid_min[codes], nan=-np.inf), np.nan_to_num(valid_max[codes], nan=np.inf)
        for k in ("mean", "lower95", "upper95"):
            assert (r[prefix + k] >= lo).all() and (r[prefix + k] <= hi).all(), prefix + k
    # a grid of 5 times per timed channel of each record, inside the record's time span
    first = store.record("p000001")
    timed = first[np.isfinite(first["time"])]
    assert r["records"]["grid_row_size"][0] == 5 * timed["channel"].nunique()
    n0 = r["records"]["grid_row_size"][0]
    assert r["grid_time"][:n0].min() == timed["time"].min() and r["grid_time"][:n0].max() == timed["time"].max()
    assert r["latent"].shape == (300, 32)
    meta = r["meta"]
    assert meta["checkpoint_sha256"] and meta["code_version"]
    assert meta["model_config"]["model"]["sizes"]["d_latent"] == 32
    ds = xr.open_zarr(out)
    assert ds.sizes["element"] == store.n_elements and ds["row_size"].attrs["sample_dimension"] == "element"
    # out-of-sample outputs (default folds) beside the in-sample ones, on the element dimension
    assert meta["folds"] == DEFAULT_FOLDS
    for name in OOS_ARRAYS:
        assert ds[name].dims == ("element",) and ds[name].attrs["long_name"] and len(r[name]) == store.n_elements
    assert ds["residual_z"].attrs["units"] == ds["mean_oos_normalised"].attrs["units"] == "1"
    multi = np.repeat(store.records["row_size"].to_numpy() >= 2, store.records["row_size"].to_numpy())
    assert np.isfinite(r["mean_oos"][multi]).all() and (r["sigma_oos"][multi] > 0).all()
    np.testing.assert_allclose(ds["residual_z"].values, r["residual_z"])
    m, s = denormalise(r["mean_oos_normalised"], r["sigma_oos_normalised"], ch, store.channels)
    np.testing.assert_allclose(m, r["mean_oos"], rtol=1e-5)

    again = reconstruct_flow(physionet_sample_store, tiny_checkpoint, out, records_per_shard=128, grid_times=5)
    assert again["shards"] == 0 and open_reconstruction(out)["content_hash"] == r["content_hash"]
    with pytest.raises(StoreError, match="folds"):  # other folds would mix two kinds of output in one store
        reconstruct_flow(physionet_sample_store, tiny_checkpoint, out, records_per_shard=128, grid_times=5, folds=0)


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


# ---------------------------------------------------------------------------------------------------------
# out-of-sample reconstructions
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load(tiny_checkpoint)


def _with_values(elements: ElementSet, index: np.ndarray, shift_z: float, channels) -> ElementSet:
    """``elements`` with the values at ``index`` moved by ``shift_z`` normalised units (channel spreads)."""
    ch = elements.channel[index].astype(np.int64)
    z, _ = normalise(elements.value[index], elements.error[index], ch, channels)
    value = elements.value.copy()
    value[index] = denormalise(z + shift_z, np.zeros_like(z), ch, channels)[0]
    return dataclasses.replace(elements, value=value)


def test_out_of_sample_prediction_ignores_the_elements_own_value(physionet_sample_store, tiny_model):
    store = open_store(physionet_sample_store)
    elements = store.read(0, 40)
    hr = int(np.flatnonzero(store.channels["name"].astype(str).to_numpy() == "HR")[0])
    i = int(elements.offsets[3]) + 17 + int(np.flatnonzero(elements.channel[elements.offsets[3] + 17:] == hr)[0])
    assert i < elements.offsets[4]  # a heart rate of the 4th record
    changed = _with_values(elements, np.array([i]), 25.0, store.channels)
    a = reconstruct(tiny_model, elements, store.channels, folds=4)
    b = reconstruct(tiny_model, changed, store.channels, folds=4)
    assert a.folds == 4 and a.mean_oos is not None and a.fold[i] == b.fold[i]
    # the element and every element of its record's fold were predicted without it: bitwise the same
    same_pass = np.zeros(elements.n_elements, bool)
    same_pass[elements.offsets[3]:elements.offsets[4]] = True
    same_pass &= a.fold == a.fold[i]
    for name in ("mean_oos", "sigma_oos", "mean_oos_normalised", "sigma_oos_normalised"):
        np.testing.assert_array_equal(getattr(a, name)[same_pass], getattr(b, name)[same_pass])
    # the in-sample reconstruction saw the value, the others of the record saw it too
    assert a.mean_normalised[i] != b.mean_normalised[i]
    other_folds = np.zeros(elements.n_elements, bool)
    other_folds[elements.offsets[3]:elements.offsets[4]] = True
    other_folds &= a.fold != a.fold[i]
    assert (a.mean_oos_normalised[other_folds] != b.mean_oos_normalised[other_folds]).any()
    # the residual is the new value's against the same prediction
    assert b.residual_z[i] - a.residual_z[i] == pytest.approx(25.0 / np.sqrt(a.sigma_oos_normalised[i] ** 2
                                                                              + _e2(elements, i, store)), rel=1e-3)


def _e2(elements: ElementSet, i: int, store) -> float:
    _, e = normalise(elements.value[[i]], elements.error[[i]], elements.channel[[i]].astype(np.int64),
                     store.channels)
    return float(np.nan_to_num(e, nan=0.0)[0] ** 2)


def test_folds_are_deterministic_and_independent_of_batching(physionet_sample_store, tiny_model):
    store = open_store(physionet_sample_store)
    ids, sizes = store.records["record_id"].astype(str).to_numpy(), store.records["row_size"].to_numpy()
    fold = fold_assignment(ids, sizes, 5)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    # balanced per record (sizes differ by at most one): every fold leaves a record of >= 2 elements visible
    rec = np.repeat(np.arange(len(ids)), sizes)
    counts = np.bincount(rec * 5 + fold, minlength=5 * len(ids)).reshape(-1, 5)
    assert (counts.max(1) - counts.min(1) <= 1).all() and (counts.max(1) < sizes).all()
    # a record's folds depend on its id and length only: reversed record order gives each the same folds
    rev = fold_assignment(ids[::-1], sizes[::-1], 5)
    rev_offsets = np.concatenate([[0], np.cumsum(sizes[::-1])])
    for r in (0, 17, 299):
        j = len(ids) - 1 - r
        np.testing.assert_array_equal(fold[offsets[r]:offsets[r + 1]],
                                      rev[rev_offsets[j]:rev_offsets[j + 1]])
    assert not np.array_equal(fold_assignment(ids, sizes, 5, seed=1), fold)

    whole = reconstruct(tiny_model, store.read(0, 120), store.channels, folds=5)
    parts = [reconstruct(tiny_model, store.read(a, b), store.channels, folds=5, max_tokens=m)
             for a, b, m in ((0, 50, 16_384), (50, 120, 2_048))]
    np.testing.assert_array_equal(whole.fold, fold[:offsets[120]])
    np.testing.assert_array_equal(np.concatenate([p.fold for p in parts]), whole.fold)
    for name in ("mean_oos_normalised", "sigma_oos_normalised", "residual_z"):
        # the same elements hidden in the same passes: equal up to float32 summation order across batches
        np.testing.assert_allclose(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name),
                                   rtol=1e-4, atol=1e-4)


def test_injected_outliers_get_the_largest_residual_z(physionet_sample_store, tiny_model):
    store = open_store(physionet_sample_store)
    names = store.channels["name"].astype(str).to_numpy()
    hr = int(np.flatnonzero(names == "HR")[0])
    elements = store.take(np.flatnonzero(store.records["split"].astype(str).to_numpy() == "test"))
    off = elements.offsets
    injected = []  # one heart-rate value per record, in the middle of its stay, +10 channel spreads
    for r in range(elements.n_records):
        hr_idx = off[r] + np.flatnonzero(elements.channel[off[r]:off[r + 1]] == hr)
        if len(hr_idx) >= 3:
            injected.append(hr_idx[len(hr_idx) // 2])
    injected = np.array(injected)
    assert len(injected) >= 10
    rec = reconstruct(tiny_model, _with_values(elements, injected, 10.0, store.channels), store.channels, folds=5)
    score = np.abs(rec.residual_z)
    others = np.delete(score, injected)
    assert np.isfinite(score).all()
    assert (score[injected] > np.percentile(others, 99)).all() and np.median(score[injected]) > 6
    record = np.repeat(np.arange(elements.n_records), elements.row_size)
    top = [int(np.argmax(np.where(record == record[i], score, -np.inf))) == i for i in injected]
    assert np.mean(top) >= 0.8


def test_single_element_records_get_nan_out_of_sample(tmp_path, physionet_sample_store, tiny_model):
    store = open_store(physionet_sample_store)
    full = store.read(0, 3)
    keep = np.r_[full.offsets[0], np.arange(full.offsets[1], full.offsets[3])]  # record 0 cut to one element
    elements = ElementSet(records=full.records, row_size=np.array([1, *full.row_size[1:]]),
                          **{k: getattr(full, k)[keep] for k in ("time", "channel", "value", "error", "coord")})
    r = reconstruct(tiny_model, elements, store.channels, folds=5)
    assert np.isfinite(r.mean[0]) and np.isfinite(r.sigma[0])  # the in-sample reconstruction is still there
    for name in ("mean_oos", "sigma_oos", "mean_oos_normalised", "sigma_oos_normalised", "residual_z"):
        assert np.isnan(getattr(r, name)[0]) and np.isfinite(getattr(r, name)[1:]).all()
    for k in (0, 1):
        off = reconstruct(tiny_model, elements, store.channels, folds=k)
        assert off.folds == 0 and off.mean_oos is None and off.residual_z is None
        np.testing.assert_array_equal(off.mean, r.mean)
    with pytest.raises(ValueError, match="folds"):
        reconstruct(tiny_model, elements, store.channels, folds=-1)
    # stored as NaN, readable by xarray
    out = str(tmp_path / "one.zarr")
    with ReconstructionWriter(out, {"input_store": "x", "checkpoint_sha256": "y", "folds": 5}, 32) as w:
        w.append_range(0, 3, reconstruction_arrays(r, elements.row_size))
    ds = xr.open_zarr(out)
    assert np.isnan(ds["residual_z"].values[0]) and np.isfinite(ds["residual_z"].values[1:]).all()
    assert set(OOS_ARRAYS) <= set(ds.data_vars)


def test_samples_fill_a_sample_dimension_for_both_heads(tmp_path, physionet_sample_store, tiny_checkpoint):
    """``--samples K``: K draws per element and grid point on a ``sample`` dimension (xarray-readable), inside
    each channel's valid range, with their mean and quantiles; the Gaussian head draws independently, a
    diffusion-head model (trained here for a few steps) jointly; asking for the wrong head names the right one."""
    from perceiver.config import ModelConfig
    from pipelines.run.config import RunConfig, TrainConfig
    from pipelines.run.training import train

    store = open_store(physionet_sample_store)
    config = RunConfig(model=ModelConfig.preset("tiny", head={"name": "diffusion"}),
                       train=TrainConfig(steps=6, warmup_steps=2, log_every=3, eval_every=100, checkpoint_every=100,
                                         batch_tokens=4096, precision="fp32", threads=1))
    diffusion = str(train(config, store.read(0, 60), store.channels, tmp_path / "diffusion"))
    valid_min, valid_max = (store.channels[k].to_numpy() for k in ("valid_min", "valid_max"))
    for name, checkpoint in (("gaussian", tiny_checkpoint), ("diffusion", diffusion)):
        out = str(tmp_path / f"{name}.zarr")
        reconstruct_flow(physionet_sample_store, checkpoint, out, records_per_shard=200, grid_times=4, folds=0,
                         samples=3, head=name)
        r = open_reconstruction(out)
        n_el, n_grid = store.n_elements, int(r["records"]["grid_row_size"].sum())
        assert r["samples"].shape == (n_el, 3) and r["grid_samples"].shape == (n_grid, 3)
        assert np.isfinite(r["samples"]).all() and np.isfinite(r["grid_samples"]).all()
        assert not np.array_equal(r["samples"][:, 0], r["samples"][:, 1])
        np.testing.assert_allclose(r["samples_mean"], r["samples"].mean(1), rtol=1e-5, atol=1e-5)
        assert (r["samples_lower95"] <= r["samples_upper95"]).all()
        for prefix, codes in (("", store.read().channel.astype(np.int64)),
                              ("grid_", r["grid_channel"].astype(np.int64))):
            lo, hi = np.nan_to_num(valid_min[codes], nan=-np.inf), np.nan_to_num(valid_max[codes], nan=np.inf)
            assert (r[prefix + "samples"] >= lo[:, None]).all() and (r[prefix + "samples"] <= hi[:, None]).all()
        ds = xr.open_zarr(out)
        assert ds["samples"].dims == ("element", "sample") and ds["grid_samples"].dims == ("grid", "sample")
        assert r["meta"]["samples"] == 3
    with pytest.raises(ValueError, match="trained with the 'gaussian' head, not 'diffusion'"):
        reconstruct_flow(physionet_sample_store, tiny_checkpoint, str(tmp_path / "x.zarr"), samples=2,
                         head="diffusion")
    with pytest.raises(StoreError, match="samples=3, not 5"):
        reconstruct_flow(physionet_sample_store, tiny_checkpoint, str(tmp_path / "gaussian.zarr"), folds=0,
                         samples=5, grid_times=4)
