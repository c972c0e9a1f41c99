"""The ``train`` Prefect flow: a store and a config -> a checkpoint directory.

One coarse task trains (:func:`pipelines.run.training.train`: AdamW, warm-up + cosine, exact resume) and writes
``config.json``, ``model.safetensors``, ``training_state.pt`` and ``metrics.jsonl`` into ``out_dir``. Re-running
the flow on the same ``out_dir`` resumes from its own checkpoint. ``nproc`` > 1 launches ``torchrun`` as a
subprocess for multi-process DDP (gloo on CPU, nccl on GPU). A Markdown artifact reports the final losses.

Several machines: run the same flow (or ``percival train``) on every node with ``nnodes``, this node's
``node_rank`` and one ``rdzv_endpoint`` ``HOST:PORT`` (torchrun's c10d rendezvous, hosted by the node with
``node_rank`` 0 on ``HOST``); ``rdzv_id`` defaults to one derived from ``out_dir``'s name, so the nodes of one run
agree. :func:`train_local` is the same work without Prefect (``percival train --no-prefect``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from datasets.store import open_store
from perceiver.config import ModelConfig
from pipelines.progress import progress
from pipelines.run.config import RunConfig, apply_overrides

log = logging.getLogger("pipelines.train")


def build_config(preset: str = "small", steps: int | None = None, overrides: list[str] | None = None,
                 config_path: str | None = None, head: str | None = None) -> RunConfig:
    """A RunConfig from a JSON file, or a model preset, then the output ``head`` (a name registered in
    :data:`perceiver.heads.HEADS`) and ``section.field=value`` overrides."""
    config = RunConfig.from_json(config_path) if config_path else RunConfig(model=ModelConfig.preset(preset))
    if steps is not None:
        config.train.steps = steps
    return apply_overrides(config, ([f"model.head.name={head}"] if head else []) + list(overrides or []))


def check_launch(nproc: int = 1, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> None:
    """Raise ValueError, naming the flags, for a launch torchrun could not join up."""
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc and --nnodes must be at least 1, got --nproc {nproc} --nnodes {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the rendezvous, hosted by the "
                         "node started with --node-rank 0 on HOST); every node passes the same one")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank must be 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}")
    if rdzv_endpoint:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--rdzv-endpoint must be HOST:PORT (e.g. 10.0.0.1:29400), got {rdzv_endpoint!r}")


def default_rdzv_id(out_dir: str) -> str:
    """The rendezvous id of a run: ``percival-`` and the name of its checkpoint directory (the same on every
    node even where shared storage is mounted at different paths)."""
    name = Path(os.path.normpath(out_dir)).name or "run"
    return "percival-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def torchrun_command(store: str, out_dir: str, config_path: str, nproc: int, resume: bool = True,
                     nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                     rdzv_id: str | None = None) -> list[str]:
    """The ``torchrun`` command line of one node: ``--standalone`` on one machine without an endpoint, else
    the c10d rendezvous at ``rdzv_endpoint`` (hosted by ``node_rank`` 0: ``is_host`` is set, not guessed)."""
    check_launch(nproc, nnodes, node_rank, rdzv_endpoint)
    if rdzv_endpoint is None:
        launch = ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        launch = [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id or default_rdzv_id(out_dir)}",
                  f"--rdzv_conf=is_host={int(node_rank == 0)}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch,
           "-m", "pipelines.run.training", "--store", store, "--out", out_dir, "--config", config_path]
    return cmd + ([] if resume else ["--no-resume"])


def run_training(store: str, out_dir: str, config_json: str, nproc: int, resume: bool, logger: Any,
                 nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                 rdzv_id: str | None = None) -> str:
    """Train in this process (one process, one node), or launch this node's torchrun and wait for it."""
    config = RunConfig.from_json(config_json)
    if nproc <= 1 and nnodes <= 1 and rdzv_endpoint is None:
        from pipelines.run.training import train

        s = open_store(store)
        bar = None

        def on_step(record: dict) -> None:
            nonlocal bar
            if bar is None:  # at the first step run: a resumed run starts where its checkpoint ended
                bar = progress(config.train.steps, "step", "train", logger, initial=record["step"] - 1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            bar.update(1)

        try:
            return str(train(config, s, s.channels, out_dir, resume=resume, on_step=on_step))
        finally:
            if bar is not None:
                bar.close()
    os.makedirs(out_dir, exist_ok=True)
    cfg_path = Path(out_dir) / "requested_config.json"
    if rdzv_endpoint is None:
        cfg_path.write_text(config_json)
    else:  # the nodes may share out_dir: no node reads another's half-written file
        from perceiver.checkpoint import atomic_write_text

        cfg_path = cfg_path.with_name(f"requested_config.node{node_rank}.json")
        atomic_write_text(cfg_path, config_json)
    cmd = torchrun_command(store, out_dir, str(cfg_path), nproc, resume, nnodes, node_rank, rdzv_endpoint, rdzv_id)
    logger.info("launching %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out_dir


@task(name="train", task_run_name="train")
def train_task(store: str, out_dir: str, config_json: str, nproc: int, resume: bool, nnodes: int = 1,
               node_rank: int = 0, rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> str:
    return run_training(store, out_dir, config_json, nproc, resume, get_run_logger(), nnodes, node_rank,
                        rdzv_endpoint, rdzv_id)


def _config(preset: str, steps: int | None, overrides: list[str] | None, config_path: str | None,
            head: str | None, device: str | None) -> RunConfig:
    from pipelines.run.devices import resolve_device

    config = build_config(preset, steps, overrides, config_path, head)
    if device is not None:
        resolve_device(device)  # a GPU asked for where there is none fails before any work
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
    return config


def _summary(path: str, t0: float) -> dict:
    """Final step, training loss and validation metrics from ``metrics.jsonl`` (empty on a node whose
    ``out_dir`` rank 0 does not write)."""
    from perceiver.checkpoint import read_metrics

    metrics = read_metrics(path)
    train_rows = [m for m in metrics if m.get("split") == "train"]
    val_rows = [m for m in metrics if m.get("split") == "val"]
    return {"checkpoint": path, "steps": train_rows[-1]["step"] if train_rows else 0,
            "train_loss": train_rows[-1].get("loss") if train_rows else None,
            "val": (val_rows[-1].get("overall") if val_rows else None),
            "seconds": round(time.perf_counter() - t0, 1)}


@flow(name="train", log_prints=True)
def train_flow(store: str, out_dir: str, preset: str = "small", steps: int | None = None,
               overrides: list[str] | None = None, config_path: str | None = None, nproc: int = 1,
               resume: bool = True, head: str | None = None, device: str | None = None, nnodes: int = 1,
               node_rank: int = 0, rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> dict:
    """Train on the train split of ``store`` into ``out_dir`` (resuming where it holds a checkpoint);
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) overrides the config's ``train.device``; ``nnodes`` > 1:
    this node's part of a several-machine run (``node_rank``, ``rdzv_endpoint`` HOST:PORT, ``rdzv_id``)."""
    t0 = time.perf_counter()
    check_launch(nproc, nnodes, node_rank, rdzv_endpoint)
    config = _config(preset, steps, overrides, config_path, head, device)
    path = train_task(store, out_dir, config.to_json(), nproc, resume, nnodes, node_rank, rdzv_endpoint, rdzv_id)
    summary = _summary(path, t0)
    create_markdown_artifact(f"## Training → `{path}`\n\n```json\n{json.dumps(summary, indent=1, default=str)}\n```",
                             key="train-report")
    return summary


def train_local(store: str, out_dir: str, preset: str = "small", steps: int | None = None,
                overrides: list[str] | None = None, config_path: str | None = None, nproc: int = 1,
                resume: bool = True, head: str | None = None, device: str | None = None, nnodes: int = 1,
                node_rank: int = 0, rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> dict:
    """:func:`train_flow`'s work without Prefect (no API server, no artifact): ``percival train --no-prefect``."""
    t0 = time.perf_counter()
    check_launch(nproc, nnodes, node_rank, rdzv_endpoint)
    config = _config(preset, steps, overrides, config_path, head, device)
    path = run_training(store, out_dir, config.to_json(), nproc, resume, log, nnodes, node_rank, rdzv_endpoint,
                        rdzv_id)
    return _summary(path, t0)
