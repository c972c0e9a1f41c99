"""Training on several machines: torchrun's c10d rendezvous, two launches on this machine playing two nodes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.train import check_launch, default_rdzv_id, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.threads=1", "train.batch_tokens=2048", "train.warmup_steps=1", "train.log_every=2",
         "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=4", "train.precision=fp32"]


def test_one_node_command_is_unchanged():
    cmd = torchrun_command("s.zarr", "runs/a", "runs/a/requested_config.json", 2, resume=False)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "pipelines.run.training", "--store", "s.zarr", "--out", "runs/a",
                   "--config", "runs/a/requested_config.json", "--no-resume"]


def test_several_nodes_use_a_c10d_rendezvous_hosted_by_node_0():
    node = {r: torchrun_command("s.zarr", "/shared/runs/exp-1/", "c.json", 4, nnodes=2, node_rank=r,
                                rdzv_endpoint="10.0.0.1:29400") for r in (0, 1)}
    for r, cmd in node.items():
        assert "--standalone" not in cmd
        assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400",
                "--rdzv_id=percival-exp-1", f"--rdzv_conf=is_host={int(r == 0)}"} <= set(cmd)
    assert default_rdzv_id("/mnt/a/runs/exp 1") == default_rdzv_id("/other/mount/runs/exp 1") == "percival-exp-1"
    assert "--rdzv_id=mine" in torchrun_command("s", "o", "c", 1, nnodes=2, rdzv_endpoint="h:1", rdzv_id="mine")


@pytest.mark.parametrize("kwargs, words", [
    (dict(nnodes=2), ["--nnodes 2", "--rdzv-endpoint"]),
    (dict(nnodes=2, node_rank=2, rdzv_endpoint="h:29400"), ["--node-rank", "0..1"]),
    (dict(nnodes=2, rdzv_endpoint="h"), ["--rdzv-endpoint", "HOST:PORT"]),
    (dict(nproc=0), ["--nproc"]),
])
def test_a_launch_that_cannot_join_up_is_a_value_error_naming_the_flags(kwargs, words):
    with pytest.raises(ValueError) as e:
        check_launch(**kwargs)
    assert all(w in str(e.value) for w in words)


@pytest.mark.parametrize("prefect", [[], ["--no-prefect"]])
def test_cli_says_which_flag_is_missing_before_any_work(tmp_path, capsys, prefect):
    from pipelines.cli import main

    out = tmp_path / "out"
    assert main(["train", "store.zarr", "--out", str(out), "--nnodes", "2", *prefect]) == 2
    err = capsys.readouterr().err
    assert "--rdzv-endpoint HOST:PORT" in err and "Traceback" not in err and not out.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launches_on_this_machine_train_as_two_nodes(tmp_path, physionet_sample_store):
    """Node 0 runs the Prefect flow (its own Prefect home), node 1 the plain path (``--no-prefect``): one
    process each, one rendezvous; rank 0 writes the checkpoint into the shared ``--out``."""
    out, port = tmp_path / "ckpt", _free_port()
    args = [sys.executable, "-m", "pipelines.cli", "train", physionet_sample_store, "--out", str(out),
            "--steps", "4", "--preset", "tiny", "--nproc", "1", "--nnodes", "2",
            "--rdzv-endpoint", f"127.0.0.1:{port}", *[a for kv in QUICK for a in ("--set", kv)]]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-node0"), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(args + ["--node-rank", "0"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen(args + ["--node-rank", "1", "--no-prefect"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    try:
        done = [(p.wait(timeout=240), *p.communicate()) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for rank, (rc, _, err) in enumerate(done):
        assert rc == 0, f"node {rank}: {err[-3000:]}"
    assert (out / "model.safetensors").exists()
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 4
    assert '"steps": 4' in done[0][1] and '"steps": 4' in done[1][1]
