"""Reconstruction quality on full PhysioNet 2019 and full PLAsTiCC, against the baselines, in one run.

    .venv/bin/python bench/quality.py [--data ../shared/data] [--steps 2000] [--preset small] [--out DIR]

For each dataset: ingest from ../shared/data, train (``--steps`` steps of the ``--preset`` model on the train
split), evaluate on the test split with the fixed seeded protocols — (a) 30 % of elements hidden at random,
and for PhysioNet (b) the labs hidden from vitals and static — scored on the same hidden elements for the model
and the baselines (channel mean, forward fill, linear interpolation; their constant σ fitted on val).
Prints the headline ratios against the targets and a final JSON line; the full tables are in
``OUT/<dataset>/evaluation/evaluation.md``. Skips with a message where the data is absent.

Targets (issue "Pipelines"): model MSE ≤ 0.7 × linear interpolation (a) on both; PhysioNet labs hidden (b)
≤ 0.8 × channel mean; 95 % coverage between 0.92 and 0.97.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = {"physionet2019": ("physionet2019", ("holdout", "modality:labs")),
            "plasticc": ("plasticc", ("holdout",))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=list(DATASETS), default=None)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "physionet2019").is_dir() or not (data / "plasticc").is_dir():
        print(f"SKIP: reference data not found under {data}")
        return 0
    from datasets.ingest import ingest
    from pipelines.evaluate import evaluate_flow
    from pipelines.train import train_flow

    out = Path(args.out or tempfile.mkdtemp(prefix="percival-quality-"))
    results = {}
    for name, (folder, protocols) in DATASETS.items():
        if args.only and name != args.only:
            continue
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        store = str(d / "store.zarr")
        t0 = time.perf_counter()
        ingest(name, str(data / folder), store, workers=2)
        t_ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        trained = train_flow(store, str(d / "model"), preset=args.preset, steps=args.steps, overrides=args.set)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate_flow(store, str(d / "model"), str(d / "evaluation"), protocols=protocols)
        t_eval = time.perf_counter() - t0
        doc = json.loads(Path(ev["json"]).read_text())
        res = {"ingest_s": round(t_ingest, 1), "train_s": round(t_train, 1), "evaluate_s": round(t_eval, 1),
               "steps": trained["steps"], "train_loss": trained["train_loss"], "protocols": {}}
        for p in doc["protocols"]:
            m = p["metrics"]
            overall = {k: v.get("overall", {}) for k, v in m.items()}
            res["protocols"][p["protocol"]] = {
                "n_elements": p["n_elements"],
                "model_mse": overall["model"].get("mse"),
                "mse_vs_linear_interpolation": overall["model"]["mse"] / overall["linear_interpolation"]["mse"],
                "mse_vs_channel_mean": overall["model"]["mse"] / overall["channel_mean"]["mse"],
                "model_coverage95": overall["model"].get("coverage95"),
                "model_coverage68": overall["model"].get("coverage68"),
            }
        results[name] = res
        print(f"\n== {name}: {json.dumps(res, indent=1)}\n   tables: {ev['markdown']}")
    results["config"] = {"preset": args.preset, "steps": args.steps, "overrides": args.set, "out": str(out)}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
