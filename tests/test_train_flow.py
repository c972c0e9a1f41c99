"""The train flow: in-process and as 2 torchrun processes (DDP over gloo), resuming its own checkpoint."""

from __future__ import annotations

from pathlib import Path

from perceiver.checkpoint import load, read_metrics
from pipelines.run.config import load_run
from pipelines.train import train_flow

TINY = ["train.warmup_steps=1", "train.log_every=2", "train.eval_every=4", "train.eval_batches=1",
        "train.checkpoint_every=2", "train.batch_tokens=2048", "train.precision=fp32"]


def test_train_flow_resumes_its_checkpoint(tmp_path, physionet_sample_store):
    out = str(tmp_path / "ckpt")
    first = train_flow(physionet_sample_store, out, preset="tiny", steps=4, overrides=TINY)
    assert first["steps"] == 4 and Path(out, "model.safetensors").exists()
    second = train_flow(physionet_sample_store, out, preset="tiny", steps=6, overrides=TINY)
    assert second["steps"] == 6
    steps = [m["step"] for m in read_metrics(out) if m.get("split") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # continued, not restarted
    model, config = load_run(out)
    assert config.train.steps == 6 and config.model.n_channels == 39


def test_train_flow_with_two_torchrun_processes(tmp_path, physionet_sample_store):
    out = str(tmp_path / "ddp")
    summary = train_flow(physionet_sample_store, out, preset="tiny", steps=4, overrides=TINY, nproc=2)
    assert summary["steps"] == 4 and summary["train_loss"] is not None
    model = load(out)
    assert sum(p.numel() for p in model.parameters()) > 0
