"""Same-channel neighbours (shared by the baselines and the decoder's query features)."""

import numpy as np
import torch

from perceiver.model import subset_offsets
from perceiver.neighbours import NeighbourFeatures, same_channel_neighbours
from pipelines.run.baselines import linear_interpolation

NAN = float("nan")


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def test_neighbours_by_hand():
    # keys: record 0 = ch0 @ t1, ch0 @ t3, ch1 @ t2; record 1 = ch0 @ t5
    key_off, key_ch, key_t = _t([0, 3, 4], torch.int64), _t([0, 0, 1, 0], torch.int64), _t([1.0, 3.0, 2.0, 5.0])
    # queries: record 0 = ch0 @ t2, ch0 @ t3 (equal to a key), ch0 @ t0, ch1 @ t5, ch2 static;
    #          record 1 = ch0 @ t4 (must not see record 0)
    q_off, q_ch = _t([0, 5, 6], torch.int64), _t([0, 0, 0, 1, 2, 0], torch.int64)
    q_t = _t([2.0, 3.0, 0.0, 5.0, NAN, 4.0])
    prev, nxt = same_channel_neighbours(key_off, key_ch, [key_t], q_off, q_ch, [q_t])
    assert prev.tolist() == [0, 1, -1, 2, -1, -1]
    assert nxt.tolist() == [1, -1, 0, -1, -1, 3]


def test_second_axis_orders_pixels_of_one_time():
    # a spectrum: one time, pixels along wavelength; the query sits between 20 and 30 Angstrom
    off = _t([0, 3], torch.int64)
    prev, nxt = same_channel_neighbours(off, _t([0, 0, 0], torch.int64), [_t([0.0, 0.0, 0.0]), _t([30.0, 10.0, 20.0])],
                                        _t([0, 1], torch.int64), _t([0], torch.int64), [_t([0.0]), _t([25.0])])
    assert prev.tolist() == [2] and nxt.tolist() == [0]


def test_neighbours_match_brute_force():
    rng = np.random.default_rng(3)
    lengths_k, lengths_q = rng.integers(0, 30, 20), rng.integers(0, 10, 20)
    k_off = np.concatenate([[0], np.cumsum(lengths_k)])
    q_off = np.concatenate([[0], np.cumsum(lengths_q)])
    k_ch, q_ch = rng.integers(0, 4, k_off[-1]), rng.integers(0, 4, q_off[-1])
    k_t, q_t = rng.integers(0, 20, k_off[-1]).astype(float), rng.integers(0, 20, q_off[-1]).astype(float)
    prev, nxt = same_channel_neighbours(torch.from_numpy(k_off), torch.from_numpy(k_ch), [torch.from_numpy(k_t)],
                                        torch.from_numpy(q_off), torch.from_numpy(q_ch), [torch.from_numpy(q_t)])
    k_rec = np.repeat(np.arange(20), lengths_k)
    q_rec = np.repeat(np.arange(20), lengths_q)
    for i in range(q_off[-1]):
        same = np.flatnonzero((k_rec == q_rec[i]) & (k_ch == q_ch[i]))
        before, after = same[k_t[same] <= q_t[i]], same[k_t[same] > q_t[i]]
        if len(before):
            assert k_t[prev[i]] == k_t[before].max() and prev[i] in before
        else:
            assert prev[i] == -1
        if len(after):
            assert k_t[nxt[i]] == k_t[after].min() and nxt[i] in after
        else:
            assert nxt[i] == -1


def test_interpolation_feature_equals_the_baseline():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, 16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = offsets[-1]
    time, channel, value = rng.uniform(0, 50, n), rng.integers(0, 3, n), rng.normal(size=n)
    visible = rng.random(n) < 0.6
    target = ~visible
    expected = linear_interpolation(offsets, time, channel, value, visible, target, np.zeros(3))

    features = NeighbourFeatures(1, time_scale=1.0, coord_scale=1.0).double()
    with torch.no_grad():  # read out feature 2, the linear interpolation
        features.proj.weight.zero_()
        features.proj.bias.zero_()
        features.proj.weight[0, 2] = 1.0
    vis, tgt = torch.from_numpy(visible), torch.from_numpy(target)
    t, c, v = torch.from_numpy(time), torch.from_numpy(channel), torch.from_numpy(value)
    coord = torch.full((n,), NAN, dtype=torch.float64)
    off = torch.from_numpy(offsets)
    out = features(t[tgt], c[tgt], coord[tgt], subset_offsets(off, tgt), t[vis], c[vis], coord[vis], v[vis],
                   subset_offsets(off, vis))
    np.testing.assert_allclose(out[:, 0].detach().numpy(), expected, rtol=1e-5, atol=1e-6)
