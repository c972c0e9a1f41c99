"""The training loop: AdamW, warm-up + cosine schedule, gradient clipping, bf16 autocast, DDP, exact resume.

From Python::

    from pipelines.options import default_threads
from pipelines.run.config import RunConfig
from pipelines.run.devices import DistInfo, autocast, init_distributed, resolve_precision
from pipelines.run.selection import RobustScore, Selection
    from pipelines.run.training import train
    path = train(RunConfig(), elements, channels, "runs/demo")   # -> runs/demo

From the shell: ``percival train STORE --out DIR`` (the ``train`` flow; ``--nproc N`` launches this module's
:func:`main` under torchrun).

The model's data contract (:func:`datasets.loader.fit_contract`: channel vocabulary, normalisation, time
scales) is fitted on the train split when a run starts and written into ``config.json``; a resumed run keeps
its own contract whatever the store holds now.

``out_dir`` receives ``config.json``, ``model.safetensors``, ``training_state.pt`` (everything needed to
resume: weights, optimizer, scheduler, RNG, data position, the pending logging window) and ``metrics.jsonl``
(one JSON object per line: ``{"step", "split": "train", "loss", "lr", ...}`` and ``{"step", "split": "val",
"overall": {...}, "modality": {...}, "channel": {...}}``). A run killed at any point and started again with
``resume=True`` continues from the last checkpoint and produces the same losses and the same final weights as
an uninterrupted run: the data order and masking plans are functions of (seed, epoch, batch number) only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from datasets.format import ElementSet
from datasets.loader import ElementDataset, fit_contract, token_batches
from datasets.loader.blocks import RecordBlocks, slice_reader
from datasets.store import Store
from perceiver import checkpoint
from perceiver.metrics import Metrics
from perceiver.model import Percival
from perceiver.packing import PackedBatch
from pipelines.options import default_threads
from pipelines.run.config import RunConfig
from pipelines.run.devices import DistInfo, autocast, init_distributed, resolve_precision
from pipelines.run.selection import RobustScore, Selection

log = logging.getLogger("pipelines.run.training")

#: the "epoch" used to seed evaluation batches and masks (never a training epoch)
EVAL_EPOCH = 2**31 - 1
#: the weights of the best validation score so far (``train.select_best``)
BEST_WEIGHTS = "best.safetensors"


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------

def _splits(records: pd.DataFrame) -> tuple[str | None, str | None]:
    """Train and validation split names: the ``split`` column when present, else all records for training."""
    if "split" not in records.columns:
        return None, None
    names = set(records["split"].astype(str))
    return "train", ("val" if "val" in names else None)


def _in_split(records: pd.DataFrame, split: str | None) -> np.ndarray:
    return np.ones(len(records), bool) if split is None else records["split"].astype(str).to_numpy() == split


def _record_source(data: ElementSet | Store) -> tuple[pd.DataFrame, np.ndarray, Callable[[int, int], ElementSet]]:
    """Records, their sizes and ``read(start, stop)`` of an ElementSet in memory or of a store (read lazily)."""
    if isinstance(data, ElementSet):
        return data.records, np.asarray(data.row_size), slice_reader(data)
    return data.records, data.records["row_size"].to_numpy(), data.read


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on Linear weights only (not biases, norms, embeddings, the latent array)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


class Trainer:
    """Model, optimizer, data and position of one run; :meth:`run` trains to ``config.train.steps``."""

    def __init__(self, config: RunConfig, elements: ElementSet | Store, channels: pd.DataFrame, out_dir: str | Path,
                 resume: bool = True, dist_info: DistInfo | None = None):
        self.dist = dist_info or init_distributed(config.train.device)
        self.out = Path(out_dir)
        tc = config.train
        threads = tc.threads or default_threads(self.dist.local_world_size)
        if self.dist.device.type == "cpu":
            torch.set_num_threads(threads)

        state = checkpoint.load_training_state(self.out) if resume else None
        records, row_size, read = _record_source(elements)
        train_split, val_split = _splits(records)
        # the train split in blocks of at most train.block_elements: one block (in memory) or read block by block
        self.blocks = RecordBlocks(row_size, _in_split(records, train_split), read, tc.block_elements,
                                   self.dist.world_size)
        if self.blocks.n_elements == 0:
            raise ValueError("no training records")
        whole = read(0, len(records)) if self.blocks.in_memory else None
        if state is not None:  # a resumed run keeps its own model config and data contract
            saved = RunConfig.from_json(self.out / checkpoint.CONFIG)
            if (saved.train, saved.masking) != (config.train, config.masking):
                log.warning("resuming %s with a changed train/masking config", self.out)
            config = dataclasses.replace(config, model=saved.model)
        else:  # fitted on the train split, or on a sample of it spread over the store where it is not in memory
            contract = (fit_contract(whole, channels, np.flatnonzero(_in_split(records, train_split)))
                        if whole is not None else fit_contract(self.blocks.sample(tc.block_elements), channels))
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, contract=contract))
        self.channels = channels
        self.config = config
        self.train_ds = (ElementDataset(whole, channels, config.model.contract, train_split)
                         if whole is not None else None)  # else the current block's, loaded by next_batch
        self._block: tuple[int, int] | None = None  # (epoch, block) of train_ds when streaming
        if not val_split:
            self.val_ds = None
        elif whole is not None:
            self.val_ds = ElementDataset(whole, channels, config.model.contract, val_split)
        else:  # validation on a sample of the val split within the same budget
            val = RecordBlocks(row_size, _in_split(records, val_split), read, tc.block_elements)
            self.val_ds = ElementDataset(val.sample(tc.block_elements // 4), channels, config.model.contract)
        if not self.blocks.in_memory:
            log.info("train split: %d elements in %d blocks of about %d per epoch (train.block_elements %d)",
                     self.blocks.n_elements, self.blocks.n_blocks, self.blocks.n_elements // self.blocks.n_blocks,
                     tc.block_elements)

        torch.manual_seed(tc.seed)
        self.model = Percival(config.model).to(self.dist.device)
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.dist.device.index]
                                                        if self.dist.device.type == "cuda" else None)
                    if self.dist.world_size > 1 else self.model)
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, tc.weight_decay), lr=tc.lr,
                                           betas=tuple(tc.betas), fused=None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio))
        self.dtype = resolve_precision(tc.precision, self.dist.device)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.window: list[list[float]] = []  # per step since the last log: loss, elements, seconds
        self.selection = Selection()
        self._epoch_batches: list[np.ndarray] | None = None
        if state is not None:
            self._load_state(state)
            log.info("resumed %s at step %d (epoch %d, batch %d)", self.out, self.step, self.epoch,
                     self.batch_in_epoch)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            config.to_json(self.out / checkpoint.CONFIG)
            self._truncate_metrics()
        log.info("model: %.2f M parameters, precision %s, %d threads, world size %d",
                 self.model.n_parameters() / 1e6, self.dtype or "fp32", torch.get_num_threads(),
                 self.dist.world_size)

    # -- state ------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "window": torch.tensor(self.window, dtype=torch.float64).reshape(-1, 3),
                "selection": self.selection.state(), "world_size": self.dist.world_size}

    def _load_state(self, state: dict) -> None:
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"checkpoint was written by {state['world_size']} processes, "
                             f"this run has {self.dist.world_size}: the data position would not match")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.window = state["window"].tolist()
        if "selection" in state:  # states written before selection existed start afresh
            self.selection = Selection.from_state(state["selection"])

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint we resume from (a killed run may have some)."""
        path = self.out / checkpoint.METRICS
        if not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
        if len(keep) != len(lines):
            checkpoint.atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def save(self) -> None:
        if self.dist.is_main:
            checkpoint.save(self.out, self.model, self.config.sections(), self._state(), step=self.step)
        if self.dist.world_size > 1:
            dist.barrier()

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / checkpoint.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    # -- data -------------------------------------------------------------------------------------------
    def next_batch(self) -> PackedBatch:
        """The next training batch of this rank; the plan depends only on (seed, epoch, batch number)."""
        tc = self.config.train
        while True:
            if self._epoch_batches is None:
                batching = dict(max_tokens=tc.batch_tokens, max_records=tc.max_records, record_cost=tc.record_cost,
                                max_elements=tc.max_record_elements)
                self._epoch_batches = self.blocks.epoch_plan(self.epoch, tc.seed, self.dist.rank, batching)
                if not self._epoch_batches:
                    raise ValueError(f"the train split's batches per epoch cannot feed {self.dist.world_size} "
                                     "ranks")
            if self.batch_in_epoch < len(self._epoch_batches):
                break
            self.epoch, self.batch_in_epoch, self._epoch_batches = self.epoch + 1, 0, None
        number = self.batch_in_epoch * self.dist.world_size + self.dist.rank
        rng = np.random.default_rng([tc.seed, self.epoch, number])
        block, items = self._epoch_batches[self.batch_in_epoch]
        batch = self._block_dataset(block).collate(items, self.config.masking, rng, tc.max_record_elements)
        self.batch_in_epoch += 1
        return batch.to(self.dist.device)

    def _block_dataset(self, block: int) -> ElementDataset:
        """The train split's dataset holding ``block`` of this epoch (read when the plan moves to it)."""
        if self.blocks.in_memory or self._block == (self.epoch, block):
            return self.train_ds
        self.train_ds = None  # the previous block's memory goes before the next one is read
        seed = self.config.train.seed
        self.train_ds = ElementDataset(self.blocks.read(block, self.epoch, seed), self.channels,
                                       self.config.model.contract)
        self._block = (self.epoch, block)
        return self.train_ds

    # -- one step ---------------------------------------------------------------------------------------
    def train_step(self, batch: PackedBatch) -> tuple[float, float]:
        self.ddp.train()
        with autocast(self.dist.device, self.dtype):
            output = self.ddp(batch)
        loss = self.model.loss(batch, output)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach()), float(grad_norm)

    @torch.no_grad()
    def evaluate(self, dataset: ElementDataset | None = None, max_batches: int | None = None) -> dict:
        """Metrics on held-out targets of ``dataset`` (default: the validation split), same masking modes."""
        ds = dataset or self.val_ds
        tc = self.config.train
        c = self.config.model
        metrics = Metrics(c.channel_names, c.channel_modality, c.modalities)
        robust = RobustScore(c.channel_modality, c.modalities)
        batches = token_batches(ds.lengths, tc.batch_tokens, tc.max_records, shuffle=True, seed=tc.seed,
                                epoch=EVAL_EPOCH, record_cost=tc.record_cost,
                                max_elements=tc.max_record_elements)
        self.model.eval()
        for i, items in enumerate(batches[:max_batches or tc.eval_batches]):
            rng = np.random.default_rng([tc.seed, EVAL_EPOCH, i])
            batch = ds.collate(items, self.config.masking, rng, tc.max_record_elements).to(self.dist.device)
            with autocast(self.dist.device, self.dtype):
                output = self.model(batch)
            t = batch.target
            metrics.update(output.mean, output.log_sigma, batch.value[t], batch.error[t], batch.channel[t])
            robust.update(output.mean, batch.value[t], batch.channel[t])
        return {**metrics.summary(), "selection": robust.summary()}

    def _flush_window(self) -> None:
        w = torch.tensor(self.window, dtype=torch.float64).reshape(-1, 3)
        sums = torch.stack([w[:, 0].sum(), torch.tensor(float(len(w))), w[:, 1].sum(), w[:, 2].sum()])
        if self.dist.world_size > 1:
            dist.all_reduce(sums)  # loss sum, step count, elements, seconds over ranks
        self.window = []
        loss = float(sums[0] / sums[1])
        seconds = float(sums[3]) / self.dist.world_size
        record = {"step": self.step, "split": "train", "epoch": self.epoch, "loss": loss,
                  "lr": self.scheduler.get_last_lr()[0],
                  "elements_per_s": float(sums[2]) / max(seconds, 1e-9)}
        self._log(record)
        if self.dist.is_main:
            log.info("step %d  loss %.4f  lr %.2e  %.0f elements/s", self.step, loss, record["lr"],
                     record["elements_per_s"])

    def run(self, on_step: Callable[[dict], None] | None = None) -> Path:
        """Train until ``config.train.steps``; checkpoints every ``checkpoint_every`` steps and at the end.

        ``on_step`` is called after every step with ``{"step", "loss", "grad_norm", "elements"}`` (progress
        reporting; an exception raised there stops the run like a crash, without a checkpoint).
        """
        tc = self.config.train
        stop = bool(tc.early_stop_patience) and self.selection.since_best >= tc.early_stop_patience
        while self.step < tc.steps and not stop:
            t0 = time.perf_counter()
            batch = self.next_batch()
            loss, grad_norm = self.train_step(batch)
            self.window.append([loss, float(batch.n_elements), time.perf_counter() - t0])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}")
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                self._flush_window()
            if self.val_ds is not None and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                stop = self._validate()
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or stop:
                self.save()
            if on_step is not None:
                on_step({"step": self.step, "loss": loss, "grad_norm": grad_norm,
                         "elements": batch.n_elements})
        if tc.select_best and self.dist.is_main and (self.out / BEST_WEIGHTS).exists():
            # publish the selected weights; training_state.pt keeps the last ones for a resumed run
            checkpoint.atomic_write(self.out / checkpoint.WEIGHTS,
                                    lambda tmp: Path(tmp).write_bytes((self.out / BEST_WEIGHTS).read_bytes()))
        return self.out

    def _validate(self) -> bool:
        """Evaluate on the validation split (rank 0), log it, track the selection score; True to stop early."""
        tc = self.config.train
        stop = False
        if self.dist.is_main:
            record = self.evaluate()
            score = record["selection"]["overall"]
            if self.selection.update(score, self.step) and tc.select_best:
                checkpoint.save_weights(self.model, self.out / BEST_WEIGHTS, {"step": str(self.step)})
            self._log({"step": self.step, "split": "val", **record, "best_step": self.selection.best_step})
            log.info("step %d  validation median |error| %.4f (%s)  best at step %d", self.step, score,
                     ", ".join(f"{m} {v:.4f}" for m, v in record["selection"]["modality"].items()),
                     self.selection.best_step)
            stop = bool(tc.early_stop_patience) and self.selection.since_best >= tc.early_stop_patience
        if self.dist.world_size > 1:
            flag = torch.tensor([int(stop)])
            dist.broadcast(flag, 0)  # every rank stops at the same step
            stop = bool(flag)
        return stop


def train(config: RunConfig, elements: ElementSet | Store, channels: pd.DataFrame, out_dir: str | Path,
          resume: bool = True, on_step: Callable[[dict], None] | None = None) -> Path:
    """Train a model on the train split of ``elements`` (all records when there is no ``split`` column): an
    ElementSet in memory, or a :class:`~datasets.store.Store` read block by block where its train split is
    larger than ``config.train.block_elements``.

    Returns ``out_dir`` holding ``config.json``, ``model.safetensors``, ``training_state.pt`` and
    ``metrics.jsonl``. With ``resume=True`` an existing ``training_state.pt`` is continued exactly. Under
    torchrun (``WORLD_SIZE`` > 1) every process calls this; rank 0 writes the files.
    """
    return Trainer(config, elements, channels, out_dir, resume=resume).run(on_step)


# ---------------------------------------------------------------------------------------------------------
# command line (single process or torchrun)
# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """The torchrun worker of the ``train`` flow (``--nproc`` > 1): every process trains on the store."""
    from datasets.store import open_store

    p = argparse.ArgumentParser(prog="python -m pipelines.run.training", description=main.__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="output / checkpoint directory")
    p.add_argument("--config", required=True, help="RunConfig JSON")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    store = open_store(args.store)
    try:  # each rank reads its own blocks of the store (all of it where the train split is one block)
        path = train(RunConfig.from_json(args.config), store, store.channels, args.out, resume=not args.no_resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)


if __name__ == "__main__":
    main()
