"""Ingest throughput on the full reference data, against a naive baseline measured in the same run.

    .venv/bin/python bench/ingest.py [--data ../shared/data] [--skip-naive]

PhysioNet 2019 (both zips, 40,331 stays): the naive baseline is what a notebook would do, pandas
``read_csv`` of every stay straight from the zip, writing nothing. Percival is measured three ways:
``percival ingest`` as a subprocess (wall clock including interpreter and Prefect start-up, with a warm
Prefect home, as after a user's first flow), the flow's own work, and the plain Python API without Prefect.
PLAsTiCC (7,848 objects): the ingest work (plain API) and the Prefect start-up separately.
Prints a table and a final JSON line. The ``percival`` command starts its temporary Prefect API server
before importing the flow, so its start-up is less than an empty flow's (Prefect's own ephemeral mode).
Skips with a message where the data is absent.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def naive_physionet(zips: list[Path]) -> tuple[float, int]:
    """pandas ``read_csv`` of every stay straight from the zip: the seconds count only the reads; the
    measured cells are counted (same definition of an element) outside the timer."""
    seconds, n = 0.0, 0
    for z in zips:
        with zipfile.ZipFile(z) as zf:
            for name in zf.namelist():
                if name.endswith(".psv"):
                    t0 = time.perf_counter()
                    df = pd.read_csv(io.BytesIO(zf.read(name)), sep="|")
                    seconds += time.perf_counter() - t0
                    n += int(df.iloc[:, :34].notna().to_numpy().sum()) + int(df.iloc[:1, 34:39].notna().sum().sum())
    return seconds, n


def cli_ingest(source: str, path: Path, store: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "percival"), "ingest", source, str(path), "--store",
                          str(store)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    return wall, json.loads(out.stdout[out.stdout.index("{"):])


def prefect_startup() -> float:
    """Wall clock of a process that runs one empty Prefect flow (interpreter + import + API start-up)."""
    code = ("from pipelines import prefect_env\nfrom prefect import flow\n"
            "@flow\ndef empty():\n    return 1\nempty()\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    data = Path(args.data)
    pn, pl = data / "physionet2019", data / "plasticc"
    if not (pn / "training_setA.zip").exists() or not (pl / "plasticc_train_lightcurves.csv.gz").exists():
        print(f"SKIP: reference data not found under {data}")
        return 0
    from datasets.ingest import ingest

    work = Path(tempfile.mkdtemp(prefix="percival-bench-"))
    results: dict = {}
    try:
        prefect_startup()  # warm the Prefect home (database created once per user)
        startup = min(prefect_startup() for _ in range(2))
        results["prefect_startup_s"] = round(startup, 2)

        zips = sorted(pn.glob("*.zip"))
        if not args.skip_naive:
            t, n = naive_physionet(zips)
            results["physionet_naive"] = {"seconds": round(t, 2), "elements": n, "elements_per_s": round(n / t)}
        wall, summary = cli_ingest("physionet2019", pn, work / "pn_cli.zarr")
        results["physionet_cli"] = {"seconds": round(wall, 2), "flow_work_seconds": summary["seconds"],
                                    "elements": summary["elements_stored"],
                                    "elements_per_s": round(summary["elements_read"] / wall),
                                    "reconciles": summary["reconciles"]}
        t0 = time.perf_counter()
        r = ingest("physionet2019", str(pn), str(work / "pn_api.zarr"), workers=2)
        t = time.perf_counter() - t0
        results["physionet_api"] = {"seconds": round(t, 2), "elements_per_s": round(r.elements_read / t)}
        if "physionet_naive" in results:
            results["physionet_cli_speedup_vs_naive"] = round(results["physionet_naive"]["seconds"] / wall, 2)

        t0 = time.perf_counter()
        r = ingest("plasticc", str(pl), str(work / "pl_api.zarr"))
        t = time.perf_counter() - t0
        results["plasticc_api"] = {"seconds": round(t, 2), "elements": r.elements_stored,
                                   "elements_per_s": round(r.elements_read / t), "reconciles": r.reconciles}
        wall, summary = cli_ingest("plasticc", pl, work / "pl_cli.zarr")
        results["plasticc_cli"] = {"seconds": round(wall, 2), "flow_work_seconds": summary["seconds"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'case':<34} {'seconds':>8} {'elements/s':>12}")
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"{k:<34} {v['seconds']:>8} {v.get('elements_per_s', ''):>12}")
    print(f"{'prefect start-up (empty flow)':<34} {results['prefect_startup_s']:>8}")
    overhead = results["physionet_cli"]["seconds"] - results["physionet_cli"]["flow_work_seconds"]
    print(f"{'CLI start-up + shut-down':<34} {overhead:>8.2f}   (PhysioNet CLI wall - flow work)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
