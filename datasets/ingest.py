"""Ingest: an archive's files -> validated element sets -> one Zarr store. Plain Python, no Prefect.

>>> from datasets.ingest import ingest
>>> report = ingest("physionet2019", "training_setA.zip", "physionet.zarr", workers=2)
>>> print(report.to_markdown())

The work is split into *shards* of source units (files or archive members). Each shard is read and
validated independently (in worker processes when ``workers > 1``), then committed to the store in shard
order, so the store's content does not depend on timing. Units already in the store (same name and
fingerprint) are skipped: a re-run after a crash continues where the last commit ended, and re-ingesting an
unchanged archive changes nothing. The Prefect flow (:mod:`pipelines.ingest`) calls these same functions.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pandas as pd

from datasets.format import QUARANTINE_COLUMNS
from datasets.schema import DEFAULT_MAX_RECORD_ELEMENTS, Validated, drop_known_records, validate
from datasets.sources import Source, Unit, files, get_source
from datasets.store import StoreConflict, StoreWriter

#: times an ingest into an object store starts again from a concurrent writer's newer commit (each one means
#: the other writer committed work that this one then skips, so the total work stays bounded)
CONFLICT_RETRIES = 100


@dataclass
class ShardSpec:
    """One shard's work: picklable, so it can travel to a worker process or a Prefect task."""

    index: int
    source: str
    options: dict
    units: list[Unit]
    max_record_elements: int = DEFAULT_MAX_RECORD_ELEMENTS
    #: fsspec options for reading the archive (credentials, endpoint); travels with the shard to workers
    input_storage_options: dict = field(default_factory=dict)


@dataclass
class IngestReport:
    """What an ingest did; ``per_file`` reconciles read = stored + quarantined for every source file."""

    store: str
    source: str
    units_found: int = 0
    units_skipped: int = 0
    units_committed: int = 0
    shards: int = 0
    shards_planned: int = 0
    records_stored: int = 0
    records_resorted: int = 0
    seconds: float = 0.0
    per_file: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["source_file", "read", "stored", "quarantined"]))
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=QUARANTINE_COLUMNS))

    @property
    def elements_read(self) -> int:
        return int(self.per_file["read"].sum())

    @property
    def elements_stored(self) -> int:
        return int(self.per_file["stored"].sum())

    @property
    def elements_quarantined(self) -> int:
        return int(self.per_file["quarantined"].sum())

    @property
    def reconciles(self) -> bool:
        f = self.per_file
        return bool((f["read"] == f["stored"] + f["quarantined"]).all())

    def add(self, v: Validated, units: int = 0) -> None:
        """Count one committed shard (of ``units`` source units)."""
        self.merge({"per_file": v.counts, "quarantine": v.quarantine, "records": v.elements.n_records,
                    "resorted": v.records_resorted, "shards": 1})
        self.units_committed += units

    def merge(self, part: dict) -> None:
        """Add one shard's counts to this report."""
        per_file, quarantine = pd.DataFrame(part["per_file"]), pd.DataFrame(part["quarantine"])
        self.per_file = pd.concat([self.per_file, per_file], ignore_index=True) if len(self.per_file) \
            else per_file.copy()
        if len(quarantine):
            self.quarantine = pd.concat([self.quarantine, quarantine], ignore_index=True) \
                if len(self.quarantine) else quarantine.copy()
        self.records_stored += int(part["records"])
        self.records_resorted += int(part["resorted"])
        self.shards += int(part["shards"])

    def summary(self) -> dict:
        return {"store": self.store, "source": self.source, "units_found": self.units_found,
                "units_skipped": self.units_skipped, "shards": self.shards,
                "records_stored": self.records_stored, "elements_read": self.elements_read,
                "elements_stored": self.elements_stored, "elements_quarantined": self.elements_quarantined,
                "quarantine_rows": len(self.quarantine), "records_resorted": self.records_resorted,
                "reconciles": self.reconciles, "seconds": round(self.seconds, 2)}

    def to_markdown(self) -> str:
        s = self.summary()
        rate = s["elements_read"] / self.seconds if self.seconds else 0.0
        lines = [f"## Ingest of `{self.source}` into `{self.store}`", "",
                 "| | count |", "|---|---:|"]
        lines += [f"| {k.replace('_', ' ')} | {v:,} |" for k, v in s.items()
                  if isinstance(v, int) and not isinstance(v, bool)]
        lines += ["", f"Read = stored + quarantined for every source file: **{self.reconciles}**. "
                  f"{self.seconds:.1f} s, {rate:,.0f} elements/s."]
        if len(self.quarantine):
            top = (self.quarantine.assign(reason=self.quarantine["reason"].str.slice(0, 80))
                   .groupby(["field", "reason"])["elements"].agg(["size", "sum"]).reset_index()
                   .sort_values("size", ascending=False).head(20))
            lines += ["", "| field | reason | rows | elements |", "|---|---|---:|---:|"]
            lines += [f"| {r.field} | {r.reason} | {r.size:,} | {r.sum:,} |" for r in top.itertuples()]
        return "\n".join(lines)


def plan_shards(source_name: str, path: str, store: str, shard_size: int | None = None,
                options: dict | None = None, max_record_elements: int = DEFAULT_MAX_RECORD_ELEMENTS,
                storage_options: dict | None = None, input_storage_options: dict | None = None
                ) -> tuple[Source, list[Unit], list[ShardSpec]]:
    """Discover the archive's units, drop those the store already holds, and group the rest.

    ``path`` is a local path or an fsspec URL read with ``input_storage_options``; ``storage_options`` are the
    store's. Raises ``FileNotFoundError`` (naming ``path``) when nothing is there, or when the source finds no
    units in it: an ingest that finds nothing to read is an error, never an empty success.
    """
    options = dict(options or {})
    input_storage_options = dict(input_storage_options or {})
    source = get_source(source_name, storage_options=input_storage_options, **options)
    if not files.exists(path, input_storage_options):
        where = "" if files.is_local(path) else " (or its bucket) or is not readable with these credentials"
        raise FileNotFoundError(f"{path}: no such file or directory{where}")
    units = source.discover(path)
    if not units:
        raise FileNotFoundError(f"{path}: the {source_name} source finds no files to read there "
                                f"(see `percival ingest {source_name} -h` and the README for the layout)")
    options = source.resolved_options() or options
    return source, units, shard_specs(source, source_name, units, _ingested_units(store, storage_options),
                                      shard_size, options, max_record_elements, input_storage_options)


def shard_specs(source: Source, source_name: str, units: list[Unit], done: set[tuple[str, str]],
                shard_size: int | None, options: dict, max_record_elements: int,
                input_storage_options: dict | None = None) -> list[ShardSpec]:
    """The units not in the ledger ``done``, grouped into shards."""
    todo = [u for u in units if (u.name, u.fingerprint) not in done]
    chunks = source.shard(todo, shard_size or source.units_per_shard)
    return [ShardSpec(i, source_name, options, c, max_record_elements, dict(input_storage_options or {}))
            for i, c in enumerate(chunks)]


#: reads shards somewhere (``map_shards(specs)``, each as :func:`read_shard` does), yielding the validated
#: shards in the order of ``specs``
ShardMapper = Callable[[list[ShardSpec]], Iterator[Validated]]


def read_shard(spec: ShardSpec) -> Validated:
    """Read and validate one shard (runs anywhere: main process, worker process, Prefect task)."""
    source = get_source(spec.source, storage_options=spec.input_storage_options, **spec.options)
    raw = source.read(spec.units)
    return validate(raw, source.channels(), spec.max_record_elements)


def commit_shards(writer: StoreWriter, results: Iterable[tuple[ShardSpec, Validated]],
                  report: IngestReport, progress: Callable[[int, IngestReport], None] | None = None) -> None:
    """Append shards to the store in the order given, each as its own commit."""
    for spec, v in results:
        v = drop_known_records(v, writer.known_ids)
        writer.append(v, spec.units)
        report.add(v, len(spec.units))
        if progress:
            progress(spec.index, report)


def ingest(source: str, path: str, store: str, *, shard_size: int | None = None, workers: int = 1,
           options: dict | None = None, max_record_elements: int = DEFAULT_MAX_RECORD_ELEMENTS,
           storage_options: dict | None = None, input_storage_options: dict | None = None,
           progress: Callable[[int, IngestReport], None] | None = None,
           map_shards: ShardMapper | None = None) -> IngestReport:
    """Ingest the archive at ``path`` (file or directory) read by ``source`` into the store at ``store``.

    ``path`` is a local path or an fsspec URL (``s3://``, ``gs://``, ``https://``, ...) read with
    ``input_storage_options`` and the standard environment (``AWS_*``); ``storage_options`` are the store's.
    A missing ``path`` or one in which the source finds no units raises ``FileNotFoundError`` naming it.

    ``workers`` > 1 reads shards in that many spawned processes; commits stay in shard order.
    ``map_shards(specs)``, where given, reads them instead (e.g. on a Dask cluster: see
    :mod:`pipelines.ingest`), yielding the validated shards in the order of ``specs``.
    ``progress(shard_index, report)`` is called after each commit. Returns the reconciled report.
    """
    t0 = time.perf_counter()
    src, units, specs = plan_shards(source, path, store, shard_size, options, max_record_elements,
                                    storage_options, input_storage_options)
    report = IngestReport(store=store, source=source, units_found=len(units))
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            with StoreWriter(store, src, path, storage_options) as writer:
                # the ledger again, now under the lock (or from the newest snapshot): a run that waited for
                # another writer, or lost a commit race to one, must not redo its work
                if any((u.name, u.fingerprint) in writer.ingested for s in specs for u in s.units):
                    first = specs[0]
                    specs = shard_specs(src, source, units, writer.ingested, shard_size, first.options,
                                        first.max_record_elements, first.input_storage_options)
                report.shards_planned = report.shards + len(specs)
                read = map_shards(specs) if map_shards else _map(read_shard, specs, workers)
                commit_shards(writer, zip(specs, read, strict=True), report, progress)
                # an unchanged archive changes nothing, not even the statistics' timestamp; statistics that a
                # killed run never wrote are written now
                if specs or not writer.statistics_current:
                    writer.update_statistics()
            break
        except StoreConflict:  # an object store's concurrent writer committed first: continue from its commit
            if attempt == CONFLICT_RETRIES:
                raise
            time.sleep(random.uniform(0.05, 0.5))  # let the winner lead, rather than race it for every shard
    report.units_skipped = len(units) - report.units_committed
    report.seconds = time.perf_counter() - t0
    return report


def _map(fn, specs: list[ShardSpec], workers: int) -> Iterator:
    if workers <= 1 or len(specs) <= 1:
        yield from map(fn, specs)
        return
    # spawn, not fork: forked children of a process holding zarr/icechunk threads can hang.
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=ctx) as pool:
        yield from pool.map(fn, specs)


def _ingested_units(store: str, storage_options: dict | None) -> set[tuple[str, str]]:
    from datasets.store import Store, StoreError

    try:
        s = Store(store, storage_options)
    except (StoreError, FileNotFoundError):
        return set()
    n = int(s.meta["commit"]["ingested_unit"])
    if n == 0:
        return set()
    return set(zip(s.group["unit_name"][:n].tolist(), s.group["unit_fingerprint"][:n].tolist(), strict=True))
