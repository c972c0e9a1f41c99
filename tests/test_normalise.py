"""Per-channel normalisation statistics: every channel's normalised train values have a variance of about one."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datasets.normalise import channel_statistics, denormalise, interval, normalise


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


def _bounded_stats(values: list[np.ndarray], ranges: list[tuple[float, float]]):
    channel = np.concatenate([np.full(len(v), i, np.int16) for i, v in enumerate(values)])
    value = np.concatenate(values).astype(np.float32)
    table = pd.DataFrame({"transform": ["identity"] * len(values), "valid_min": [r[0] for r in ranges],
                          "valid_max": [r[1] for r in ranges]})
    stats = channel_statistics(channel, value, np.full(len(value), np.nan, np.float32), table,
                               np.ones(len(value), bool))
    return pd.concat([table[["valid_min", "valid_max"]], stats], axis=1), channel, value


def test_every_normalised_value_maps_back_inside_the_valid_range():
    """Means and intervals are inside a channel's bounds by construction: any normalised number, however far
    out, denormalises into the range; observed values round-trip; values at the bound are kept finite."""
    rng = np.random.default_rng(2)
    n = 20_000
    troponin = np.where(rng.random(n) < 0.1, 0.0, rng.lognormal(-3, 1.5, n))      # >= 0, skewed, some zeros
    o2sat = np.clip(np.round(rng.normal(97, 2.5, n)), 60, 100)                      # [0, 100], many at 100
    fio2 = np.clip(rng.choice([0.21, 0.3, 0.4, 0.5, 1.0], n) + rng.normal(0, 0.01, n), 0.21, 1.0)
    below = -np.abs(rng.normal(0, 5, n))                                            # <= 0 only
    ranges = [(0, np.nan), (0, 100), (0, 1), (np.nan, 0)]
    stats, channel, value = _bounded_stats([troponin, o2sat, fio2, below], ranges)
    assert np.isfinite(stats["bound_width"]).all()
    z, _ = normalise(value, np.zeros_like(value), channel, stats)
    assert np.isfinite(z).all()
    for c in range(4):
        assert 0.5 < np.var(z[channel == c]) < 2.0, (c, np.var(z[channel == c]))
    far = np.linspace(-1e4, 1e4, 4001, dtype=np.float32)
    for c, (lo, hi) in enumerate(ranges):
        ch = np.full(len(far), c)
        mean, _ = denormalise(far, np.ones_like(far), ch, stats)
        low, high = interval(far, np.full_like(far, 3.0), ch, stats)
        for v in (mean, low, high):
            assert not np.isnan(v).any()
            assert np.isnan(lo) or (v >= lo).all(), (c, v.min())
            assert np.isnan(hi) or (v <= hi).all(), (c, v.max())
        finite = mean[np.isfinite(mean)]  # beyond float range on an unbounded side: +-inf
        assert (np.diff(finite.astype(np.float64)) >= 0).all()  # monotone
        assert (low <= mean).all() and (mean <= high).all()
    back, _ = denormalise(z, np.ones_like(z), channel, stats)
    width = stats["bound_width"].to_numpy()[channel]
    lo, hi = (stats[k].to_numpy()[channel] for k in ("valid_min", "valid_max"))
    inside = ~((value - lo < width / 2) | (hi - value < width / 2))  # nearer a bound: taken as width / 2 away
    np.testing.assert_allclose(back[inside], value[inside], rtol=1e-4, atol=1e-5)
    assert (np.abs(back[~inside] - value[~inside]) <= width[~inside] / 2 + 1e-6).all()


def test_bounds_leave_the_body_of_the_data_alone():
    """A bound far from the data changes nothing; an unbounded channel has no width."""
    rng = np.random.default_rng(3)
    hr = rng.normal(85, 15, 20_000)
    bounded, channel, value = _bounded_stats([hr], [(0, np.nan)])
    free, _, _ = _bounded_stats([hr], [(np.nan, np.nan)])
    assert np.isnan(free["bound_width"][0]) and 0 < bounded["bound_width"][0] < 10
    zb, _ = normalise(value, np.zeros_like(value), channel, bounded)
    zf, _ = normalise(value, np.zeros_like(value), channel, free)
    assert np.abs(zb - zf).max() < 5e-3
