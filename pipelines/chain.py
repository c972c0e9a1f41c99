"""The whole chain as one flow: ingest what is new in an archive, reconstruct the records that the reconstruction
store lacks with the named model, evaluate.

Each step is its own flow (a subflow run here; ``percival ingest | reconstruct | evaluate`` run them alone), so a
scheduled chain (``percival serve --chain``, ``docs/schedules.md``) does each night only what is new: ingest
skips the units already in the store, reconstruct continues after the last record it committed. The evaluation,
where asked for, scores the whole split again with the model.
"""

from __future__ import annotations

from prefect import flow

from pipelines import prefect_env
from pipelines.evaluate import evaluate_flow
from pipelines.ingest import ingest_flow
from pipelines.reconstruct import reconstruct_flow


@flow(name="chain")
def chain_flow(source: str, path: str, store: str, checkpoint: str, out: str, evaluation: str | None = None,
               protocols: tuple[str, ...] | list[str] = ("holdout",), split: str = "test",
               shard_size: int | None = None, options: dict | None = None, workers: int = 2,
               grid_times: int = 64, folds: int = 5) -> dict:
    """Ingest the archive at ``path`` into ``store`` (source ``source``, its ``options``, ``shard_size`` units a
    shard, ``workers`` processes), reconstruct the new records into ``out`` with ``checkpoint`` (a directory or a
    shipped model's name; ``grid_times``, ``folds`` as for reconstruct), and, where ``evaluation`` names a
    folder, evaluate the model there (``protocols`` on ``split``). Returns the steps' summaries."""
    run = prefect_env.run_flow
    ingested = run(ingest_flow, source, path, store, shard_size=shard_size, workers=workers, options=options)
    reconstructed = run(reconstruct_flow, store, checkpoint, out, grid_times=grid_times, folds=folds)
    summary = {"ingest": ingested, "reconstruct": reconstructed}
    if evaluation:
        summary["evaluate"] = run(evaluate_flow, store, checkpoint, evaluation, protocols=tuple(protocols),
                                  split=split)
    prefect_env.run_logger().info("chain: %d records stored, %d reconstructed%s", ingested["records_stored"],
                                  reconstructed["records"],
                                  f", evaluation in {evaluation}" if evaluation else "")
    return summary
