"""pipelines.run.evaluation (protocol, baselines on the hidden elements, scoring), pipelines.run.plots, and the
``evaluate`` Prefect flow end to end on the bundled PhysioNet sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from datasets.format import ElementSet
from datasets.loader import ElementDataset, fit_contract
from datasets.loader.synthetic import synthetic_elements
from perceiver.config import ModelConfig
from perceiver.model import Percival
from pipelines.run.config import RunConfig, TrainConfig
from pipelines.run.evaluation import (
    METHODS,
    ProtocolResult,
    baseline_predictions,
    coverage_curve,
    evaluate_protocol,
    fit_constant_sigma,
    model_predictions,
    reserved_records,
    score,
    train_channel_means,
)
from pipelines.run.inference import masked_batch
from pipelines.run.protocols import Protocol, hidden_elements, load_split, split_plan

LOG_2PI = math.log(2 * math.pi)


# --- a hand-made ElementSet: identity normalisation, so normalised = physical values ----------------------

def hand_made() -> tuple[ElementDataset, np.ndarray]:
    """Two records. Channels a, b (vitals) and s (static); '*' = hidden.

    r0: (t=0, a, 1) (0.5, b, 10) (1, a, 2)* (1.5, b, 13)* (2, a, 5) (3, a, 4)*
    r1: (0, a, 0) (2, a, 2, error 1.5)* (4, a, 8) (NaN, s, 60)*
    """
    nan = math.nan
    time = np.array([0, 0.5, 1, 1.5, 2, 3, 0, 2, 4, nan])
    channel = np.array([0, 1, 0, 1, 0, 0, 0, 0, 0, 2], np.int16)
    value = np.array([1, 10, 2, 13, 5, 4, 0, 2, 8, 60], np.float32)
    error = np.full(10, nan, np.float32)
    error[7] = 1.5
    es = ElementSet(pd.DataFrame({"record_id": ["r0", "r1"], "source_file": "x", "split": "test", "t0": 0.0}),
                    np.array([6, 4]), time, channel, value, error, np.full(10, nan, np.float32))
    channels = pd.DataFrame({"name": ["a", "b", "s"], "modality": ["vitals", "vitals", "static"],
                             "unit": ["mmHg", "1 / min", "yr"], "transform": "identity", "softening": 1.0,
                             "location": 0.0, "scale": 1.0})
    hidden = np.zeros(10, bool)
    hidden[[2, 3, 5, 7, 9]] = True
    return ElementDataset(es, channels), hidden


MEANS = np.array([1.0, 15.0, 50.0])  # "train-split" channel means


def test_baselines_on_hand_made_records():
    ds, hidden = hand_made()
    pred = baseline_predictions(ds, hidden, MEANS)
    # hidden, in packed order: r0 a@1, b@1.5, a@3; r1 a@2, static s
    np.testing.assert_allclose(pred["channel_mean"], [1, 15, 1, 1, 50])
    # mean of the record's visible values of the channel: r0 a (1, 5), r0 b (10), r1 a (0, 8); static -> mean
    np.testing.assert_allclose(pred["per_record_mean"], [3, 10, 3, 4, 50])
    assert "gradient_boost" not in pred  # it needs a model trained on the train split
    # last visible value of the same record and channel at or before the time; static -> channel mean
    np.testing.assert_allclose(pred["forward_fill"], [1, 10, 5, 0, 50])
    # a@1 between (0, 1) and (2, 5): 3; b@1.5 after the last b: 10; a@3 after the last a: 5;
    # r1 a@2 between (0, 0) and (4, 8): 4; static -> channel mean
    np.testing.assert_allclose(pred["linear_interpolation"], [3, 10, 5, 4, 50])


def test_scoring_matches_hand_computed_values():
    ds, hidden = hand_made()
    sel = np.flatnonzero(hidden)
    value, error, channel = ds.value[sel], ds.error[sel], ds.channel[sel]
    mean = baseline_predictions(ds, hidden, MEANS)["linear_interpolation"]
    sigma = np.full(5, 2.0)
    out = score(value, error, channel, mean, sigma, ["a", "b", "s"], [0, 0, 1], ["vitals", "static"])

    r = np.array([-1.0, 3.0, -1.0, -2.0, 10.0])  # value - prediction
    var = np.array([4.0, 4.0, 4.0, 4.0 + 1.5**2, 4.0])  # sigma^2 + e^2 (unknown error = 0)
    nll = 0.5 * (LOG_2PI + np.log(var) + r**2 / var)
    o = out["overall"]
    assert o["n"] == 5
    assert o["mse"] == pytest.approx(115 / 5)
    assert o["mae"] == pytest.approx(17 / 5)
    assert o["nll"] == pytest.approx(nll.mean(), rel=1e-6)
    # |r| / sqrt(var) = 0.5, 1.5, 0.5, 0.8, 5
    assert o["coverage68"] == pytest.approx(3 / 5) and o["coverage95"] == pytest.approx(4 / 5)
    assert out["channel"]["a"]["mse"] == pytest.approx((1 + 1 + 4) / 3)
    assert out["channel"]["b"]["mae"] == pytest.approx(3.0)
    assert out["modality"]["vitals"]["mse"] == pytest.approx(15 / 4)
    assert out["modality"]["static"]["nll"] == pytest.approx(nll[4], rel=1e-6)
    np.testing.assert_allclose(coverage_curve(value, error, mean, sigma, levels=(0.6827, 0.9545, 0.999)),
                               [3 / 5, 4 / 5, 4 / 5])
    # a calibrated Gaussian predictor gives its levels back
    rng = np.random.default_rng(0)
    z = rng.standard_normal(200_000)
    np.testing.assert_allclose(coverage_curve(z, np.full(len(z), np.nan), 0 * z, 1 + 0 * z, (0.25, 0.5, 0.9)),
                               [0.25, 0.5, 0.9], atol=0.005)


def test_constant_sigma_is_the_maximum_likelihood_fit():
    # no errors: the RMS residual of each channel; an empty channel takes the pooled fit
    r = np.array([1.0, -3.0, 2.0, 2.0])
    s = fit_constant_sigma(r, np.full(4, np.nan), np.array([0, 0, 1, 1]), 3)
    np.testing.assert_allclose(s, [math.sqrt(5.0), 2.0, math.sqrt(18 / 4)])
    # with errors: a maximum of sum log N(r; 0, sigma^2 + e^2)
    rng = np.random.default_rng(1)
    e = rng.uniform(0.1, 2.0, 500)
    r = rng.standard_normal(500) * np.sqrt(0.7**2 + e**2)
    (fit,) = fit_constant_sigma(r, e, np.zeros(500, np.int64), 1)

    def nll(sig):
        v = sig**2 + e**2
        return np.sum(np.log(v) + r**2 / v)

    assert nll(fit) <= min(nll(fit * 0.99), nll(fit * 1.01))
    assert 0.5 < fit < 0.9
    # residuals smaller than the errors: the floor, not a negative variance
    assert fit_constant_sigma(np.zeros(3), np.ones(3), np.zeros(3, np.int64), 1)[0] == pytest.approx(1e-3)


# --- the protocol ------------------------------------------------------------------------------------------

def test_holdout_hides_thirty_percent_per_record_deterministically():
    elements, channels = synthetic_elements(n_records=40, seed=5)
    ds = ElementDataset(elements, channels)
    a = split_plan(ds, "holdout", seed=3, split="test")
    b = split_plan(ds, "holdout", seed=3, split="test")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, split_plan(ds, "holdout", seed=4, split="test"))
    assert not np.array_equal(a, split_plan(ds, "holdout", seed=3, split="val"))
    counts = np.add.reduceat(a.astype(int), ds.offsets[:-1])
    np.testing.assert_array_equal(counts, np.clip(np.rint(0.3 * ds.lengths), 1, ds.lengths - 1))

    # one-element records hide nothing; two-element records hide one; never a whole record
    offsets = np.array([0, 1, 3, 13])
    h = hidden_elements(offsets, np.zeros(13, np.int64), np.arange(13.0), "holdout", ["m"],
                        np.random.default_rng(0))
    assert h[0:1].sum() == 0 and h[1:3].sum() == 1 and h[3:13].sum() == 3


def test_modality_protocol_hides_exactly_the_named_modality():
    # records: [vitals, labs, vitals, static] | [labs, labs] | [vitals, vitals]
    modality = np.array([0, 1, 0, 2, 1, 1, 0, 0])
    offsets = np.array([0, 4, 6, 8])
    h = hidden_elements(offsets, modality, np.zeros(8), "modality:labs", ["vitals", "labs", "static"],
                        np.random.default_rng(0))
    np.testing.assert_array_equal(h, [0, 1, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="no modality 'spectrum'"):
        hidden_elements(offsets, modality, np.zeros(8), "modality:spectrum", ["vitals", "labs", "static"], None)

    elements, channels = synthetic_elements(n_records=40, seed=5)
    ds = ElementDataset(elements, channels)
    labs = ds.modalities.index("labs")
    h = split_plan(ds, "modality:labs", seed=0, split="test")
    assert h.any() and (ds.modality[h] == labs).all()
    per_record = np.add.reduceat(h.astype(int), ds.offsets[:-1])
    n_labs = np.add.reduceat((ds.modality == labs).astype(int), ds.offsets[:-1])
    np.testing.assert_array_equal(per_record, n_labs)  # every labs element of a record that has labs
    assert (per_record < ds.lengths).all()


def test_protocol_names():
    assert Protocol.parse("holdout") == Protocol("holdout", None, 0.3)
    assert Protocol.parse("holdout:0.5").name == "holdout:0.5"
    assert Protocol.parse("modality:labs").slug == "modality-labs"
    for bad in ("modality", "holdout:1.5", "forecast"):
        with pytest.raises(ValueError):
            Protocol.parse(bad)


def test_model_predicts_exactly_the_hidden_elements_whatever_the_batching():
    elements, channels = synthetic_elements(n_records=12, seed=2, lengths=np.arange(12) * 7 + 5)
    torch.manual_seed(0)
    model = Percival(ModelConfig.preset("tiny", contract=fit_contract(elements, channels))).eval()
    ds = ElementDataset(elements, channels, model.config.contract)
    hidden = split_plan(ds, "holdout", seed=0, split="test")
    m1, s1, _ = model_predictions(model, ds, hidden, batch_tokens=100, max_records=3)
    m2, s2, _ = model_predictions(model, ds, hidden, batch_tokens=100_000, max_records=None)
    assert len(m1) == hidden.sum() and np.isfinite(m1).all() and (s1 > 0).all()
    np.testing.assert_allclose(m1, m2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5)
    # the same numbers as the model's own forward pass with those elements as its targets
    batch, _ = masked_batch(ds, np.arange(len(ds)), hidden)
    with torch.no_grad():
        out = model(batch)
    np.testing.assert_allclose(m1, out.mean.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s1, out.log_sigma.exp().numpy(), rtol=1e-4, atol=1e-4)


# --- the flow, end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def physionet_run(tmp_path_factory, samples):
    from datasets.ingest import ingest
    from datasets.store import open_store
    from pipelines.run.training import train

    root = tmp_path_factory.mktemp("evaluate")
    store = str(root / "physionet.zarr")
    ingest("physionet2019", str(samples / "physionet2019"), store)
    s = open_store(store)
    config = RunConfig(model=ModelConfig.preset("tiny"),
                       train=TrainConfig(steps=24, lr=3e-3, warmup_steps=4, batch_tokens=2048, max_records=16,
                                         record_cost=8, log_every=8, eval_every=1000, checkpoint_every=1000,
                                         precision="fp32", threads=1))
    checkpoint = train(config, s.read(), s.channels, root / "run")
    return store, str(checkpoint), root


def test_evaluate_flow_end_to_end(physionet_run):
    from matplotlib.image import imread
    from prefect_runs import flow_run_record

    from datasets.store import open_store
    from perceiver.checkpoint import load
    from pipelines.evaluate import evaluate_flow

    store, checkpoint, root = physionet_run
    out = root / "report"
    state = evaluate_flow(store, checkpoint, str(out), return_state=True)
    summary = state.result()

    md = (out / "evaluation.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in md and f"- `{method}`: " in md  # a row and what it sees
    assert "## Protocol `holdout`" in md and "## Protocol `modality:labs`" in md
    assert "val-split records" in md and "scored on the test split" in md  # where sigma was fitted, scored
    assert "| channel | model | lin. interp. | fwd fill | record mean | channel mean | grad. boost | n |" in md
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["split"] == "test" and summary["split"] == "test"
    rhythms = doc["sub_nyquist_rms"]  # invented rhythms of grid curves, model vs PCHIP, per modality
    assert rhythms["vitals"]["curves"] > 0 and rhythms["vitals"]["model"] >= 0 and rhythms["vitals"]["pchip"] >= 0
    assert "## Invented rhythms (grid curves)" in md
    results = {r["protocol"]: ProtocolResult.from_dict(r) for r in doc["protocols"]}
    assert set(results) == {"holdout", "modality:labs"}
    for r in results.values():
        assert list(r.evidence) == list(METHODS) and "train-split records" in r.evidence["gradient_boost"]
        assert (r.score_split, r.fit_split) == ("test", "val")
        table = r.table()
        assert list(table.index) == list(METHODS) and (table["n"] == r.n_elements).all() and r.n_elements > 0
        assert np.isfinite(table[["mse", "mae", "nll", "coverage68", "coverage95"]].to_numpy()).all()
        assert table.loc["linear_interpolation", "mse_vs_linear"] == pytest.approx(1.0)
    assert set(results["modality:labs"].metrics["model"]["modality"]) == {"labs"}
    assert summary["protocols"]["holdout"]["n_elements"] == results["holdout"].n_elements

    # the holdout protocol hid round(30 %) of every test record, and the baselines' sigma was fitted on val
    st = open_store(store)
    contract = load(checkpoint).config.contract
    test = load_split(st, "test", contract)
    h = split_plan(test, "holdout", seed=0, split="test")
    assert results["holdout"].n_elements == int(h.sum()) == int(np.clip(np.rint(0.3 * test.lengths), 1,
                                                                        test.lengths - 1).sum())
    val = load_split(st, "val", contract)
    hv = split_plan(val, "holdout", seed=0, split="val")
    pred = baseline_predictions(val, hv, train_channel_means(st, contract))["forward_fill"]
    hr = val.channel[hv] == 0
    rms = math.sqrt(np.mean((val.value[hv][hr] - pred[hr]) ** 2))
    assert results["holdout"].baseline_sigma["forward_fill"]["HR"] == pytest.approx(rms, rel=1e-6)

    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"holdout-records.png", "holdout-calibration.png",
                                      "modality-labs-records.png", "modality-labs-calibration.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0

    run, names, mine = flow_run_record(state.state_details.flow_run_id)
    assert run.state.is_completed()
    assert {"plan", "channel-means", "evaluate-holdout", "evaluate-modality:labs", "plots-holdout",
            "report"} <= names
    assert {a.type for a in mine} >= {"markdown", "table", "image"}
    assert {a.key for a in mine} >= {"evaluation-report", "evaluation-summary", "evaluation-holdout-calibration",
                                     "evaluation-modality-labs-records"}
    table = next(a for a in mine if a.type == "table").data
    rows = json.loads(table) if isinstance(table, str) else table
    assert len(rows) == 2 * len(METHODS) and {r["method"] for r in rows} == set(METHODS)


def test_flow_rejects_an_unknown_modality_before_any_work(physionet_run, tmp_path):
    from pipelines.evaluate import evaluate_flow

    store, checkpoint, _ = physionet_run
    with pytest.raises(ValueError, match="no modality 'spectrum'"):
        evaluate_flow(store, checkpoint, str(tmp_path / "x"), protocols=("modality:spectrum",))
    assert not list((tmp_path / "x").glob("*.png"))


def test_evaluate_protocol_on_val_fits_sigma_on_reserved_train_records_and_never_reads_test(physionet_run,
                                                                                           monkeypatch):
    import pipelines.run.evaluation as evaluation
    from datasets.store import open_store
    from pipelines.run.config import load_run

    store, checkpoint, _ = physionet_run
    st = open_store(store)
    model, config = load_run(checkpoint)
    loaded = []

    def spy(store_, split, *args, **kwargs):
        loaded.append(split)
        return load_split(store_, split, *args, **kwargs)

    monkeypatch.setattr(evaluation, "load_split", spy)
    means = train_channel_means(st, model.config.contract)
    r = evaluate_protocol(st, model, config, "holdout", seed=0, means=means, score_split="val",
                          gradient_boost_elements=3000, gradient_boost_params={"max_iter": 30})
    assert "test" not in loaded and (r.score_split, r.fit_split) == ("val", "train")
    table = r.table()
    assert list(table.index) == list(METHODS) and (table["n"] == r.n_elements).all()
    assert np.isfinite(table[["mse", "nll", "coverage95"]].to_numpy()).all()
    assert list(r.evidence) == list(METHODS) and "3,000 hidden elements" in r.evidence["gradient_boost"]
    assert "held out of the gradient-boost fit" in r.sigma_source

    val = load_split(st, "val", model.config.contract)
    assert r.n_elements == int(split_plan(val, "holdout", seed=0, split="val").sum())
    # the baselines' sigma: fitted on the reserved train records' hidden elements only
    train = load_split(st, "train", model.config.contract)
    reserved = reserved_records(len(train), 0)[np.repeat(np.arange(len(train)), train.lengths)]
    plan = split_plan(train, "holdout", seed=0, split="train")
    fit = plan & reserved
    assert r.n_fit_elements == int(fit.sum()) > 0
    pred = baseline_predictions(train, fit, means, visible=~plan)["forward_fill"]
    hr = train.channel[fit] == 0
    rms = math.sqrt(np.mean((train.value[fit][hr] - pred[hr]) ** 2))
    assert r.baseline_sigma["forward_fill"]["HR"] == pytest.approx(rms, rel=1e-6)
    with pytest.raises(ValueError, match="cannot be fitted on the split it is scored on"):
        evaluate_protocol(st, model, config, "holdout", means=means, fit_split="val", score_split="val")


def test_evaluate_flow_and_cli_score_the_val_split(physionet_run, monkeypatch, capsys):
    import pipelines.evaluate as evaluate
    from pipelines import prefect_env
    from pipelines.cli import main

    store, checkpoint, root = physionet_run
    out = root / "report-val"
    summary = evaluate.evaluate_flow(store, checkpoint, str(out), protocols=("holdout",), split="val",
                                     max_records=40, gradient_boost_elements=2000)
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["split"] == "val" == summary["split"]
    (r,) = [ProtocolResult.from_dict(p) for p in doc["protocols"]]
    assert (r.score_split, r.fit_split) == ("val", "train") and r.n_elements > 0
    md = (out / "evaluation.md").read_text()
    assert "Validation split scored" in md and "val-split records" in md and "scored on the val split" in md

    # the command line passes --split through (the flow itself is the one run above)
    calls = []

    def fake_flow(*args, **kwargs):
        calls.append(kwargs)
        return {"markdown": str(out / "evaluation.md")}

    monkeypatch.setattr(evaluate, "evaluate_flow", fake_flow)
    monkeypatch.setattr(prefect_env, "start_api_early", lambda: None)
    assert main(["evaluate", store, "--checkpoint", checkpoint, "--out", str(out), "--split", "val"]) == 0
    assert main(["evaluate", store, "--checkpoint", checkpoint, "--out", str(out)]) == 0
    assert [c["split"] for c in calls] == ["val", "test"]
    with pytest.raises(SystemExit):
        main(["evaluate", store, "--checkpoint", checkpoint, "--out", str(out), "--split", "train"])


def test_a_protocol_that_would_score_nothing_is_an_error_with_the_reason(tmp_path, samples):
    from datasets.ingest import ingest
    from datasets.store import open_store
    from pipelines.run.config import load_run
    from pipelines.run.training import train

    store = str(tmp_path / "plasticc.zarr")
    ingest("plasticc", str(samples / "plasticc"), store)
    s = open_store(store)
    config = RunConfig(model=ModelConfig.preset("tiny"),
                       train=TrainConfig(steps=2, warmup_steps=1, batch_tokens=1024, eval_every=1000,
                                         checkpoint_every=1000, precision="fp32", threads=1))
    model, config = load_run(train(config, s.read(), s.channels, tmp_path / "run"))
    # the first record of each split only: a single element held out and scored is still something...
    assert evaluate_protocol(s, model, config, "holdout", max_records=1).n_elements > 0
    # ...none at all is an error that says why (here: no record of the split is read)
    with pytest.raises(ValueError, match="'modality:photometry' would score nothing .*no test-split record has "
                                         "`photometry` and another modality"):
        evaluate_protocol(s, model, config, "modality:photometry", max_records=0)


def test_a_channel_protocol_hides_one_channel_where_the_record_has_another():
    from pipelines.run.protocols import hidden_elements

    offsets = np.array([0, 4, 6, 8])
    channel = np.array([0, 1, 0, 2, 1, 1, 0, 2])  # record 1 has only channel 1: nothing to predict it from
    modality = np.zeros(8, np.int64)
    hidden = hidden_elements(offsets, modality, np.arange(8.0), "channel:b", ["m"], np.random.default_rng(0),
                             channel, ["a", "b", "c"])
    assert hidden.tolist() == [False, True, False, False, False, False, False, False]
    assert Protocol.parse("channel:lsst_u").name == "channel:lsst_u"
    with pytest.raises(ValueError, match="no channel 'z'"):
        hidden_elements(offsets, modality, np.arange(8.0), "channel:z", ["m"], np.random.default_rng(0), channel,
                        ["a", "b", "c"])


def test_a_split_is_read_window_by_window_and_sampled_beyond_the_budget(physionet_sample_store, tiny_checkpoint):
    """load_split holds the split, not the store: read window by window, the same dataset as gathering its
    records; beyond ``max_elements`` a sample of windows spread over the split (archive-scale evaluation)."""
    from datasets.store import open_store
    from perceiver.checkpoint import load

    st = open_store(physionet_sample_store)
    contract = load(tiny_checkpoint).config.contract
    positions = np.flatnonzero(st.records["split"].astype(str).to_numpy() == "train")
    whole = load_split(st, "train", contract)
    gathered = st.take(positions)
    assert list(whole.elements.records["record_id"]) == list(gathered.records["record_id"])
    np.testing.assert_array_equal(whole.value, load_split(st, "train", contract, max_records=len(positions)).value)
    sample = load_split(st, "train", contract, max_elements=whole.n_elements // 5)
    ids = set(sample.elements.records["record_id"])
    assert ids < set(gathered.records["record_id"]) and 0 < sample.n_elements < whole.n_elements // 2
    first, last = gathered.records["record_id"].iloc[0], gathered.records["record_id"].iloc[-1]
    assert first in ids and last in ids  # windows from the start to the end of the split
