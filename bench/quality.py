"""Reconstruction quality on full PhysioNet 2019 and full PLAsTiCC, against the baselines, in one command.

    .venv/bin/python bench/quality.py --split val  [--steps N] [--preset small] [--set SECTION.FIELD=VALUE]
    .venv/bin/python bench/quality.py --split test [same options]    # once per released configuration

For each dataset: ingest from ../shared/data, train (``--steps`` steps of the ``--preset`` model on the train
split; a model already trained in ``OUT`` with the same settings is resumed, i.e. reused), evaluate on
``--split`` with the fixed seeded protocols of ``percival evaluate`` -- (a) 30 % of elements hidden at random,
for PhysioNet (b) the labs hidden from vitals and static, for PLAsTiCC (c) the u band hidden from the others --
scored on the same hidden elements for the model
and every baseline (channel mean, per-record mean, forward fill, linear interpolation, gradient boosting
trained on the train split with the decoder's evidence). Choices are made on ``val``; ``test`` is scored once
per configuration that is reported.

Writes ``bench/results/quality-<date>-<split>.json`` (``--results``): the command, the commit, the CPU model,
the preset and overrides, the split, and per dataset and protocol every method's overall metrics and the model's
ratios against each baseline. The full tables are in ``OUT/<dataset>/evaluation/evaluation.md``. Skips with a
message where the data is absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model, git_commit  # noqa: E402  (bench/machine.py, beside this script)

from pipelines.options import scoped  # noqa: E402

DATASETS = {"physionet2019": ("physionet2019", ("holdout", "modality:labs")),
            "plasticc": ("plasticc", ("holdout", "channel:lsst_u"))}


def dataset_settings(name: str, steps: list[str], sets: list[str]) -> tuple[int, list[str]]:
    """The training steps and config overrides of dataset ``name`` from ``--steps`` / ``--set`` items (plain
    items apply to every dataset, ``DATASET=N`` / ``DATASET:override`` to that one)."""
    n = 2000
    for item in steps:
        key, _, value = item.rpartition("=")
        if key in ("", name):
            n = int(value)
    return n, scoped(sets, name)


def load_split_run(store_url: str, checkpoint: str, split: str):
    """The store, the trained model and the elements of every record of ``split``, read once for the
    reconstruction checks below."""
    from datasets.store import open_store
    from pipelines.run.config import load_run

    store = open_store(store_url)
    model, _ = load_run(checkpoint)
    ids = store.records["record_id"][store.records["split"] == split].astype(str).tolist()
    return store, model, store.select(ids)


def outside_valid_range(store, model, elements, n_times: int = 64) -> dict:
    """Reconstruct every record of ``elements`` (all elements visible, a grid of ``n_times`` per timed channel)
    and count means and 95 % bounds outside their channel's declared valid range."""
    import numpy as np

    from pipelines.run.reconstruction import GridSpec, reconstruct

    rec = reconstruct(model, elements, store.channels, GridSpec(n_times=n_times), folds=0)
    lo, hi = (store.channels[k].to_numpy(np.float64) for k in ("valid_min", "valid_max"))
    out = {"records": int(elements.n_records)}
    keys = ("mean", "lower95", "upper95")
    for where, codes, arrays in (("elements", elements.channel, {k: getattr(rec, k) for k in keys}),
                                 ("grid", rec.grid["channel"], rec.grid)):
        codes = np.asarray(codes, np.int64)
        low, high = np.nan_to_num(lo[codes], nan=-np.inf), np.nan_to_num(hi[codes], nan=np.inf)
        out[where] = {"n": len(codes), "bounded": int((np.isfinite(lo[codes]) | np.isfinite(hi[codes])).sum()),
                      **{k: int(((arrays[k] < low) | (arrays[k] > high)).sum()) for k in keys}}
    return out


def sampling_cost(store, model, elements, n_samples: int = 16) -> dict:
    """Seconds to reconstruct every element of ``elements`` once (one pass, no grid, no folds) and with
    ``n_samples`` draws of each (what ``reconstruct --samples`` adds), in this process."""
    from pipelines.run.reconstruction import GridSpec, reconstruct

    seconds = {}
    for k in (0, n_samples):
        t0 = time.perf_counter()
        reconstruct(model, elements, store.channels, GridSpec(n_times=0), folds=0, n_samples=k)
        seconds[k] = time.perf_counter() - t0
    return {"head": model.config.head.name, "records": int(elements.n_records), "elements": int(elements.n_elements),
            "one_pass_s": round(seconds[0], 1), f"with_{n_samples}_samples_s": round(seconds[n_samples], 1),
            "ratio": round(seconds[n_samples] / seconds[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--split", choices=("val", "test"), required=True,
                    help="val for choices; test once per reported configuration")
    ap.add_argument("--steps", action="append", default=[], metavar="[DATASET=]N",
                    help="training steps, for every dataset or for one (repeatable; default 2000)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], metavar="[DATASET:]SECTION.FIELD=VALUE",
                    help="config override, for every dataset or for one (repeatable)")
    ap.add_argument("--out", default=None, help="working folder (stores, models, evaluations)")
    ap.add_argument("--only", choices=list(DATASETS), default=None)
    ap.add_argument("--results", default=None, help="result file (default bench/results/quality-DATE-SPLIT.json)")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "physionet2019").is_dir() or not (data / "plasticc").is_dir():
        print(f"SKIP: reference data not found under {data}")
        return 0
    from datasets.ingest import ingest
    from pipelines.evaluate import evaluate_flow
    from pipelines.train import train_flow

    out = Path(args.out or tempfile.mkdtemp(prefix="percival-quality-"))
    results = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commit": git_commit(),
               "cpu": cpu_model(), "date": datetime.date.today().isoformat(), "split": args.split,
               "preset": args.preset, "steps": args.steps, "overrides": args.set, "datasets": {}}
    for name, (folder, protocols) in DATASETS.items():
        if args.only and name != args.only:
            continue
        steps, overrides = dataset_settings(name, args.steps, args.set)
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        store = str(d / "store.zarr")
        t0 = time.perf_counter()
        ingest(name, str(data / folder), store, workers=2)
        t_ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        trained = train_flow(store, str(d / "model"), preset=args.preset, steps=steps, overrides=overrides)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate_flow(store, str(d / "model"), str(d / f"evaluation-{args.split}"), protocols=protocols,
                           split=args.split)
        t_eval = time.perf_counter() - t0
        doc = json.loads(Path(ev["json"]).read_text())
        res = {"ingest_s": round(t_ingest, 1), "train_s": round(t_train, 1), "evaluate_s": round(t_eval, 1),
               "overrides": overrides, "steps": trained["steps"], "train_loss": trained["train_loss"], "protocols": {}}
        for p in doc["protocols"]:
            overall = {k: v.get("overall", {}) for k, v in p["metrics"].items()}
            distribution = p.get("distribution", {})
            model_mse = overall["model"].get("mse")
            res["protocols"][p["protocol"]] = {
                "split": p["score_split"], "n_elements": p["n_elements"], "n_records": p["n_records"],
                "overall": overall,
                "model_mse_vs": {k: (model_mse / v["mse"] if model_mse is not None and v.get("mse") else None)
                                 for k, v in overall.items() if k != "model"},
                "evidence": p.get("evidence", {}), "distribution": distribution}
        res["sub_nyquist_rms"] = doc.get("sub_nyquist_rms", {})
        scored = load_split_run(store, str(d / "model"), args.split)
        t0 = time.perf_counter()
        res["outside_valid_range"] = outside_valid_range(*scored)
        res["outside_valid_range"]["seconds"] = round(time.perf_counter() - t0, 1)
        res["sampling_cost"] = sampling_cost(*scored)
        results["datasets"][name] = res
        print(f"\n== {name}: {json.dumps(res['protocols'], indent=1, default=str)[:4000]}\n"
              f"   tables: {ev['markdown']}", flush=True)
    path = Path(args.results or ROOT / "bench" / "results" / f"quality-{results['date']}-{args.split}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
