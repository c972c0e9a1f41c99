"""Batch-inference throughput of ``reconstruct`` over full PLAsTiCC: one process vs 2 Dask workers, one run.

    .venv/bin/python bench/inference.py [--data ../shared/data] [--checkpoint DIR] [--steps 200]

Ingests PLAsTiCC (7,848 objects, 1.44 M elements) from ../shared/data, trains a small model for a few steps
unless a checkpoint is given (throughput does not depend on how well it is trained), then runs the
``reconstruct`` flow twice on the same machine: single process, and a local Dask cluster of 2 worker
processes (1 torch thread each). Prints records/s and elements/s of each and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--grid-times", type=int, default=32)
    ap.add_argument("--folds", type=int, default=None,
                    help="out-of-sample folds (default: reconstruct's default; 0 = in-sample only)")
    args = ap.parse_args()
    pl = Path(args.data) / "plasticc"
    if not (pl / "plasticc_train_lightcurves.csv.gz").exists():
        print(f"SKIP: PLAsTiCC not found under {pl}")
        return 0
    from datasets.ingest import ingest
    from datasets.store import open_store
    from pipelines.reconstruct import reconstruct_flow
    from pipelines.train import train_flow

    work = Path(tempfile.mkdtemp(prefix="percival-bench-inference-"))
    try:
        store = str(work / "plasticc.zarr")
        ingest("plasticc", str(pl), store)
        n_el = open_store(store).n_elements
        ckpt = args.checkpoint or str(work / "ckpt")
        if args.checkpoint is None:
            train_flow(store, ckpt, preset="small", steps=args.steps)
        results = {"folds": args.folds}
        fold_kw = {} if args.folds is None else {"folds": args.folds}
        for name, kw in (("single_process", {}), ("dask_2_workers", {"workers": 2})):
            t0 = time.perf_counter()
            s = reconstruct_flow(store, ckpt, str(work / f"{name}.zarr"), grid_times=args.grid_times, **kw,
                                 **fold_kw)
            t = time.perf_counter() - t0
            results[name] = {"seconds": round(t, 2), "records": s["records"],
                             "records_per_s": round(s["records"] / t, 1), "elements_per_s": round(n_el / t)}
        results["dask_speedup"] = round(results["single_process"]["seconds"] / results["dask_2_workers"]["seconds"], 2)
        results["cpus"] = os.cpu_count()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'mode':<16} {'seconds':>8} {'records/s':>10} {'elements/s':>11}")
    for k in ("single_process", "dask_2_workers"):
        r = results[k]
        print(f"{k:<16} {r['seconds']:>8} {r['records_per_s']:>10} {r['elements_per_s']:>11}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
