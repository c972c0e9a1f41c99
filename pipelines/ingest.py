"""The ``ingest`` Prefect flow: the plain :mod:`datasets.ingest` functions, one task per shard.

Tasks: ``plan`` (discover units, skip those the store has), ``read-shard-N`` (read + validate one shard,
stage it to local disk, return its path and counts; retried on I/O errors), ``commit-shard-N`` (append
the staged shard to the store, in shard order: each waits for the previous commit), ``statistics``
(channel normalisation on the train split). Reading overlaps with committing. The report is a Markdown
artifact and a table artifact; a progress artifact moves as shards commit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ProcessPoolTaskRunner

from datasets.ingest import (
    IngestReport,
    ShardSpec,
    commit_shards,
    load_shard,
    plan_shards,
    read_shard,
    save_shard,
)
from datasets.schema import DEFAULT_MAX_RECORD_ELEMENTS
from datasets.sources import get_source
from datasets.store import StoreWriter
from pipelines import prefect_env

IO_ERRORS = (OSError, TimeoutError)


def _retry_on_io(task, task_run, state) -> bool:
    try:
        state.result()
    except IO_ERRORS:
        return True
    except Exception:
        return False
    return False


@task(name="plan", task_run_name="plan")
def plan_task(source: str, path: str, store: str, shard_size: int | None, options: dict,
              max_record_elements: int) -> tuple[int, list[ShardSpec]]:
    _, units, specs = plan_shards(source, path, store, shard_size, options, max_record_elements)
    return len(units), specs


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_on_io,
      task_run_name="read-shard-{spec.index}")
def read_shard_task(spec: ShardSpec, staging: str) -> dict:
    v = read_shard(spec)
    path = save_shard(v, os.path.join(staging, f"shard-{spec.index:05d}"))
    return {"path": path, "records": v.elements.n_records, "elements": v.elements.n_elements}


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_on_io,
      task_run_name="commit-shard-{spec.index}")
def commit_shard_task(spec: ShardSpec, staged: dict, store: str, path: str, progress_id=None,
                      n_shards: int = 1) -> dict:
    report = IngestReport(store=store, source=spec.source)
    source = get_source(spec.source, **spec.options)
    with StoreWriter(store, source, path) as writer:
        if not set((u.name, u.fingerprint) for u in spec.units) <= writer.ingested:  # not already in (retry)
            commit_shards(writer, [(spec, load_shard(staged["path"]))], report)
    shutil.rmtree(staged["path"], ignore_errors=True)
    get_run_logger().info("shard %d/%d committed: %d records, %d elements", spec.index + 1, n_shards,
                          report.records_stored, int(report.per_file["stored"].sum()) if report.shards else 0)
    if progress_id is not None:
        update_progress_artifact(progress_id, 100.0 * (spec.index + 1) / n_shards)
    return report.part()


@task(name="statistics", task_run_name="statistics")
def statistics_task(store: str, source: str, options: dict, path: str) -> int:
    with StoreWriter(store, get_source(source, **options), path) as writer:
        return len(writer.update_statistics())


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, path: str, store: str, shard_size: int | None = None, workers: int = 2,
                options: dict | None = None,
                max_record_elements: int = DEFAULT_MAX_RECORD_ELEMENTS) -> dict:
    """Ingest the archive at ``path`` into ``store``, reading shards in ``workers`` processes; returns the
    report's summary (counts reconcile)."""

    t0 = time.perf_counter()
    logger = get_run_logger()
    options = dict(options or {})
    n_units, specs = plan_task(source, path, store, shard_size, options, max_record_elements)
    report = IngestReport(store=store, source=source, units_found=n_units,
                          units_skipped=n_units - sum(len(s.units) for s in specs))
    logger.info("%s: %d units, %d to ingest in %d shards", path, n_units,
                n_units - report.units_skipped, len(specs))
    if specs:
        progress_id = create_progress_artifact(0.0, description=f"ingest {source} -> {store}")
        staging = tempfile.mkdtemp(prefix=".ingest-staging-", dir=_local_dir(store))
        try:
            # Shards are read in worker processes; the flow commits them in order as they arrive, so
            # committing shard k overlaps with reading the shards after it.
            with prefect_env.workers_share_api():
                for spec, shard in zip(specs, _read_shards(specs, staging, workers), strict=True):
                    report.merge(commit_shard_task(spec, shard, store, path, progress_id, len(specs)))
            statistics_task(store, source, options, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    _publish(report)
    return report.summary()


def _read_shards(specs: list[ShardSpec], staging: str, workers: int) -> Iterator[dict]:
    """Staged shards in order. With several shards and workers, they are read in that many processes while
    the flow commits the ones already read; a single shard is read here (no worker start-up)."""
    if workers <= 1 or len(specs) <= 1:
        yield from (read_shard_task(spec, staging) for spec in specs)
        return
    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        futures = [runner.submit(read_shard_task, {"spec": spec, "staging": staging}) for spec in specs]
        yield from (f.result() for f in futures)


def _publish(report: IngestReport) -> None:
    create_markdown_artifact(report.to_markdown(), key="ingest-report",
                             description=f"ingest {report.source} -> {report.store}")
    per_file = report.per_file.astype({"read": int, "stored": int, "quarantined": int})
    create_table_artifact(per_file.head(1000).to_dict("records"), key="ingest-reconciliation",
                          description="elements read = stored + quarantined, per source file (first 1000)")


def _local_dir(store: str) -> str | None:
    if "://" in store and not store.startswith("file://"):
        return None
    parent = os.path.dirname(os.path.abspath(store.removeprefix("file://")))
    os.makedirs(parent, exist_ok=True)
    return parent


