"""The ``train`` Prefect flow: a store and a config -> a checkpoint directory.

One coarse task trains (:func:`pipelines.run.training.train`: AdamW, warm-up + cosine, exact resume) and writes
``config.json``, ``model.safetensors``, ``training_state.pt`` and ``metrics.jsonl`` into ``out_dir``. Re-running
the flow on the same ``out_dir`` resumes from its own checkpoint. ``nproc`` > 1 launches ``torchrun`` as a
subprocess for multi-process DDP (gloo on CPU, nccl on GPU). A Markdown artifact reports the final losses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from datasets.store import open_store
from perceiver.config import ModelConfig
from pipelines.run.config import RunConfig, apply_overrides


def build_config(preset: str = "small", steps: int | None = None, overrides: list[str] | None = None,
                 config_path: str | None = None, head: str | None = None) -> RunConfig:
    """A RunConfig from a JSON file, or a model preset, then the output ``head`` (a name registered in
    :data:`perceiver.heads.HEADS`) and ``section.field=value`` overrides."""
    config = RunConfig.from_json(config_path) if config_path else RunConfig(model=ModelConfig.preset(preset))
    if steps is not None:
        config.train.steps = steps
    return apply_overrides(config, ([f"model.head.name={head}"] if head else []) + list(overrides or []))


@task(name="train", task_run_name="train")
def train_task(store: str, out_dir: str, config_json: str, nproc: int, resume: bool) -> str:
    logger = get_run_logger()
    config = RunConfig.from_json(config_json)
    if nproc <= 1:
        from pipelines.run.training import train

        s = open_store(store)
        last = {"t": time.perf_counter()}

        def progress(record: dict) -> None:
            if time.perf_counter() - last["t"] > 10 or record["step"] == config.train.steps:
                logger.info("step %d/%d loss %.4f", record["step"], config.train.steps, record["loss"])
                last["t"] = time.perf_counter()

        return str(train(config, s, s.channels, out_dir, resume=resume, on_step=progress))
    os.makedirs(out_dir, exist_ok=True)
    cfg_path = Path(out_dir) / "requested_config.json"
    cfg_path.write_text(config_json)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipelines.run.training", "--store", store, "--out", out_dir, "--config", str(cfg_path)]
    cmd += [] if resume else ["--no-resume"]
    logger.info("launching %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out_dir


@flow(name="train", log_prints=True)
def train_flow(store: str, out_dir: str, preset: str = "small", steps: int | None = None,
               overrides: list[str] | None = None, config_path: str | None = None, nproc: int = 1,
               resume: bool = True, head: str | None = None, device: str | None = None) -> dict:
    """Train on the train split of ``store`` into ``out_dir`` (resuming where it holds a checkpoint);
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) overrides the config's ``train.device``."""
    from perceiver.checkpoint import read_metrics
    from pipelines.run.devices import resolve_device

    t0 = time.perf_counter()
    config = build_config(preset, steps, overrides, config_path, head)
    if device is not None:
        resolve_device(device)  # a GPU asked for where there is none fails before any work
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
    path = train_task(store, out_dir, config.to_json(), nproc, resume)
    metrics = read_metrics(path)
    train_rows = [m for m in metrics if m.get("split") == "train"]
    val_rows = [m for m in metrics if m.get("split") == "val"]
    summary = {"checkpoint": path, "steps": train_rows[-1]["step"] if train_rows else 0,
               "train_loss": train_rows[-1].get("loss") if train_rows else None,
               "val": (val_rows[-1].get("overall") if val_rows else None),
               "seconds": round(time.perf_counter() - t0, 1)}
    create_markdown_artifact(f"## Training → `{path}`\n\n```json\n{json.dumps(summary, indent=1, default=str)}\n```",
                             key="train-report")
    return summary
