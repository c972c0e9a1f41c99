"""The invented-rhythm measure: sub-Nyquist RMS of grid curves, for the model and for PCHIP."""

from __future__ import annotations

import numpy as np
import torch

from datasets.loader import ElementDataset, fit_contract
from datasets.loader.synthetic import synthetic_elements
from perceiver.config import ModelConfig
from perceiver.model import Percival
from pipelines.run.rhythms import high_frequency_rms, sub_nyquist_rms


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
