"""perceiver model: shapes, invariances (padding, order), no leakage, overfitting, save/load, inference."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from datasets.loader import ElementDataset, MaskingConfig, fit_contract
from datasets.loader.synthetic import synthetic_elements
from perceiver import checkpoint
from perceiver.attention import attend_packed_keys, plan_varlen
from perceiver.config import ModelConfig
from perceiver.heads.gaussian import gaussian_nll
from perceiver.metrics import Metrics
from perceiver.model import Percival
from perceiver.packing import PackedBatch, subset_offsets
from pipelines.run.config import RunConfig, load_run
from pipelines.run.inference import Queries, predict

ATOL = 2e-5


@pytest.fixture(scope="module")
def data():
    lengths = np.array([3, 40, 7, 120, 15, 60, 2, 33, 9, 80, 25, 5])
    elements, channels = synthetic_elements(seed=1, lengths=lengths)
    return elements, channels, ElementDataset(elements, channels)


def make_model(data, seed: int = 0, **overrides) -> Percival:
    elements, channels, _ = data
    config = ModelConfig.preset("tiny", contract=fit_contract(elements, channels), **overrides)
    torch.manual_seed(seed)
    return Percival(config).eval()


def masked(ds: ElementDataset, items, seed: int = 0) -> PackedBatch:
    return ds.collate(items, MaskingConfig(holdout=0.4, modality_dropout=0.3), np.random.default_rng(seed))


def per_record(x: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    return [x[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def test_shapes(data):
    _, _, ds = data
    model = make_model(data)
    batch = masked(ds, [0, 1, 2, 3])
    out = model(batch)
    n_tgt = int(batch.target.sum())
    assert out.mean.shape == out.log_sigma.shape == (n_tgt,)
    assert out.latents.shape == (4, model.config.sizes.n_latents, model.config.sizes.d_latent)
    assert out.target_offsets.tolist()[-1] == n_tgt
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_sigma).all()
    assert (out.log_sigma >= np.log(model.config.head.min_sigma) - 1e-6).all()


def test_fourier_scales_come_from_data(data):
    elements, channels, _ = data
    config = ModelConfig.preset("tiny", contract=fit_contract(elements, channels))
    spans = [np.nanmax(elements.time[a:b]) - np.nanmin(elements.time[a:b])
             for a, b in zip(elements.offsets[:-1], elements.offsets[1:], strict=True)]
    k = config.contract
    assert k.time_max_period == pytest.approx(2 * max(spans))
    assert 0 < k.time_min_period < 1.0
    assert k.coord_max_period == pytest.approx(2 * (6231.0 - 4770.0))
    assert config.channel_names == list(channels["name"]) and len(config.modalities) == 4


@pytest.mark.parametrize("varlen", ["auto", "padded", "loop"])
def test_padding_invariance(data, varlen):
    """A record's outputs do not depend on which (longer or shorter) records share its batch."""
    _, _, ds = data
    model = make_model(data, varlen=varlen)
    full = ds.collate([0, 3, 6, 9, 4])  # lengths 4, 121, 3, 81, 16 (with the static element)
    out = model(full)
    for pos, item in enumerate([0, 3, 6, 9, 4]):
        alone = model(ds.collate([item]))
        torch.testing.assert_close(out.latents[pos], alone.latents[0], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(per_record(out.mean, out.target_offsets)[pos], alone.mean,
                                   atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(per_record(out.log_sigma, out.target_offsets)[pos], alone.log_sigma,
                                   atol=ATOL, rtol=1e-5)


def test_varlen_strategies_agree_and_group_sensibly(data):
    _, _, ds = data
    batch = masked(ds, list(range(12)))
    outs = [make_model(data, varlen=v)(batch) for v in ("auto", "padded", "loop")]
    for o in outs[1:]:
        torch.testing.assert_close(o.mean, outs[0].mean, atol=ATOL, rtol=1e-5)
    # grouping: equal lengths -> one call, no mask, no copy; very different lengths -> several groups
    plan = plan_varlen(torch.tensor([0, 5, 10, 15]))
    assert len(plan.groups) == 1 and plan.groups[0].mask is None and plan.groups[0].start == 0
    plan = plan_varlen(torch.tensor([0, 2000, 2010, 2013, 2014]))
    assert len(plan.groups) == 2
    padded = sum(len(g.records) * g.length for g in plan.groups)
    assert padded < 2100


def test_permutation_invariance(data):
    """Shuffling elements inside each record and shuffling records leaves every prediction unchanged."""
    _, _, ds = data
    model = make_model(data)
    items = [1, 5, 7, 10]
    batch = masked(ds, items)
    out = model(batch)
    g = torch.Generator().manual_seed(0)
    perm = torch.cat([torch.randperm(int(b - a), generator=g) + a
                      for a, b in zip(batch.offsets[:-1], batch.offsets[1:], strict=True)])
    shuffled = PackedBatch(**{f.name: getattr(batch, f.name)[perm] if getattr(batch, f.name).shape[:1] == perm.shape
                        and f.name not in ("offsets", "record_index", "t_ref") else getattr(batch, f.name)
                        for f in dataclasses.fields(batch)})
    out2 = model(shuffled)
    torch.testing.assert_close(out2.latents, out.latents, atol=ATOL, rtol=1e-5)
    # targets come out in the shuffled order: compare by element index
    idx1 = batch.element_index[batch.target]
    idx2 = shuffled.element_index[shuffled.target]
    order1, order2 = torch.argsort(idx1), torch.argsort(idx2)
    torch.testing.assert_close(out2.mean[order2], out.mean[order1], atol=ATOL, rtol=1e-5)
    # record order
    rev = ds.collate(items[::-1])
    fwd = ds.collate(items)
    torch.testing.assert_close(model(rev).latents.flip(0), model(fwd).latents, atol=ATOL, rtol=1e-5)


def test_key_windows_match_a_per_record_search():
    """Each query's window: the keys of its record (and group) nearest before (at or before) and after it,
    in (time, coord) order, nearest first on each side; -1 beyond the record's keys."""
    from perceiver.neighbours import key_windows

    rng = np.random.default_rng(3)
    k_lens, q_lens = [5, 0, 9, 3], [4, 2, 6, 5]
    ko, qo = (torch.from_numpy(np.concatenate([[0], np.cumsum(x)])) for x in (k_lens, q_lens))
    nk, nq = int(ko[-1]), int(qo[-1])
    k_time = torch.from_numpy(rng.integers(0, 6, nk).astype(np.float64))
    q_time = torch.from_numpy(rng.integers(0, 6, nq).astype(np.float64))
    k_coord, q_coord = torch.from_numpy(rng.random(nk)), torch.from_numpy(rng.random(nq))
    k_group, q_group = torch.from_numpy(rng.integers(0, 2, nk)), torch.from_numpy(rng.integers(0, 2, nq))
    got = key_windows(ko, k_group, [k_time, k_coord], qo, q_group, [q_time, q_coord], 2, 3)
    for b in range(len(k_lens)):
        for j in range(int(qo[b]), int(qo[b + 1])):
            keys = [i for i in range(int(ko[b]), int(ko[b + 1])) if k_group[i] == q_group[j]]
            keys.sort(key=lambda i: (float(k_time[i]), float(k_coord[i])))
            before = [i for i in keys if (k_time[i], k_coord[i]) <= (q_time[j], q_coord[j])]
            after = [i for i in keys if (k_time[i], k_coord[i]) > (q_time[j], q_coord[j])]
            expected = ([-1, -1] + before)[-2:] + (after + [-1, -1, -1])[:3]
            assert got[j].tolist() == expected


def test_local_decoder_reads_only_a_bounded_neighbourhood(data):
    """A query's prediction does not change when a visible element outside its windows changes: the decoder's
    cost per query is fixed, whatever the record's length."""
    elements, channels, ds = data
    config = ModelConfig.preset("tiny", contract=fit_contract(elements, channels), decoder_local_time=2,
                                decoder_local_channel=1, decoder_neighbours=False)
    torch.manual_seed(0)
    model = Percival(config).eval()
    batch = ds.collate([3])  # 120 elements
    n = batch.n_elements
    with torch.no_grad():
        encoded = model.encode(batch.time, batch.channel, batch.coord, batch.value, batch.error, batch.offsets)
        q = slice(60, 61)
        window = model.local_decoder.neighbourhood(batch.time[q], batch.channel[q], batch.coord[q],
                                                   torch.tensor([0, 1]), batch.time, batch.channel, batch.coord,
                                                   batch.offsets)
        assert 0 < int((window >= 0).sum()) <= 6
        mean = model.decode(encoded, batch.time[q], batch.channel[q], batch.coord[q], torch.tensor([0, 1])).mean
        outside = torch.ones(n, dtype=torch.bool)
        outside[window[window >= 0]] = False
        noise = torch.randn_like(encoded.tokens)  # not a constant shift: the keys' LayerNorm would remove it
        tokens = torch.where(outside[:, None], encoded.tokens + noise, encoded.tokens)
        changed = dataclasses.replace(encoded, tokens=tokens)
        mean2 = model.decode(changed, batch.time[q], batch.channel[q], batch.coord[q], torch.tensor([0, 1])).mean
        torch.testing.assert_close(mean2, mean)
        inside = torch.where(~outside[:, None], encoded.tokens + noise, encoded.tokens)
        mean3 = model.decode(dataclasses.replace(encoded, tokens=inside), batch.time[q], batch.channel[q],
                             batch.coord[q], torch.tensor([0, 1])).mean
        assert not torch.allclose(mean3, mean)


def test_chunked_inference_equals_one_pass(data, monkeypatch):
    """Without gradients the queries run in chunks (bounded memory); the result is the same."""
    import perceiver.local_attention as local_module
    import perceiver.model as model_module

    _, _, ds = data
    model = make_model(data)
    batch = ds.collate(np.arange(len(ds)))
    with torch.enable_grad():  # the training path: one pass over every query
        out = model(batch)
    whole = predict(model, batch)
    torch.testing.assert_close(whole.mean, out.mean.detach(), atol=ATOL, rtol=1e-5)
    monkeypatch.setattr(model_module, "QUERY_CHUNK", 37)
    monkeypatch.setattr(local_module, "LOCAL_CHUNK", 11)
    chunked = predict(model, batch)
    torch.testing.assert_close(chunked.mean, whole.mean, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(chunked.sigma, whole.sigma, atol=ATOL, rtol=1e-5)


def test_configs_of_the_retired_quadratic_decoder_are_refused_clearly():
    data = RunConfig().to_dict()
    data["model"]["decoder_element_heads"] = 4
    with pytest.raises(ValueError, match="O\\(N\\^2\\)"):
        RunConfig.from_dict(data)
    data["model"]["decoder_element_heads"] = 0
    assert RunConfig.from_dict(data).model.decoder.local_heads == RunConfig().model.decoder.local_heads


def test_hidden_elements_do_not_leak_into_the_encoder(data):
    _, _, ds = data
    model = make_model(data)
    batch = masked(ds, [1, 3, 5, 9])
    hidden = ~batch.visible
    assert hidden.any()
    out = model(batch)
    tampered = dataclasses.replace(batch, value=torch.where(hidden, batch.value + 100.0, batch.value),
                                   error=torch.where(hidden, torch.full_like(batch.error, 7.0), batch.error))
    out2 = model(tampered)
    assert torch.equal(out.latents, out2.latents)
    assert torch.equal(out.mean, out2.mean) and torch.equal(out.log_sigma, out2.log_sigma)
    # and gradients: no path from a hidden value to any output
    value = batch.value.clone().requires_grad_(True)
    o = model(dataclasses.replace(batch, value=value))
    (o.mean.sum() + o.log_sigma.sum() + o.latents.sum()).backward()
    assert (value.grad[hidden] == 0).all()
    assert (value.grad[batch.visible] != 0).any()


def test_queries_are_independent_of_each_other(data):
    _, _, ds = data
    model = make_model(data)
    batch = ds.collate([2, 4])
    a = predict(model, batch,
                Queries.from_arrays([1.0, 2.0, 3.0], [0, 1, 4], [np.nan, np.nan, 4770.0], [2, 1]))
    b = predict(model, batch, Queries.from_arrays([1.0, 9.0, 2.0, 3.0, 5.0], [0, 2, 1, 4, 3],
                                                  [np.nan, np.nan, np.nan, 4770.0, np.nan], [3, 2]))
    torch.testing.assert_close(b.mean[[0, 2, 3]], a.mean, atol=ATOL, rtol=1e-5)
    assert a.latent.shape == (2, model.config.sizes.d_latent) and (a.sigma > 0).all()


def test_predict_observed_matches_forward(data):
    _, _, ds = data
    model = make_model(data)
    batch = ds.collate([0, 1, 2])
    out = model(batch)
    pred = predict(model, batch)
    torch.testing.assert_close(pred.mean, out.mean)
    torch.testing.assert_close(pred.sigma, out.log_sigma.exp())
    torch.testing.assert_close(pred.latent, out.latents.mean(1))
    # absolute query times: t_ref is subtracted, so asking for the observed times reproduces them
    t_abs = batch.time.double() + batch.t_ref[torch.repeat_interleave(torch.arange(3), batch.lengths)]
    q = Queries(batch.offsets, t_abs, batch.channel, batch.coord)
    torch.testing.assert_close(predict(model, batch, q).mean, out.mean, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="channel"):
        predict(model, batch, Queries.from_arrays([0.0], [99], [np.nan], [1, 0, 0]))


def test_static_elements_use_the_no_time_encoding(data):
    model = make_model(data)
    enc = model.encoding
    nt = enc.time_features.n_features
    time, coord = torch.tensor([np.nan, 5.0]), torch.tensor([np.nan, np.nan])
    f = torch.cat([enc.position_features(time, coord), enc.measurement_features(None, None, time[:, None])], -1)
    assert (f[0, :nt] == 0).all() and f[0, nt] == 1 and f[1, nt] == 0 and f[1, :nt].abs().sum() > 0
    assert (f[:, -3:] == 0).all()  # queries carry no measurement
    before = enc.proj(f)
    with torch.no_grad():
        enc.proj.weight[:, nt] += 1.0  # the learned no-time vector
    after = enc.proj(f)
    torch.testing.assert_close(after[0], before[0] + 1.0)
    torch.testing.assert_close(after[1], before[1])
    torch.testing.assert_close(enc.no_time, enc.proj.weight[:, nt])
    # channels of one modality share its embedding: the token table is channel + modality
    ch = torch.tensor([0, 1])
    tok = enc(torch.tensor([1.0, 1.0]), ch, torch.tensor([np.nan, np.nan]))
    assert not torch.allclose(tok[0], tok[1])


def test_nll_and_metrics():
    mean, log_sigma = torch.tensor([0.0, 1.0]), torch.log(torch.tensor([1.0, 0.5]))
    value, error = torch.tensor([1.0, 1.0]), torch.tensor([float("nan"), 0.5])
    nll = gaussian_nll(mean, log_sigma, value, error)
    expect = 0.5 * (np.log(2 * np.pi) + np.log([1.0, 0.5]) + np.array([1.0, 0.0]) / np.array([1.0, 0.5]))
    np.testing.assert_allclose(nll.numpy(), expect, rtol=1e-6)
    # coverage of a calibrated Gaussian is close to 68 / 95 %
    g = torch.Generator().manual_seed(0)
    n = 20000
    batch_value = torch.randn(n, generator=g) * 2.0
    m = Metrics(["a", "b"], [0, 1], ["x", "y"])
    m.update(torch.zeros(n), torch.full((n,), float(np.log(2.0))), batch_value, torch.full((n,), float("nan")),
             torch.randint(0, 2, (n,), generator=g))
    s = m.summary()
    assert s["overall"]["n"] == n
    assert abs(s["overall"]["coverage68"] - 0.6827) < 0.01 and abs(s["overall"]["coverage95"] - 0.95) < 0.01
    assert abs(s["overall"]["mse"] - 4.0) < 0.15
    assert set(s["modality"]) == {"x", "y"} and s["channel"]["a"]["n"] + s["channel"]["b"]["n"] == n


def test_tiny_model_overfits_a_small_batch(data):
    """The held-out targets of one fixed batch of short records are memorised."""
    _, _, ds = data
    model = make_model(data, seed=1).train()
    batch = masked(ds, [2, 8, 11, 4], seed=3)
    no_error = torch.isnan(batch.error[batch.target])  # where the NLL cannot hide behind a measurement error
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, mses = [], []
    for _ in range(300):
        out = model(batch)
        value = model.loss(batch, out)  # the head's training objective (beta-NLL)
        opt.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(value.detach()))
        residual = out.mean.detach() - batch.value[batch.target]
        mses.append(float((residual[no_error] ** 2).mean()))
    assert no_error.sum() >= 10
    assert losses[-1] < losses[0] - 1.0
    assert mses[-1] < 0.02 < 0.5 < mses[0]


def test_bf16_autocast_close_to_fp32(data):
    _, _, ds = data
    model = make_model(data)
    batch = masked(ds, [1, 3, 5])
    ref = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out.mean.dtype == torch.float32
    torch.testing.assert_close(out.mean, ref.mean, atol=0.1, rtol=0.05)


def test_save_load_round_trip(tmp_path, data):
    _, _, ds = data
    model = make_model(data, share_weights=True)
    config = RunConfig(model=model.config)
    checkpoint.save(tmp_path, model, config.sections(), step=3)
    loaded, cfg = load_run(tmp_path)
    assert cfg == config
    assert json.loads((tmp_path / "config.json").read_text())["model"]["sizes"]["share_weights"] is True
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    batch = masked(ds, [0, 1, 2])
    torch.testing.assert_close(loaded(batch).mean, model(batch).mean, atol=0, rtol=0)
    assert RunConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown"):
        RunConfig.from_dict({"model": {"nonsense": 1}})


def test_empty_records_and_subset_offsets():
    offsets = torch.tensor([0, 3, 3, 5, 5])
    mask = torch.tensor([True, False, True, True, True])
    assert subset_offsets(offsets, mask).tolist() == [0, 2, 2, 4, 4]
    # records without keys get a zero attention output; the others are unaffected by them
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(2, 4, 8, generator=g), torch.randn(5, 2, 2, 8, generator=g)
    out = attend_packed_keys(q, kv, plan_varlen(offsets))
    assert out.shape == (4, 2, 4, 8) and (out[[1, 3]] == 0).all()
    alone = attend_packed_keys(q, kv[3:5], plan_varlen(torch.tensor([0, 2])))
    torch.testing.assert_close(out[2], alone[0])


def test_config_fields_are_type_checked():
    data = RunConfig().to_dict()
    data["train"]["steps"] = "__import__('os').system('true')"
    with pytest.raises(ValueError, match="TrainConfig.steps must be int"):
        RunConfig.from_dict(data)
    data = RunConfig().to_dict()
    data["train"]["lr"], data["model"]["sizes"]["share_weights"] = 1, True  # an int is a float in JSON
    assert RunConfig.from_dict(data).train.lr == 1
    data["model"]["sizes"]["share_weights"] = 1
    with pytest.raises(ValueError, match="Sizes.share_weights must be bool"):
        RunConfig.from_dict(data)


def test_one_visible_element_or_none_of_a_channel_still_gets_a_prediction_and_an_interval(data):
    """A record with a single visible element, and queries of channels the record never shows, get a finite
    mean and sigma (the null element and the latents answer where no neighbour exists)."""
    _, _, ds = data
    model = make_model(data)
    batch = ds.collate([0, 6])  # 3 and 2 elements (plus the static age)
    visible = torch.zeros(batch.n_elements, dtype=torch.bool)
    visible[batch.offsets[:-1]] = True  # one visible element per record
    batch = dataclasses.replace(batch, visible=visible, target=~visible)
    n_channels = model.config.n_channels
    grid = Queries.from_arrays(np.repeat(batch.t_ref.numpy(), n_channels) + 1.0, np.tile(np.arange(n_channels), 2),
                               np.nan, counts=[n_channels, n_channels])
    for queries in (None, grid):
        pred = predict(model, batch, queries)
        assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.sigma).all()
        assert (pred.sigma > 0).all()
    out = model(batch)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_sigma).all()


def test_channel_time_gate_removes_periods_a_channels_sampling_cannot_support(data):
    elements, channels, _ = data
    contract = fit_contract(elements, channels)
    assert np.isfinite([c.time_min_period for c in contract.channels if c.modality != "static"]).all()
    contract.channels[0].time_min_period = 10 * contract.time_max_period  # nothing supported: time-free
    contract.channels[1].time_min_period = float("nan")  # unknown: ungated
    model = Percival(ModelConfig.preset("tiny", contract=contract, input={"channel_time_gate": True})).eval()
    enc = model.encoding
    assert enc.time_gate[0].sum() == 0 and enc.time_gate[1].sum() == enc.time_gate.shape[1]
    t, ch, nan = torch.tensor([0.0, 3.7]), torch.tensor([0, 0]), torch.full((2,), float("nan"))
    with torch.no_grad():
        gated, free = enc(t, ch, nan), enc(t, ch + 1, nan)
    torch.testing.assert_close(gated[0], gated[1])  # channel 0's token no longer depends on time
    assert not torch.allclose(free[0], free[1])
    ungated = Percival(ModelConfig.preset("tiny", contract=contract)).encoding
    assert not ungated.gated  # off by default: old checkpoints and presets unchanged
