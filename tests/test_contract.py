"""The checkpoint's data contract, the torch-only model core, the output-head slot, old checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.loader import ContractError, ElementDataset, match_channels
from datasets.normalise import channel_statistics
from perceiver import checkpoint
from perceiver.config import ModelConfig
from perceiver.heads import HEADS, HeadOutput, OutputHead, register_head
from pipelines.run.config import RunConfig, TrainConfig, apply_overrides, load_run
from pipelines.run.reconstruction import reconstruct
from pipelines.run.training import train

ROOT = Path(__file__).resolve().parents[1]
OLD_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-v1"
TINY_TRAIN = dict(steps=8, warmup_steps=2, log_every=4, eval_every=100, checkpoint_every=100, batch_tokens=2048,
                  precision="fp32", threads=1)


def reconstructed_means(model, store, record_ids) -> np.ndarray:
    """In-sample reconstruction means (physical units) of the given records, in their element order."""
    elements = store.select(record_ids)
    return reconstruct(model, elements, store.channels, folds=0).mean


def test_a_model_sees_the_numbers_it_was_trained_on_after_the_store_grows(tmp_path, samples):
    """Ingest set A, train, reconstruct; ingest set B into the same store (its statistics change); the set-A
    reconstructions do not change."""
    from datasets.ingest import ingest
    from datasets.store import open_store

    store_url = str(tmp_path / "physionet.zarr")
    ingest("physionet2019", str(samples / "physionet2019" / "training_setA_sample.zip"), store_url)
    first = open_store(store_url)
    out = train(RunConfig(model=ModelConfig.preset("tiny"), train=TrainConfig(**TINY_TRAIN)), first.read(),
                first.channels, tmp_path / "model")
    model = checkpoint.load(out)
    ids = first.records["record_id"].astype(str).tolist()[:40]
    before = reconstructed_means(model, first, ids)

    ingest("physionet2019", str(samples / "physionet2019" / "training_setB_sample.zip"), store_url)
    grown = open_store(store_url)
    assert grown.n_records > first.n_records
    old, new = first.channels.set_index("name"), grown.channels.set_index("name")
    assert not np.allclose(old["location"], new["location"]) or not np.allclose(old["scale"], new["scale"])
    after = reconstructed_means(checkpoint.load(out), grown, ids)
    finite = np.isfinite(before)
    assert finite.mean() > 0.9 and np.array_equal(finite, np.isfinite(after))
    rel = np.abs(after[finite] - before[finite]) / np.maximum(np.abs(before[finite]), 1e-6)
    assert rel.max() <= 1e-4


def test_a_store_that_breaks_the_contract_names_the_channel(tiny_checkpoint, physionet_sample_store):
    from datasets.store import open_store

    contract = checkpoint.load(tiny_checkpoint).config.contract
    channels = open_store(physionet_sample_store).channels
    assert (match_channels(contract, channels) == np.arange(len(channels))).all()
    with pytest.raises(ContractError, match="'Lactate'"):
        match_channels(contract, channels[channels["name"] != "Lactate"].reset_index(drop=True))
    changed = channels.copy()
    changed.loc[changed["name"] == "Glucose", "unit"] = "mmol/L"
    with pytest.raises(ContractError, match="'Glucose' is in 'mmol/L'"):
        match_channels(contract, changed)


def test_extra_store_channels_are_ignored_with_a_warning(tiny_checkpoint, physionet_sample_store):
    from datasets.store import open_store

    model = checkpoint.load(tiny_checkpoint)
    store = open_store(physionet_sample_store)
    elements = store.read(0, 5)
    # the store's channel 0 renamed: the contract lacks it (and lacks nothing else but its own channel 0)
    contract = model.config.contract
    renamed = store.channels.copy()
    renamed.loc[0, "name"] = "NewVital"
    narrowed = type(contract)(**{**contract.__dict__, "channels": contract.channels[1:]})
    with pytest.warns(UserWarning, match="NewVital"):
        ds = ElementDataset(elements, renamed, narrowed)
    kept = int((elements.channel != 0).sum())
    assert ds.n_elements == kept and ds.channels["name"].tolist() == contract.channel_names[1:]
    assert (ds.store_channel == np.arange(1, len(renamed))).all()


def test_old_checkpoints_load_and_predict_exactly_as_before(tmp_path, samples):
    """A checkpoint written before sections and contracts (version 1; tests/data/checkpoint-v1, written by
    commit ac93f57 with the PhysioNet set-A sample) loads, and predicts bit for bit what it predicted then;
    its missing normalisation statistics come from the store, with a warning."""
    from datasets.ingest import ingest
    from datasets.store import open_store

    assert json.loads((OLD_CHECKPOINT / "config.json").read_text())["version"] == 1
    url = str(tmp_path / "a.zarr")
    ingest("physionet2019", str(samples / "physionet2019" / "training_setA_sample.zip"), url)
    store = open_store(url)
    model, config = load_run(OLD_CHECKPOINT)
    assert not model.config.contract.complete and config.model.head.nll_beta == 0.5
    assert model.config.sizes.d_latent == 32 and model.config.decoder.local_heads == 4
    # such a checkpoint normalises with the store's current statistics; the store's of then had no bounds
    # (bounded transforms came later), so recompute them as they were: unbounded
    elements = store.read()
    then = store.channels.assign(valid_min=np.nan, valid_max=np.nan)
    train = np.repeat(elements.records["split"].to_numpy() == "train", elements.row_size)
    stats = channel_statistics(elements.channel, elements.value, elements.error, then, train)
    then[stats.columns] = stats
    with pytest.warns(UserWarning, match="predates data contracts"):
        ds = ElementDataset(elements, then, model.config.contract)
    expected = np.load(OLD_CHECKPOINT / "expected.npz")
    assert ds.elements.records["record_id"].astype(str).tolist()[:8] == expected["record_id"].tolist()
    with torch.no_grad():
        out = model(ds.collate(np.arange(8)))
    assert np.array_equal(out.mean.numpy(), expected["mean"])
    assert np.array_equal(out.log_sigma.numpy(), expected["log_sigma"])
    # saved again, it is a version-2 checkpoint that round-trips
    checkpoint.save(tmp_path / "v2", model, config.sections())
    again, config2 = load_run(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["version"] == checkpoint.CONFIG_VERSION
    assert config2 == config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_the_model_core_imports_without_the_rest_of_the_house():
    """`import perceiver` needs torch, numpy and safetensors only; a forward pass runs on a hand-built
    packed batch."""
    blocked = ("xarray", "zarr", "pandas", "matplotlib", "prefect", "dask", "datasets", "pipelines", "sklearn")
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch, perceiver
assert {{'Percival', 'ModelConfig', 'PackedBatch', 'DataContract'}} <= set(perceiver.__all__)
contract = perceiver.DataContract(channels=[perceiver.ChannelSpec('HR', 'vitals', 'bpm'),
                                            perceiver.ChannelSpec('Lactate', 'labs', 'mmol/L')],
                                  modalities=['vitals', 'labs'])
torch.manual_seed(0)
model = perceiver.Percival(perceiver.ModelConfig.preset('tiny', contract=contract))
batch = perceiver.PackedBatch.from_elements(time=torch.tensor([0., 1., 2., 0.5, 3.]),
                                            channel=torch.tensor([0, 1, 0, 0, 1]), value=torch.randn(5),
                                            counts=[3, 2], visible=torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool),
                                            target=torch.tensor([0, 1, 0, 0, 1], dtype=torch.bool))
out = model(batch)
model.loss(batch, out).backward()
assert out.mean.shape == (2,) and torch.isfinite(out.log_sigma).all()
loaded = [m for m in sys.modules if m.split('.')[0] in {blocked!r}]
assert not loaded, loaded
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


class MedianHead(OutputHead):
    """A toy head: a point prediction trained by absolute error, with a fixed scale."""

    def __init__(self, config, d_query: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_query, 1)
        self.log_scale = float(np.log(config.options.get("scale", 1.0)))

    def forward(self, h: torch.Tensor) -> HeadOutput:
        mean = self.proj(h).float()[:, 0]
        return HeadOutput(mean, torch.full_like(mean, self.log_scale))

    def loss(self, output: HeadOutput, value: torch.Tensor, error: torch.Tensor, offsets: torch.Tensor
             ) -> torch.Tensor:
        return (output.mean - value.float()).abs().mean()


def test_a_new_output_head_is_one_class_and_one_registry_line(tmp_path, physionet_sample_store):
    from datasets.store import open_store

    register_head("median", MedianHead)
    try:
        store = open_store(physionet_sample_store)
        config = apply_overrides(RunConfig(model=ModelConfig.preset("tiny"), train=TrainConfig(**TINY_TRAIN)),
                                 ["model.head=median", "model.head.options={\"scale\": 0.5}"])
        out = train(config, store.read(), store.channels, tmp_path / "median")
        losses = [m["loss"] for m in checkpoint.read_metrics(out) if m["split"] == "train"]
        assert len(losses) == 2 and all(np.isfinite(losses))
        model, saved = load_run(out)
        assert isinstance(model.head, MedianHead) and saved.model.head.name == "median"
        r = reconstruct(model, store.read(0, 3), store.channels, folds=0)
        assert np.isfinite(r.mean_normalised).all() and np.allclose(r.sigma_normalised, 0.5)
    finally:
        HEADS.pop("median", None)
    with pytest.raises(ValueError, match="unknown output head 'median'"):
        checkpoint.load(out)


def test_unknown_fields_and_heads_are_refused():
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"nonsense": 1})
    with pytest.raises(ValueError, match="unknown output head"):
        from perceiver import DataContract, Percival
        from perceiver.contract import ChannelSpec

        contract = DataContract(channels=[ChannelSpec("a", "m")], modalities=["m"])
        Percival(ModelConfig.preset("tiny", contract=contract, head={"name": "nope"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
