"""The ``demo`` flow: ingest -> train -> reconstruct -> evaluate on the bundled real samples.

Every bundled sample is ingested (PhysioNet 2019, PLAsTiCC, ZTF, MACHO, DESI). First the shipped pretrained
models (:mod:`perceiver.pretrained`) reconstruct the PhysioNet and PLAsTiCC samples and are scored on the
samples' test split (records they were not trained on): a good reconstruction within the first minute. Then a
small model is trained on
the PhysioNet sample's train split, reconstructs every stay (latents, reconstructions, time grids) and is
evaluated against the baselines on the test split's hidden elements (30 % hidden at random; the labs hidden
from vitals and static). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path

from prefect import flow

from datasets.sources import REGISTRY
from datasets.store import open_store
from perceiver.pretrained import shipped_models
from pipelines.evaluate import evaluate_flow
from pipelines.ingest import ingest_flow
from pipelines.reconstruct import reconstruct_flow
from pipelines.train import train_flow

#: the demo's training run: the small preset, briefly (minutes on 2 cores)
DEMO_STEPS = 300
DEMO_OVERRIDES = ["train.warmup_steps=30", "train.eval_every=100", "train.checkpoint_every=100",
                  "train.batch_tokens=4096", "train.log_every=20", "train.precision=fp32",
                  "train.threads=1"]  # one thread: robust when another process shares the 2 cores


def sample_dir() -> Path:
    """Where the bundled real samples live (installed with the package)."""
    return Path(str(resources.files("datasets") / "samples"))


def shipped_model_look(name: str, store: str, out_dir: Path) -> dict:
    """Batch inference with the shipped model ``name`` over the sample ``store`` (every record, 48 grid times per
    channel), and its score on the samples' test split (30 % of the elements hidden) against the baselines."""
    t0 = time.perf_counter()
    rec = str(out_dir / f"{name}-shipped-reconstruction.zarr")
    reconstructed = reconstruct_flow(store, name, rec, grid_times=48, folds=0)
    evaluated = evaluate_flow(store, name, str(out_dir / f"{name}-shipped-evaluation"), protocols=("holdout",))
    holdout = evaluated["protocols"]["holdout"]
    print(f"shipped model {name}: {reconstructed['records']:,} records reconstructed into {rec}; on the samples' "
          f"test split, 30 % hidden: MSE {holdout['mse']['model']:.3f} (normalised), "
          f"{holdout['mse_vs_linear']:.2f}x linear interpolation ({time.perf_counter() - t0:.0f} s)")
    return {"reconstruction": rec, "records": reconstructed["records"], "evaluation": evaluated["markdown"],
            "mse": holdout["mse"]["model"], "mse_vs_linear": holdout["mse_vs_linear"]}


@flow(name="demo", log_prints=True)
def demo_flow(out: str = "percival-demo", steps: int = DEMO_STEPS, preset: str = "small", workers: int = 2) -> dict:
    """Run the whole pipeline on the bundled samples into ``out``; returns where everything is."""
    t0 = time.perf_counter()
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    shipped: dict[str, dict] = {}
    stores = {}
    for name in sorted(REGISTRY, key=lambda n: n not in shipped_models()):  # the shipped models' data first
        path = sample_dir() / name
        if name == "table" or not path.is_dir():
            continue
        stores[name] = str(out_dir / f"{name}.zarr")
        ingest_flow(name, str(path), stores[name], workers=workers)
        if name in shipped_models():
            shipped[name] = shipped_model_look(name, stores[name], out_dir)
    store = stores["physionet2019"]
    checkpoint = str(out_dir / "physionet-model")
    trained = train_flow(store, checkpoint, preset=preset, steps=steps, overrides=DEMO_OVERRIDES)
    rec = str(out_dir / "physionet-reconstruction.zarr")
    reconstructed = reconstruct_flow(store, checkpoint, rec, grid_times=48)
    evaluated = evaluate_flow(store, checkpoint, str(out_dir / "evaluation"), protocols=("holdout", "modality:labs"))
    return {"out": str(out_dir), "stores": stores,
            "records": {k: open_store(v).n_records for k, v in stores.items()},
            "checkpoint": checkpoint, "train_loss": trained["train_loss"], "reconstruction": rec,
            "reconstructed_records": reconstructed["records"], "evaluation": evaluated["markdown"],
            "plots": evaluated["plots"], "seconds": round(time.perf_counter() - t0, 1), "shipped": shipped,
            "cpus": os.cpu_count()}
