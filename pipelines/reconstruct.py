"""The ``reconstruct`` Prefect flow: batch inference over a whole store into a reconstruction store.

Tasks: ``plan`` (shards of input records not yet reconstructed), ``reconstruct-shard-A-B`` (load the
checkpoint, reconstruct records A..B, stage the arrays as .npz; retried on I/O errors), ``commit-A-B``
(append the staged shard to the output store, in shard order). With ``folds`` >= 2 (default 5) every
observed element also gets an out-of-sample reconstruction made with its fold of the record hidden, and a
standardised residual ``residual_z`` to scan the archive for anomalies (see
:mod:`pipelines.run.reconstruction`); ``folds`` is part of the output's provenance and a re-run into the same
output must use the same value. Shards run in ``workers`` local processes
(a local Dask cluster) or on an existing Dask cluster (``dask_address``) through ``DaskTaskRunner``; every
worker reports to this flow's Prefect API. A killed run re-run skips the shards already committed, and the
result equals an uninterrupted run (inference is deterministic; commits are in order). New records appended
to the input store later are picked up by the next run, so the flow can run on a schedule.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from prefect import flow, task

from datasets.store import open_store
from datasets.store.appendable import StoreError
from datasets.store.layout import time_attrs
from datasets.store.reconstruction import (
    ReconstructionWriter,
    committed_meta,
    reconstruction_arrays,
    store_folds,
    store_samples,
)
from pipelines import prefect_env
from pipelines.options import default_threads
from pipelines.progress import progress
from pipelines.retries import retry_on_io


def _local_dir(store: str) -> str | None:
    """The local folder beside ``store`` (created), or None for an object-store URL: where shards are staged."""
    if "://" in store and not store.startswith("file://"):
        return None
    parent = os.path.dirname(os.path.abspath(store.removeprefix("file://")))
    os.makedirs(parent, exist_ok=True)
    return parent


@task(name="plan", task_run_name="plan")
def plan_task(store: str, out: str, records_per_shard: int) -> list[tuple[int, int]]:
    """Record ranges [a, b) of the input store after the last committed one (committed shards are a prefix)."""
    from datasets.store.reconstruction import committed_meta

    n = open_store(store).n_records
    start = int(committed_meta(out).get("input_records_done", 0))  # {} where there is no output yet
    return [(a, min(a + records_per_shard, n)) for a in range(start, n, records_per_shard)]


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io,
      task_run_name="reconstruct-shard-{start}-{stop}")
def reconstruct_shard_task(store: str, checkpoint: str, start: int, stop: int, staging: str, grid: dict,
                           max_tokens: int, precision: str, threads: int, folds: int = 0, samples: int = 0,
                           device: str = "auto") -> str:
    import torch

    from perceiver.checkpoint import load
    from pipelines.run.devices import inference_dtype, resolve_device
    from pipelines.run.reconstruction import GridSpec, reconstruct

    caller_threads = torch.get_num_threads()  # in-process runs give the caller (a notebook) its setting back
    torch.set_num_threads(max(1, threads))
    try:
        s = open_store(store)
        where = resolve_device(device)
        model = load(checkpoint, where)
        elements = s.read(start, stop)
        dtype = inference_dtype(precision, where)
        r = reconstruct(model, elements, s.channels, GridSpec(**grid), max_tokens=max_tokens, dtype=dtype,
                        folds=folds, n_samples=samples, sample_seed=start)
    finally:
        torch.set_num_threads(caller_threads)
    path = os.path.join(staging, f"shard-{start:09d}-{stop:09d}.npz")
    np.savez(path, **reconstruction_arrays(r, elements.row_size))
    return path


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io, task_run_name="commit-{start}-{stop}")
def commit_task(out: str, provenance: dict, d_latent: int, start: int, stop: int, path: str) -> int:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with ReconstructionWriter(out, provenance, d_latent) as w:
        new = w.append_range(start, stop, arrays)  # skips what a retried commit or another run already stored
    os.remove(path)
    prefect_env.run_logger().info("records %d..%d reconstructed (%d new)", start, stop, new)
    return new


@flow(name="reconstruct", log_prints=True)
def reconstruct_flow(store: str, checkpoint: str, out: str, records_per_shard: int = 2000, grid_times: int = 64,
                     grid_coords: int = 0, grid_channels: list[str] | None = None, workers: int = 1,
                     dask_address: str | None = None, precision: str = "auto", max_tokens: int = 16_384,
                     folds: int = 5, threads: int | None = None, samples: int = 0, head: str | None = None,
                     device: str = "auto") -> dict:
    """Reconstruct every record of ``store`` with the model in ``checkpoint`` (a directory, or a shipped model's name,
    see :mod:`perceiver.pretrained`) into the Zarr store ``out``.

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first GPU where torch sees one, else the CPU);
    ``precision``: ``auto`` (bf16 autocast on a GPU, fp32 on a CPU), ``bf16`` or ``fp32``.

    ``threads``: torch threads per worker (default ``OMP_NUM_THREADS`` where set, else the CPUs shared between
    the workers).

    ``folds`` (default: pipelines.run.reconstruction.DEFAULT_FOLDS, written out for a torch-free import)
    >= 2 adds the out-of-sample outputs (``mean_oos``, ``sigma_oos``, their normalised versions
    and ``residual_z``) at about ``folds`` times the encoder cost; 0 or 1 leaves them out.

    ``samples`` = K > 0 adds K draws per element and grid point (``samples``, ``grid_samples`` with a
    ``sample`` dimension; their mean and 2.5 / 97.5 % quantiles beside them). ``head``, where given, must be
    the checkpoint's output head (a check, e.g. that a ``diffusion`` model is the one used)."""
    t0 = time.perf_counter()
    from datasets.loader import match_channels
    from perceiver.checkpoint import weights_sha256
    from perceiver.pretrained import resolve_checkpoint
    from pipelines.run.config import load_run
    from pipelines.run.devices import resolve_device

    if folds < 0:
        raise ValueError(f"folds must be >= 0 (0 or 1: no out-of-sample outputs), got {folds}")
    folds = folds if folds >= 2 else 0
    if samples < 0:
        raise ValueError(f"samples must be a positive number of draws (or 0: none), got {samples}")

    resolve_device(device)  # a GPU asked for where there is none fails here, before any shard runs
    checkpoint = resolve_checkpoint(checkpoint)  # a directory, or a shipped model's name
    model, config = load_run(checkpoint)
    check_head(checkpoint, model.config.head.name, head)
    elements = open_store(store)
    match_channels(model.config.contract, elements.channels, store)  # fail before any shard runs
    provenance = {
        "input_store": os.path.abspath(store) if "://" not in store else store,
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_sha256": weights_sha256(checkpoint),
        "model_config": config.to_dict(), "code_version": code_version(),
        "grid": {"n_times": grid_times, "n_coords": grid_coords, "channels": grid_channels},
        "precision": precision, "device": device, "folds": folds, "samples": samples,
        "time_attrs": time_attrs(elements.meta),  # the input store's CF time units, for grid_time
    }
    existing = committed_meta(out)
    if existing and store_folds(existing) != folds:
        raise StoreError(f"{out} holds reconstructions with folds={store_folds(existing)}, not {folds}: "
                         "choose another output or the same folds")
    if existing and store_samples(existing) != samples:
        raise StoreError(f"{out} holds reconstructions with samples={store_samples(existing)}, not {samples}: "
                         "choose another output or the same samples")
    shards = prefect_env.run(plan_task, store, out, records_per_shard)
    grid = provenance["grid"]
    done = 0
    if shards:
        _remove_dead_staging(_local_dir(out))
        staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=_local_dir(out))
        try:
            threads = threads or default_threads(workers)
            args = {"store": store, "checkpoint": checkpoint, "staging": staging, "grid": grid,
                    "max_tokens": max_tokens, "precision": precision, "threads": threads,
                    "folds": folds, "samples": samples, "device": device}
            with prefect_env.workers_share_api(), progress(shards[-1][1] - shards[0][0], "record", "reconstruct",
                                                           prefect_env.run_logger()) as bar:
                for (a, b), path in zip(shards, _run_shards(shards, args, workers, dask_address), strict=True):
                    done += prefect_env.run(commit_task, out, provenance, model.config.sizes.d_latent, a, b, path)
                    bar.update(b - a)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - t0
    summary = {"out": out, "shards": len(shards), "records": done, "seconds": round(seconds, 2),
               "records_per_s": round(done / seconds, 1) if seconds else 0.0}
    prefect_env.markdown_artifact(f"## Reconstruct `{store}` → `{out}`\n\n{len(shards)} shards, {done:,} records, "
                                  f"{seconds:.1f} s ({summary['records_per_s']} records/s); checkpoint "
                                  f"`{checkpoint}` (sha256 {provenance['checkpoint_sha256'][:12]}…).",
                                  key="reconstruct-report")
    return summary


STAGING_PREFIX = ".reconstruct-staging-"


def check_head(checkpoint: str, have: str, want: str | None) -> None:
    """Fail, naming both, where a command asks for another output head than the checkpoint's."""
    if want is not None and want != have:
        raise ValueError(f"{checkpoint}: the checkpoint was trained with the {have!r} head, not {want!r} "
                         f"(train one with `percival train --head {want}`)")


def _remove_dead_staging(folder: str | None) -> None:
    """Staging folders of runs that died (kill -9 skips ``finally``): their shards are redone anyway, and on
    an unattended schedule they would pile up. A folder's name carries its run's process id."""
    folder = folder or tempfile.gettempdir()
    for entry in os.scandir(folder):
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        pid = entry.name.removeprefix(STAGING_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_shards(shards: list[tuple[int, int]], args: dict, workers: int, dask_address: str | None
                ) -> Iterator[str]:
    """Staged shard paths in shard order: in this process, or on a (local or remote) Dask cluster."""
    if dask_address is None and workers <= 1:
        yield from (prefect_env.run(reconstruct_shard_task, start=a, stop=b, **args) for a, b in shards)
        return
    if prefect_env.prefect_off():
        raise ValueError("--workers > 1 and --dask-address run shards as Prefect tasks on Dask: not with --no-prefect")
    runner = prefect_env.dask_task_runner(workers, dask_address)
    with runner:
        futures = [runner.submit(reconstruct_shard_task, {"start": a, "stop": b, **args}) for a, b in shards]
        yield from (f.result() for f in futures)


def code_version() -> str:
    """Percival's version, plus the git commit where the code runs from a checkout."""
    from importlib.metadata import version

    v = version("percival")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v
