"""Per-channel normalisation statistics: every channel's normalised train values have a variance of about one."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datasets.normalise import channel_statistics, denormalise, normalise


def _stats(values: list[np.ndarray]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    channel = np.concatenate([np.full(len(v), i, np.int16) for i, v in enumerate(values)])
    value = np.concatenate(values).astype(np.float32)
    table = pd.DataFrame({"transform": ["identity"] * len(values)})
    stats = channel_statistics(channel, value, np.full(len(value), np.nan, np.float32), table,
                               np.ones(len(value), bool))
    return stats, channel, value


def test_skewed_and_gaussian_channels_get_unit_variance():
    rng = np.random.default_rng(0)
    # SaO2-like: packed at 95-100 % with a long low tail; a Gaussian; a lab spanning decades
    sao2 = np.clip(np.where(rng.random(20_000) < 0.97, rng.normal(98, 1.2, 20_000), rng.uniform(40, 95, 20_000)),
                   0, 100)
    gauss = rng.normal(80, 15, 20_000)
    lab = rng.lognormal(3, 1.2, 20_000)
    stats, channel, value = _stats([sao2, gauss, lab])
    assert list(stats["transform"]) == ["asinh", "identity", "asinh"]  # heavy tails compressed
    z, _ = normalise(value, np.zeros_like(value), channel, stats)
    for c in range(3):
        assert 0.7 < np.var(z[channel == c]) < 1.3, (c, np.var(z[channel == c]))
    assert abs(stats["scale"][1] - 15) < 0.5 and abs(stats["location"][1] - 80) < 0.5
    back, _ = denormalise(z, np.ones_like(z), channel, stats)
    np.testing.assert_allclose(back, value, rtol=1e-4, atol=1e-3)


def test_one_absurd_value_does_not_set_the_scale():
    rng = np.random.default_rng(1)
    clean = rng.normal(0, 1, 10_000)
    stats_clean, _, _ = _stats([clean])
    stats_bad, _, _ = _stats([np.append(clean, 1e9)])
    assert abs(stats_bad["scale"][0] - stats_clean["scale"][0]) < 0.05


def test_constant_and_empty_channels_get_scale_one():
    stats, _, _ = _stats([np.full(50, 7.0), np.array([])])
    assert list(stats["scale"]) == [1.0, 1.0] and stats["location"][0] == 7.0
