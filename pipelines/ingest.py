"""The ``ingest`` Prefect flow: the plain :func:`datasets.ingest.ingest` as one coarse, retried task.

The work runs exactly as it does without Prefect (shards read in ``workers`` spawned processes, committed in
shard order by this process), so the flow adds only its start-up, not a per-shard round trip to the API.
A retried attempt resumes: units committed by the failed attempt are in the store's ledger and are skipped.
With ``runner="dask"`` each shard is read by a Prefect task on Prefect's Dask task runner (a local cluster or
a scheduler's workers: scale-out beyond one machine) and the flow's process commits them in shard order.
The report is a Markdown artifact and a table artifact; a progress artifact moves as shards commit.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.types import SecretDict

from datasets.ingest import IngestReport, ShardMapper, ShardSpec, ingest, read_shard
from datasets.schema import DEFAULT_MAX_RECORD_ELEMENTS, Validated
from pipelines import prefect_env
from pipelines.progress import progress
from pipelines.retries import retry_on_io


def _run_ingest(source: str, path: str, store: str, shard_size: int | None, workers: int, options: dict,
                max_record_elements: int, input_storage_options: SecretDict | None,
                map_shards: ShardMapper | None = None) -> IngestReport:
    logger = prefect_env.run_logger()
    artifact = None if prefect_env.prefect_off() else create_progress_artifact(
        0.0, description=f"ingest {source} -> {store}")
    with ShardProgress(f"ingest {source}", logger) as count:
        def on_commit(index: int, report: IngestReport) -> None:
            count(index, report)
            if artifact is not None:
                update_progress_artifact(artifact, 100.0 * report.shards / max(report.shards_planned, 1))

        report = ingest(source, path, store, shard_size=shard_size, workers=workers, options=options,
                        max_record_elements=max_record_elements, progress=on_commit,
                        input_storage_options=_secret(input_storage_options), map_shards=map_shards)
    logger.info("%s: %d units, %d skipped (already in the store), %d shards", path, report.units_found,
                report.units_skipped, report.shards)
    if artifact is not None:
        update_progress_artifact(artifact, 100.0)
    return report


class ShardProgress:
    """A callback for :func:`datasets.ingest.ingest`'s ``progress``: counts committed shards out of those planned,
    with the records and elements stored so far (:func:`pipelines.progress.progress`). Use it in ``with``."""

    def __init__(self, desc: str, logger=None):
        self.bar = progress(None, "shard", desc, logger)

    def __call__(self, index: int, report: IngestReport) -> None:
        self.bar.total = report.shards_planned
        self.bar.set_postfix(records=f"{report.records_stored:,}", elements=f"{report.elements_stored:,}",
                             refresh=False)
        self.bar.update(1)

    def __enter__(self) -> ShardProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


@task(name="ingest-archive", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io,
      task_run_name="ingest-{source}")
def ingest_task(source: str, path: str, store: str, shard_size: int | None, workers: int, options: dict,
                max_record_elements: int, input_storage_options: SecretDict | None = None) -> IngestReport:
    return _run_ingest(source, path, store, shard_size, workers, options, max_record_elements,
                       input_storage_options)


@task(name="read-shard", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io,
      task_run_name="read-shard-{spec.index}")
def read_shard_task(spec: ShardSpec) -> Validated:
    return read_shard(spec)


def dask_shards(workers: int, address: str | None = None) -> ShardMapper:
    """Read shards as Prefect tasks on a Dask cluster (the scheduler at ``address``, else a local cluster of
    ``workers`` processes), at most two per worker in flight so that memory stays bounded; results come back
    in shard order, to be committed by the flow's process."""
    def map_shards(specs: list[ShardSpec]) -> Iterator[Validated]:
        runner = prefect_env.dask_task_runner(workers, address)
        ahead = 2 * max(workers, 1)
        with prefect_env.workers_share_api(), runner:
            pending: deque = deque()
            todo = iter(specs)
            for spec in itertools.islice(todo, ahead):
                pending.append(runner.submit(read_shard_task, {"spec": spec}))
            while pending:
                result = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(runner.submit(read_shard_task, {"spec": nxt}))
                yield result

    return map_shards


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, path: str, store: str, shard_size: int | None = None, workers: int = 2,
                options: dict | None = None,
                max_record_elements: int = DEFAULT_MAX_RECORD_ELEMENTS,
                input_storage_options: SecretDict | None = None, runner: str = "local",
                dask_address: str | None = None) -> dict:
    """Ingest the archive at ``path`` (a path or an fsspec URL) into ``store``, reading shards in ``workers``
    processes; returns the report's summary (counts reconcile). ``input_storage_options`` (fsspec: credentials,
    endpoint) read the archive; they are a secret parameter, shown obfuscated by Prefect.

    ``runner="dask"`` reads each shard as a Prefect task on Prefect's Dask task runner (a local cluster of
    ``workers`` processes, or the scheduler at ``dask_address``; its workers must be able to read ``path``);
    this process commits them in shard order. ``"local"`` (default): one coarse task reading shards in
    ``workers`` local processes."""
    if runner not in ("local", "dask"):
        raise ValueError(f"runner must be 'local' or 'dask', got {runner!r}")
    t0 = time.perf_counter()
    if runner == "dask" or dask_address:
        report = _run_ingest(source, path, store, shard_size, workers, dict(options or {}), max_record_elements,
                             input_storage_options, dask_shards(workers, dask_address))
    else:
        report = prefect_env.run(ingest_task, source, path, store, shard_size, workers, dict(options or {}),
                                 max_record_elements, input_storage_options)
    report.seconds = time.perf_counter() - t0
    _publish(report)
    return report.summary()


def _secret(options: SecretDict | dict | None) -> dict:
    """The plain dict of a secret parameter (Prefect validates a flow's dict into a ``SecretDict``)."""
    if isinstance(options, SecretDict):
        return dict(options.get_secret_value())
    return dict(options or {})


def _publish(report: IngestReport) -> None:
    if prefect_env.prefect_off():
        return
    create_markdown_artifact(report.to_markdown(), key="ingest-report",
                             description=f"ingest {report.source} -> {report.store}")
    per_file = report.per_file.astype({"read": int, "stored": int, "quarantined": int})
    create_table_artifact(per_file.head(1000).to_dict("records"), key="ingest-reconciliation",
                          description="elements read = stored + quarantined, per source file (first 1000)")
