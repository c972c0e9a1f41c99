"""The baselines: along wavelength for spectra, the per-record mean, and the gradient-boost baseline's
features (visible elements only) and fit."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.loader import ElementDataset
from datasets.loader.synthetic import synthetic_elements
from pipelines.run.baselines import (
    along_axis,
    channel_means,
    fit_gradient_boost,
    neighbour_feature_names,
    neighbour_features,
    per_record_mean,
    predict_baseline,
)
from pipelines.run.protocols import split_plan


def test_spectra_are_interpolated_along_wavelength_and_light_curves_along_time():
    # record 0: a spectrum (one time, wavelengths 1..5); record 1: a light curve (times 0..3, one band)
    offsets = np.array([0, 5, 9])
    time = np.array([5.0] * 5 + [0.0, 1.0, 2.0, 3.0])
    channel = np.array([0] * 5 + [1] * 4)
    coord = np.array([1.0, 2.0, 3.0, 4.0, 5.0] + [6000.0] * 4)
    value = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 0.0, 5.0, 7.0, 9.0])
    visible = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    means = np.array([0.0, 0.0])
    np.testing.assert_array_equal(along_axis(offsets, time, channel, coord)[:5], coord[:5])
    np.testing.assert_array_equal(along_axis(offsets, time, channel, coord)[5:], time[5:])
    lin = predict_baseline("linear_interpolation", offsets, time, channel, value, visible, ~visible, means, coord)
    ffill = predict_baseline("forward_fill", offsets, time, channel, value, visible, ~visible, means, coord)
    np.testing.assert_allclose(lin, [30.0, 3.5])
    np.testing.assert_allclose(ffill, [20.0, 0.0])


# --- per-record mean ---------------------------------------------------------------------------------------

def test_per_record_mean_by_hand_and_its_channel_mean_fallback():
    # r0: a@0=1, b@0.5=10, a@1=2*, b@1.5=13*, a@2=5, a@3=4*;  r1: a@0=0, a@2=2*, a@4=8, s static=60*
    offsets = np.array([0, 6, 10])
    channel = np.array([0, 1, 0, 1, 0, 0, 0, 0, 0, 2])
    value = np.array([1, 10, 2, 13, 5, 4, 0, 2, 8, 60], np.float64)
    hidden = np.zeros(10, bool)
    hidden[[2, 3, 5, 7, 9]] = True
    means = np.array([1.0, 15.0, 50.0])
    pred = predict_baseline("per_record_mean", offsets, np.zeros(10), channel, value, ~hidden, hidden, means)
    # r0 a: mean(1, 5) = 3 (twice); r0 b: 10; r1 a: mean(0, 8) = 4; r1 s: none visible -> channel mean 50
    np.testing.assert_allclose(pred, [3.0, 10.0, 3.0, 4.0, 50.0])
    nothing = np.zeros(10, bool)
    assert np.allclose(per_record_mean(offsets, channel, value, nothing, hidden, means), means[channel[hidden]])


# --- gradient boosting on the decoder's evidence -----------------------------------------------------------

def _synthetic(n_records: int, seed: int, split: str | None = None):
    elements, channels = synthetic_elements(n_records=n_records, seed=seed, lengths=np.full(n_records, 30))
    return ElementDataset(elements, channels, split=split)


def _features(ds, visible, target):
    return neighbour_features(ds.offsets, ds.time.astype(np.float64), ds.channel, ds.coord, ds.value, visible,
                              target, ds.channel_modality, coord_gaps=True)


def test_gradient_boost_features_see_nothing_of_hidden_elements():
    ds = _synthetic(30, seed=4)
    hidden = split_plan(ds, "holdout", seed=0, split="train")
    X = _features(ds, ~hidden, hidden)
    assert X.shape == (hidden.sum(), len(neighbour_feature_names(len(ds.channel_modality), coord=True)))
    assert np.isfinite(X[:, 3]).any()  # some queries do have a visible previous value of their channel

    # another value for every hidden element: not one feature changes
    value = ds.value.copy()
    value[hidden] = np.random.default_rng(0).normal(50.0, 10.0, hidden.sum())
    ds.value = value
    np.testing.assert_array_equal(_features(ds, ~hidden, hidden), X)

    # half of the hidden elements deleted from the records altogether (their count, times, channels gone):
    # the remaining hidden elements' rows are the same as before
    rng = np.random.default_rng(1)
    drop = hidden & (rng.random(len(hidden)) < 0.5)
    keep = ~drop
    counts = np.add.reduceat(keep.astype(np.int64), ds.offsets[:-1])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    X2 = neighbour_features(offsets, ds.time.astype(np.float64)[keep], ds.channel[keep], ds.coord[keep],
                            ds.value[keep], ~hidden[keep], hidden[keep], ds.channel_modality, coord_gaps=True)
    np.testing.assert_array_equal(X2, X[~drop[hidden]])

    # a visible element does change the rows of its record's queries (the features are not blind)
    vis = np.flatnonzero(~hidden & np.isfinite(ds.time))[0]
    value[vis] += 1.0
    assert not np.array_equal(_features(ds, ~hidden, hidden), X, equal_nan=True)


def test_gradient_boost_beats_the_channel_mean_where_neighbours_tell():
    # records share hidden levels across channels and time: the visible neighbours predict the hidden values
    train, test = _synthetic(400, seed=7, split="train"), _synthetic(400, seed=7, split="test")
    h_train = split_plan(train, "holdout", seed=0, split="train")
    h_test = split_plan(test, "holdout", seed=0, split="test")
    means = channel_means(train.channel, train.value, len(train.channel_modality))
    gb = fit_gradient_boost(train.offsets, train.time.astype(np.float64), train.channel, train.coord, train.value,
                            ~h_train, h_train, means, train.channel_modality, max_elements=2000, seed=0,
                            max_iter=60)
    assert gb.regressor is not None and gb.n_train_elements == min(2000, int(h_train.sum()))
    assert "train-split records" in gb.describe() and "channel and modality" in gb.describe()
    kw = dict(offsets=test.offsets, time=test.time.astype(np.float64), channel=test.channel, value=test.value,
              visible=~h_test, target=h_test, means=means, coord=test.coord)
    y = test.value[h_test]
    mse = {name: float(np.mean((predict_baseline(name, **kw, gradient_boost=gb) - y) ** 2))
           for name in ("channel_mean", "per_record_mean", "gradient_boost")}
    assert mse["gradient_boost"] < 0.7 * mse["channel_mean"], mse
    with pytest.raises(ValueError, match="fitted model"):
        predict_baseline("gradient_boost", **kw)


def test_gradient_boost_without_training_data_predicts_the_channel_mean():
    ds = _synthetic(4, seed=1)
    none = np.zeros(ds.n_elements, bool)
    means = np.arange(len(ds.channel_modality), dtype=np.float64)
    gb = fit_gradient_boost(ds.offsets, ds.time, ds.channel, ds.coord, ds.value, ~none, none, means,
                            ds.channel_modality)
    assert gb.regressor is None and "no hidden" in gb.describe()
    target = ~none
    np.testing.assert_array_equal(gb.predict(ds.offsets, ds.time, ds.channel, ds.coord, ds.value, none, target),
                                  means[ds.channel])


def test_own_channel_features_are_the_decoders_neighbour_features():
    import torch

    from perceiver.neighbours import NeighbourFeatures

    ds = _synthetic(20, seed=3)
    hidden = split_plan(ds, "holdout", seed=0, split="test")
    X = _features(ds, ~hidden, hidden)[:, 3:10]  # own: prev, next, interpolation, time gaps, coord gaps
    decoder = NeighbourFeatures(9, time_scale=1.0, coord_scale=1.0)
    with torch.no_grad():  # identity projection: the nine raw features
        decoder.proj.weight.copy_(torch.eye(9))
        decoder.proj.bias.zero_()

    def packed(mask):
        counts = np.add.reduceat(mask.astype(np.int64), ds.offsets[:-1])
        return torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]))

    t = lambda a, m: torch.from_numpy(np.ascontiguousarray(a[m]))  # noqa: E731
    v, h = ~hidden, hidden
    with torch.no_grad():
        F = decoder(t(ds.time, h), t(ds.channel, h), t(ds.coord, h), packed(h), t(ds.time, v), t(ds.channel, v),
                    t(ds.coord, v), t(ds.value, v), packed(v)).numpy()
    has_p, has_n = F[:, 3] > 0, F[:, 4] > 0
    np.testing.assert_array_equal(has_p, np.isfinite(X[:, 0]))
    np.testing.assert_array_equal(has_n, np.isfinite(X[:, 1]))
    np.testing.assert_allclose(X[has_p, 0], F[has_p, 0], rtol=1e-6)
    np.testing.assert_allclose(X[has_n, 1], F[has_n, 1], rtol=1e-6)
    np.testing.assert_allclose(X[has_p | has_n, 2], F[has_p | has_n, 2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.log1p(X[has_p, 3]), F[has_p, 5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.log1p(np.nan_to_num(X[has_n, 6])), F[has_n, 8], rtol=1e-4, atol=1e-4)  # NaN: 0
