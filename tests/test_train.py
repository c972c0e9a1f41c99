"""pipelines.run.training: a short run, checkpoints, exact resume after a crash, 2-process DDP under torchrun.

This file doubles as the DDP worker: ``torchrun ... tests/test_train.py OUT`` trains on every rank and dumps
each rank's final parameters so the test can compare them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from datasets.loader.synthetic import synthetic_elements
from perceiver import checkpoint
from perceiver.config import ModelConfig
from pipelines.run.config import RunConfig, TrainConfig, apply_overrides, load_run
from pipelines.run.devices import resolve_precision
from pipelines.run.inference import predict
from pipelines.run.training import Trainer, lr_factor, main, train

ROOT = Path(__file__).resolve().parents[1]


def small_run(steps: int = 8, **train_overrides) -> RunConfig:
    tc = dict(steps=steps, lr=3e-3, warmup_steps=2, batch_tokens=600, max_records=16, record_cost=8,
              log_every=1, eval_every=4, eval_batches=2, checkpoint_every=3, precision="fp32", threads=1)
    tc.update(train_overrides)
    return RunConfig(model=ModelConfig.preset("tiny"), train=TrainConfig(**tc))


@pytest.fixture(scope="module")
def data():
    return synthetic_elements(n_records=60, seed=7)


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in checkpoint.read_metrics(out) if r["split"] == "train"}


def test_train_writes_a_loadable_checkpoint(tmp_path, data):
    elements, channels = data
    out = train(small_run(steps=6), elements, channels, tmp_path / "run")
    for name in ("config.json", "model.safetensors", "training_state.pt", "metrics.jsonl"):
        assert (out / name).exists()
    model, config = load_run(out)
    assert config.train.steps == 6 and config.model.channel_names == list(channels["name"])
    contract = config.model.contract
    assert contract.time_max_period > contract.time_min_period > 0 and contract.complete  # data contract stored
    assert [c.location for c in contract.channels] == channels["location"].tolist()
    records = checkpoint.read_metrics(out)
    assert sorted(train_losses(out)) == list(range(1, 7))
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [4, 6]
    assert {"mse", "mae", "nll", "coverage68", "coverage95"} <= set(val[-1]["overall"])
    assert set(val[-1]["modality"]) <= set(config.model.modalities) and val[-1]["channel"]
    from datasets.loader import ElementDataset

    ds = ElementDataset(elements, channels, model.config.contract, split="test")
    pred = predict(model, ds.collate([0, 1]))
    assert torch.isfinite(pred.mean).all() and pred.latent.shape == (2, config.model.sizes.d_latent)


def test_checkpoint_selection_ignores_one_extreme_validation_value(tmp_path, data):
    """The validation score that selects the published weights (per-channel median |error|) picks the same step
    when one scored validation value is absurd, while the validation MSE is swamped by it."""
    import dataclasses

    from datasets.loader import token_batches
    from pipelines.run.training import EVAL_EPOCH

    elements, channels = data
    config = small_run(steps=12, eval_every=2, select_best=True)
    trainer = Trainer(config, elements, channels, tmp_path / "probe", resume=False)
    tc, ds = trainer.config.train, trainer.val_ds
    first = token_batches(ds.lengths, tc.batch_tokens, tc.max_records, shuffle=True, seed=tc.seed,
                          epoch=EVAL_EPOCH, record_cost=tc.record_cost, max_elements=tc.max_record_elements)[0]
    batch = ds.collate(first, trainer.config.masking, np.random.default_rng([tc.seed, EVAL_EPOCH, 0]),
                       tc.max_record_elements)
    victim = int(batch.element_index[batch.target][0])  # an element every evaluation scores
    value = elements.value.copy()
    value[victim] = 1e6
    spoiled = dataclasses.replace(elements, value=value)

    runs = {}
    for name, es in (("clean", elements), ("spoiled", spoiled)):
        out = train(config, es, channels, tmp_path / name)
        val = [r for r in checkpoint.read_metrics(out) if r["split"] == "val"]
        runs[name] = (val[-1]["best_step"], [r["overall"]["mse"] for r in val],
                      load_file(out / "model.safetensors"), load_file(out / "best.safetensors"))
        assert set(val[-1]["selection"]["modality"]) <= set(trainer.config.model.modalities)
    (clean_step, clean_mse, clean_published, clean_best), (spoiled_step, spoiled_mse, *_) = runs.values()
    assert min(spoiled_mse) > 1000 * max(clean_mse)  # the absurd value was scored every time
    assert spoiled_step == clean_step and 0 < clean_step <= 12
    assert all(torch.equal(clean_published[k], clean_best[k]) for k in clean_best)  # the selected weights


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, data):
    elements, channels = data
    out = train(small_run(steps=40, eval_every=1, lr=0.0, warmup_steps=1, early_stop_patience=2), elements,
                channels, tmp_path / "run")
    val = [r["step"] for r in checkpoint.read_metrics(out) if r["split"] == "val"]
    # lr 0: nothing improves after the first evaluation, so the run stops two evaluations later
    assert val == [1, 2, 3] and checkpoint.load_training_state(out)["step"] == 3


class Crash(Exception):
    pass


def crash_at(step: int):
    """An ``on_step`` callback that crashes the run after ``step``."""
    def on_step(info: dict) -> None:
        if info["step"] == step:
            raise Crash

    return on_step


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, data):
    elements, channels = data
    config = small_run(steps=8)
    straight = train(config, elements, channels, tmp_path / "straight")

    with pytest.raises(Crash):
        train(config, elements, channels, tmp_path / "resumed", on_step=crash_at(5))
    state = checkpoint.load_training_state(tmp_path / "resumed")
    assert state["step"] == 3  # the last checkpoint before the crash
    assert max(train_losses(tmp_path / "resumed")) == 5  # steps 4, 5 were logged, then lost
    resumed = train(config, elements, channels, tmp_path / "resumed", resume=True)

    assert train_losses(resumed) == train_losses(straight)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = checkpoint.load_training_state(straight), checkpoint.load_training_state(resumed)
    assert (sa["epoch"], sa["batch_in_epoch"]) == (sb["epoch"], sb["batch_in_epoch"])
    # a finished run resumed again does nothing more
    again = train(config, elements, channels, tmp_path / "resumed", resume=True)
    assert train_losses(again) == train_losses(straight)


def test_a_train_split_larger_than_a_block_streams_and_resumes_exactly(tmp_path, data):
    """train.block_elements below the split's size: the trainer holds one block at a time, reads blocks as
    the plan reaches them, and a crashed run resumed equals an uninterrupted one."""
    elements, channels = data
    config = small_run(steps=10, block_elements=1500)
    trainer = Trainer(config, elements, channels, tmp_path / "probe", resume=False)
    assert not trainer.blocks.in_memory and trainer.blocks.n_blocks >= 3 and trainer.train_ds is None
    trainer.next_batch()
    held = trainer.train_ds.elements.n_elements
    assert 0 < held < trainer.blocks.n_elements / 2  # one block in memory, not the split
    straight = train(config, elements, channels, tmp_path / "straight")

    with pytest.raises(Crash):
        train(config, elements, channels, tmp_path / "resumed", on_step=crash_at(7))
    resumed = train(config, elements, channels, tmp_path / "resumed", resume=True)
    assert train_losses(resumed) == train_losses(straight) and len(train_losses(straight)) == 10
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_and_precision():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_precision("fp8", torch.device("cpu"))


def test_overrides_by_section_or_flat_name_and_the_head():
    config = apply_overrides(RunConfig(), ["train.steps=3", "model.n_latents=8", "model.decoder.local_heads=0",
                                           "model.decoder_local_time=2", "model.head=gaussian",
                                           "model.head.nll_beta=0", "masking.holdout=0.5"])
    assert config.train.steps == 3 and config.model.sizes.n_latents == 8 and config.model.decoder.local_heads == 0
    assert config.model.decoder.local_time == 2 and config.model.head.nll_beta == 0
    assert config.masking.holdout == 0.5
    for bad in ("train.nonsense=1", "model.nonsense=1", "steps=3", "train.steps"):
        with pytest.raises(ValueError):
            apply_overrides(RunConfig(), [bad])


def test_torchrun_entry_point_trains_on_a_store(tmp_path, physionet_sample_store):
    out = tmp_path / "cli"
    config = apply_overrides(small_run(steps=3), ["train.batch_tokens=800"])
    (tmp_path / "config.json").write_text(config.to_json())
    main(["--store", physionet_sample_store, "--out", str(out), "--config", str(tmp_path / "config.json")])
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["model"]["sizes"]["n_latents"] == 8
    assert max(train_losses(out)) == 3


# --- DDP ---------------------------------------------------------------------------------------------------

def _ddp_worker(out: str, block_elements: int) -> None:
    """Run under torchrun: train, then dump this rank's parameters."""
    elements, channels = synthetic_elements(n_records=60, seed=7)
    trainer = Trainer(small_run(steps=4, eval_every=100, block_elements=block_elements), elements, channels, out)
    trainer.run()
    state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{trainer.dist.rank}.safetensors"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("block_elements", [1 << 22, 1500], ids=["in-memory", "blocks"])
def test_two_process_ddp_gives_identical_parameters(tmp_path, block_elements):
    """Both ranks end with the same parameters, whether each holds the whole split or reads its own blocks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__)), str(tmp_path), str(block_elements)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # the ranks trained (parameters moved from the shared initialisation) and rank 0 wrote the checkpoint
    published = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(published[k], r0[k]) for k in r0)
    state = checkpoint.load_training_state(tmp_path)
    assert state["step"] == 4 and state["world_size"] == 2
    losses = train_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    torch.manual_seed(0)
    from perceiver.model import Percival

    init = Percival(checkpoint.load(tmp_path).config).state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1], int(sys.argv[2]))
