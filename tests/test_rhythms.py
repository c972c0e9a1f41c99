"""Invented rhythms: the sub-Nyquist RMS of grid curves (model and PCHIP), and the band limit of grids."""

from __future__ import annotations

import numpy as np
import torch

from datasets.loader import ElementDataset, fit_contract
from datasets.loader.synthetic import smooth_aperiodic_elements, smooth_curve, synthetic_elements
from perceiver.config import ModelConfig
from perceiver.model import Percival
from pipelines.run.config import RunConfig, TrainConfig, load_run
from pipelines.run.reconstruction import GridSpec, reconstruct
from pipelines.run.rhythms import band_limit, high_frequency_rms, sub_nyquist_rms
from pipelines.run.training import train


def test_high_frequency_rms_sees_only_periods_below_the_limit():
    g, dt = 64, 0.1
    t = np.arange(g) * dt
    curves = np.stack([3.0 + 2.0 * t,                               # a line: nothing
                       np.sin(2 * np.pi * t / 0.8),                 # period 0.8 < 2: all of it
                       np.sin(2 * np.pi * t / 12.6)])               # period 12.6 > 2: (almost) nothing
    rms = high_frequency_rms(curves, np.full(3, dt), np.full(3, 2.0))
    assert rms[0] < 1e-9
    assert abs(rms[1] - np.sqrt(0.5)) < 0.05
    assert rms[2] < 0.05


def test_sub_nyquist_rms_of_a_model_and_of_pchip_per_modality():
    elements, channels = synthetic_elements(n_records=8, seed=3)
    torch.manual_seed(0)
    model = Percival(ModelConfig.preset("tiny", contract=fit_contract(elements, channels))).eval()
    ds = ElementDataset(elements, channels, model.config.contract)
    table = sub_nyquist_rms(model, ds, n_grid=32)
    assert table and set(table) <= set(ds.modalities)
    for row in table.values():
        assert row["curves"] > 0 and np.isfinite(row["model"]) and row["model"] >= 0 and row["pchip"] >= 0


def test_band_limit_passes_slow_and_removes_fast_periods():
    g, dt = 128, 0.25
    t = np.arange(g) * dt
    slow, fast = np.sin(2 * np.pi * t / 16.0), np.sin(2 * np.pi * t / 1.0)
    out = band_limit(np.stack([slow + fast, slow, np.ones(g)]), np.full(3, dt), np.array([4.0, np.nan, 4.0]))
    inner = slice(16, -16)  # away from the renormalised ends
    assert np.abs(out[0] - slow)[inner].max() < 0.1  # period 16 kept (gain 0.99), period 1 removed
    assert np.array_equal(out[1], slow)  # no period known: unchanged
    np.testing.assert_allclose(out[2], 1.0)  # a constant stays constant, ends included
    stacked = band_limit(np.stack([slow + fast, 2 * slow], axis=-1)[None], np.array([dt]), np.array([4.0]))
    np.testing.assert_allclose(stacked[0, :, 0], out[0], atol=1e-12)  # curves stacked on a last axis: each one alike
    np.testing.assert_allclose(stacked[0, :, 1], 2 * band_limit(slow[None], np.array([dt]), np.array([4.0]))[0],
                               atol=1e-12)


def test_grids_of_smooth_aperiodic_records_invent_no_rhythm(tmp_path):
    """A small model trained on smooth aperiodic records (an hourly channel and a lab channel drawn every
    8-16 h) draws lab grids with no more content below the lab's Nyquist period than PCHIP through the same
    observations, and the band-limited grid is closer to the true curve than the record mean and than the
    decoder's own curve."""
    elements, channels, truth = smooth_aperiodic_elements(seed=0)
    config = RunConfig(model=ModelConfig.preset("tiny"),
                       train=TrainConfig(steps=300, warmup_steps=10, log_every=100, eval_every=1000,
                                         checkpoint_every=1000, batch_tokens=4096, precision="fp32", threads=1))
    model, _ = load_run(train(config, elements, channels, tmp_path / "model"))
    held_out = np.flatnonzero(elements.records["split"].to_numpy() != "train")
    ds = ElementDataset(elements, channels, model.config.contract)
    labs = sub_nyquist_rms(model, ds, records=held_out)["labs"]
    assert labs["curves"] >= 20 and labs["pchip"] > 0
    assert labs["model_vs_pchip"] <= 1.0, labs

    offsets = np.concatenate([[0], np.cumsum(elements.row_size)])
    errors = {}
    for band in (True, False):
        rec = reconstruct(model, elements, channels, GridSpec(n_times=64, channels=["lab"], band_limit=band), folds=0)
        grid = np.concatenate([[0], np.cumsum(rec.grid_row_size)])
        model_err, mean_err = [], []
        for r in held_out:
            s = slice(offsets[r], offsets[r + 1])
            lab = elements.channel[s] == 1
            t_lab, v_lab = elements.time[s][lab].astype(np.float64), elements.value[s][lab].astype(np.float64)
            t = rec.grid["time"][grid[r]:grid[r + 1]]
            inside = (t >= t_lab.min()) & (t <= t_lab.max())
            true = 1.5 * smooth_curve(t, *(truth[k][r] for k in ("centres", "widths", "heights")))
            model_err.append((rec.grid["mean"][grid[r]:grid[r + 1]] - true)[inside])
            mean_err.append((v_lab.mean() - true)[inside])
        errors[band] = [float(np.sqrt(np.mean(np.concatenate(e) ** 2))) for e in (model_err, mean_err)]
    assert errors[True][0] < 0.5 * errors[True][1], errors
    assert errors[True][0] <= 1.05 * errors[False][0], errors
