"""Make the shipped pretrained models (``perceiver/pretrained/<name>/``) from the full shared data, in one command.

    .venv/bin/python bench/pretrained.py [--work DIR] [--only physionet2019|plasticc]

For each dataset: ingest ``../shared/data/<name>`` (all of it), train the released configuration
(:data:`RELEASES`: the ``small`` preset with the settings of the README's quality table; a model already
trained in ``DIR`` with the same settings is reused), evaluate it on the full data's test split (the README's
protocols), then check it on the bundled samples: every sample record of the samples' test split must be in the
full data's test split (so not in the training data), and the model is scored there with 30 % of the elements
hidden against linear interpolation. The checkpoint (``config.json``: configuration and data contract;
``model.safetensors``) is copied into the package with a ``card.json``: data, licence, attribution, this
command and commit, and the measured quality. Skips with a message where the data is absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model, git_commit  # noqa: E402  (bench/machine.py, beside this script)

PRETRAINED = ROOT / "perceiver" / "pretrained"
COMMON = ["train.threads=1", "train.precision=fp32", "train.eval_every=500"]
#: name -> (steps, overrides, protocols on the test split, card text); the README quality table's configuration,
#: trained in memory (train.block_elements above the train split) as that table's models were
RELEASES = {
    "physionet2019": (6000, [*COMMON, "masking.modality_dropout=0.4", "train.block_elements=1000000000"],
                      ("holdout", "modality:labs"), {
        "summary": "ICU stays: 34 vitals and laboratory values, 6 static; the small preset (Gaussian head)",
        "training_data": "PhysioNet/Computing in Cardiology Challenge 2019, training sets A and B: the train split "
                         "(80 % of the 40,331 stays by a hash of the stay id)",
        "data_licence": "CC BY 4.0",
        "attribution": "Reyna et al., 'Early Prediction of Sepsis From Clinical Data: The PhysioNet/Computing in "
                       "Cardiology Challenge 2019', Crit Care Med 2020; Goldberger et al., PhysioNet, Circulation "
                       "2000"}),
    "plasticc": (4000, [*COMMON, "train.block_elements=1000000000"], ("holdout", "channel:lsst_u"), {
        "summary": "LSST-like light curves: 6 passbands (u g r i z y) and 2 static values (redshift, MW "
                   "extinction); the small preset (Gaussian head)",
        "training_data": "PLAsTiCC training set (unblinded release): the train split (80 % of the 7,848 objects "
                         "by a hash of the object id)",
        "data_licence": "CC BY 4.0",
        "attribution": "The PLAsTiCC team, Kessler et al., 'Models and Simulations for the Photometric LSST "
                       "Astronomical Time Series Classification Challenge (PLAsTiCC)', PASP 131 (2019)"}),
}


def overall(doc: dict, protocol: str) -> dict:
    p = next(x for x in doc["protocols"] if x["protocol"] == protocol)
    mse = {m: v.get("overall", {}).get("mse") for m, v in p["metrics"].items()}
    return {"n_records": p["n_records"], "n_elements": p["n_elements"], "mse": mse,
            "mse_vs_linear_interpolation": (mse["model"] / mse["linear_interpolation"]
                                            if mse.get("linear_interpolation") else None),
            "mse_vs_gradient_boost": mse["model"] / mse["gradient_boost"] if mse.get("gradient_boost") else None,
            "cov95": p["metrics"]["model"]["overall"].get("coverage95")}


def samples_check(name: str, checkpoint: str, full_store: str, work: Path) -> dict:
    """The bundled samples' test records are in the full data's test split; the model's MSE there (30 % hidden)
    against linear interpolation."""
    from datasets.ingest import ingest
    from datasets.store import open_store
    from pipelines.evaluate import evaluate_flow

    store = str(work / "samples.zarr")
    ingest(name, str(ROOT / "datasets" / "samples" / name), store)
    samples, full = open_store(store).records, open_store(full_store).records.set_index("record_id")
    test_ids = samples.loc[samples["split"] == "test", "record_id"]
    missing = sorted(set(test_ids) - set(full.index))
    splits = full.loc[list(set(test_ids) & set(full.index)), "split"].value_counts().to_dict()
    if missing or set(splits) != {"test"}:
        raise SystemExit(f"{name}: sample test records outside the full test split: missing {missing[:5]}, "
                         f"splits {splits}")
    ev = evaluate_flow(store, checkpoint, str(work / "samples-evaluation"), protocols=("holdout",), split="test")
    return {"test_records": len(test_ids), "in_full_test_split": int(splits.get("test", 0)),
            "holdout": overall(json.loads(Path(ev["json"]).read_text()), "holdout")}


def release(name: str, data: Path, work: Path, command: str, commit: str, trained_commit: str) -> dict:
    from datasets.ingest import ingest
    from perceiver.checkpoint import weights_sha256
    from pipelines.evaluate import evaluate_flow
    from pipelines.train import train_flow

    steps, overrides, protocols, card = RELEASES[name]
    work.mkdir(parents=True, exist_ok=True)
    store, model = str(work / "store.zarr"), str(work / "model")
    ingest(name, str(data / name), store, workers=2)
    trained = train_flow(store, model, preset="small", steps=steps, overrides=overrides)
    ev = evaluate_flow(store, model, str(work / "evaluation-test"), protocols=protocols, split="test")
    test = {p: overall(json.loads(Path(ev["json"]).read_text()), p) for p in protocols}
    check = samples_check(name, model, store, work)
    out = PRETRAINED / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(Path(model) / f, out / f)
    quality = [f"test split, {p}: MSE {q['mse']['model']:.3f} (normalised), "
               + (f"{q['mse_vs_linear_interpolation']:.2f}x linear interpolation, "
                  if q["mse_vs_linear_interpolation"] else "")
               + f"{q['mse_vs_gradient_boost']:.2f}x gradient boost, cov95 {q['cov95']:.3f} "
               f"({q['n_elements']:,} hidden elements of {q['n_records']:,} records)" for p, q in test.items()]
    s = check["holdout"]
    quality.append(f"bundled samples' test split ({check['test_records']} records, all in the full test split), "
                   f"30 % hidden: MSE {s['mse']['model']:.3f}, {s['mse_vs_linear_interpolation']:.2f}x linear "
                   "interpolation")
    doc = {"name": name, **card, "weights_sha256": weights_sha256(out), "preset": "small", "steps": trained["steps"],
           "overrides": overrides,
           "train_loss": trained["train_loss"], "command": command, "commit": commit,
           "trained_at_commit": trained_commit, "cpu": cpu_model(),
           "date": datetime.date.today().isoformat(), "quality": quality, "test": test, "samples": check}
    (out / "card.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"\n== {name}: {out}\n   " + "\n   ".join(quality), flush=True)
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--work", default=None, help="working folder (stores, models, evaluations); reused")
    ap.add_argument("--only", choices=list(RELEASES), default=None)
    ap.add_argument("--trained-commit", default=None, metavar="SHA",
                    help="the commit whose code trained the weights, where a model trained earlier in --work with "
                         "the same settings (e.g. by bench/quality.py) is reused; default: this commit")
    args = ap.parse_args()
    data = Path(args.data)
    if not all((data / name).is_dir() for name in RELEASES):
        print(f"SKIP: reference data not found under {data}")
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="percival-pretrained-"))
    command = " ".join(["bench/pretrained.py", *sys.argv[1:]])
    commit = git_commit()  # before this command writes its models into the checkout
    for name in RELEASES:
        if args.only in (None, name):
            release(name, data, work / name, command, commit, args.trained_commit or commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
