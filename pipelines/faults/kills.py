"""kill -9 at random moments of an ingest, a reconstruct flow and a training run; the re-run (or resume) must
equal an uninterrupted run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from pipelines.faults.harness import PHYSIONET, Row, consistent, run_and_kill, timed_run

# -- kill -9 during ingest -----------------------------------------------------------------------------
INGEST_SCRIPT = """
import sys
from datasets.ingest import ingest
print("go", flush=True)
ingest("physionet2019", sys.argv[1], sys.argv[2], shard_size=10)
"""


def kill_ingest(work: Path, moments: int, seed: int, store_root: str | None = None) -> list[Row]:
    """SIGKILL a plain ingest (30 commits + statistics) at ``moments`` random moments; a reader thread opens
    the store throughout; re-run; compare with an uninterrupted local run. The stores are made under
    ``store_root`` (an object-store URL such as ``s3://bucket/prefix``; default: ``work``)."""
    from datasets.ingest import ingest
    from datasets.store import StoreError, open_store

    ref = str(work / "ingest-ref.zarr")
    ingest("physionet2019", PHYSIONET, ref, shard_size=10)
    ref_store = open_store(ref)
    ref_ids, ref_hash = ref_store.records["record_id"].tolist(), ref_store.content_hash()
    root = store_root.rstrip("/") if store_root else str(work)
    where = f" into {root.split('://')[0]}:// (Icechunk)" if store_root else ""
    span = timed_run(INGEST_SCRIPT, [PHYSIONET, f"{root}/ingest-timed.zarr"])
    rng = np.random.default_rng(seed)
    row = Row(f"kill -9 during ingest{where}, then re-run",
              note=f"work phase ≈{span:.1f} s; 30 commits + statistics; compared with a local ingest")
    readers = Row(f"reader opening the store while an ingest{where} writes (and is killed)")
    for i in range(moments):
        path = f"{root}/ingest-kill-{i}.zarr"
        stop = threading.Event()

        def read_loop(path: str = path, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    s = open_store(path)
                except StoreError:  # before its first commit there is no store yet
                    time.sleep(0.005)
                    continue
                readers.check(consistent(s, ref_ids), f"{path}: reader saw an inconsistent state")

        t = threading.Thread(target=read_loop, daemon=True)
        t.start()
        killed, _ = run_and_kill(INGEST_SCRIPT, [PHYSIONET, path], float(rng.uniform(0, span * 1.05)))
        stop.set()
        t.join()
        try:
            partial = open_store(path)
            opens = consistent(partial, ref_ids)
        except StoreError as e:  # killed before the first commit finished: nothing committed, no store yet
            opens = "no zarr.json" in str(e) or "first commit never finished" in str(e)
        report = ingest("physionet2019", PHYSIONET, path, shard_size=10)
        final = open_store(path)
        ok = (opens and report.reconciles and final.n_records == 300 and final.records["record_id"].is_unique
              and final.content_hash() == ref_hash)
        row.check(ok, f"moment {i} (killed={killed}): opens={opens} hash_equal={final.content_hash() == ref_hash}")
    return [row, readers]


# -- kill -9 during reconstruct ------------------------------------------------------------------------
RECONSTRUCT_SCRIPT = """
import sys
if __name__ == "__main__":
    from pipelines.reconstruct import reconstruct_flow
    print("go", flush=True)
    reconstruct_flow(sys.argv[1], sys.argv[2], sys.argv[3], records_per_shard=20, grid_times=3)
"""


def kill_reconstruct(work: Path, store: str, checkpoint: str, moments: int, seed: int) -> Row:
    """SIGKILL the reconstruct flow (15 shards) at random moments, re-run it, compare with an uninterrupted run."""
    from datasets.store.reconstruction import open_reconstruction
    from pipelines.reconstruct import STAGING_PREFIX, reconstruct_flow

    ref = str(work / "rec-ref.zarr")
    reconstruct_flow(store, checkpoint, ref, records_per_shard=20, grid_times=3)
    ref_hash = open_reconstruction(ref)["content_hash"]
    span = timed_run(RECONSTRUCT_SCRIPT, [store, checkpoint, str(work / "rec-timed.zarr")])
    rng = np.random.default_rng(seed + 1)
    row = Row("kill -9 during reconstruct (Prefect flow), then re-run", note=f"work phase ≈{span:.1f} s; 15 shards")
    for i in range(moments):
        out = work / f"rec-kill-{i}"
        out.mkdir()
        path = str(out / "rec.zarr")
        killed, _ = run_and_kill(RECONSTRUCT_SCRIPT, [store, checkpoint, path], float(rng.uniform(0, span * 1.05)))
        try:
            n = len(open_reconstruction(path)["records"])
            opens = True
        except Exception as e:  # noqa: BLE001 - killed before the first commit: no store yet
            n, opens = 0, "zarr.json" in str(e) or isinstance(e, FileNotFoundError)
        summary = reconstruct_flow(store, checkpoint, path, records_per_shard=20, grid_times=3)
        final = open_reconstruction(path)
        leftovers = [e for e in os.listdir(out) if e.startswith(STAGING_PREFIX)]
        ok = (opens and summary["records"] == 300 - n and final["records"]["record_id"].is_unique
              and final["content_hash"] == ref_hash and not leftovers)
        row.check(ok, f"moment {i} (killed={killed}): opens={opens} n={n} summary={summary} leftovers={leftovers}")
    return row


# -- kill -9 during training ---------------------------------------------------------------------------
TRAIN_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from datasets.store import open_store
from pipelines.run.config import RunConfig
from pipelines.run.training import train
config = RunConfig.from_json(sys.argv[3])
s = open_store(sys.argv[1])
elements, channels = s.read(), s.channels
print("go", flush=True)
train(config, elements, channels, sys.argv[2])
"""


def train_config(steps: int = 24):
    """A tiny model's run on one thread, in fp32, logging every step and checkpointing every 3."""
    from perceiver.config import ModelConfig
    from pipelines.run.config import RunConfig, TrainConfig

    return RunConfig(model=ModelConfig.preset("tiny"),
                     train=TrainConfig(steps=steps, warmup_steps=2, log_every=1, eval_every=8, eval_batches=1,
                                       checkpoint_every=3, batch_tokens=2048, precision="fp32", threads=1))


def kill_train(work: Path, store: str, moments: int, seed: int) -> Row:
    """SIGKILL training at random moments, resume, compare losses and final weights with an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from datasets.store import open_store
    from perceiver import checkpoint
    from pipelines.run.training import train

    torch.set_num_threads(1)
    cfg = work / "train-config.json"
    config = train_config()
    config.to_json(cfg)
    s = open_store(store)
    ref = train(config, s.read(), s.channels, work / "train-ref")

    def losses(out: Path) -> dict:
        return {r["step"]: r["loss"] for r in checkpoint.read_metrics(out) if r["split"] == "train"}

    ref_losses, ref_w = losses(ref), load_file(ref / "model.safetensors")
    span = timed_run(TRAIN_SCRIPT, [store, str(work / "train-timed"), str(cfg)])
    rng = np.random.default_rng(seed + 2)
    row = Row("kill -9 during training, then resume", note=f"work phase ≈{span:.1f} s; 24 steps, checkpoint every 3")
    for i in range(moments):
        out = work / f"train-kill-{i}"
        killed, _ = run_and_kill(TRAIN_SCRIPT, [store, str(out), str(cfg)], float(rng.uniform(0, span * 1.05)))
        resumed = train(config, s.read(), s.channels, out, resume=True)
        w = load_file(resumed / "model.safetensors")
        ok = losses(resumed) == ref_losses and w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k])
                                                                               for k in w)
        row.check(ok, f"moment {i} (killed={killed}): losses equal={losses(resumed) == ref_losses}")
    return row

