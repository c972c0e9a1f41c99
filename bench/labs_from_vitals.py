"""How far can PhysioNet labs be predicted from vitals and static data at all? A gradient-boosting reference.

    .venv/bin/python bench/labs_from_vitals.py [--store STORE.zarr | --data ../shared/data] [--train-records 8000]

Protocol (b) of ``bench/quality.py`` hides every lab of a stay and asks for them from its vitals and static
data. This bench fits scikit-learn's ``HistGradientBoostingRegressor`` (one model, channel as a categorical
feature) to the train split's lab elements with hand-made features that use the same visible data: the
stay's static values; per vital its mean, std, min, max and count over the stay, and its value nearest the
lab's time (within 6 h); the lab's channel and time. It is scored on every lab element of the test split
in normalised units, against the channel mean of the training records -- the same quantities
``bench/quality.py`` reports for the model. A second fit adds the stay's *measurement pattern* of labs
(how many of each lab were drawn, and how many labs at the lab's hour), which the model is not shown.

Needs scikit-learn (``pip install -e ".[bench]"``; not a dependency of Percival itself) and skips cleanly without it or
without the data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VITALS, LABS, STATIC = "vitals", "labs", "static"


def frame(store, split: str, max_records: int | None) -> pd.DataFrame:
    """One row per element of ``split``: record, channel, time (h), normalised value, modality name."""
    from perceiver.evaluation import load_split

    ds = load_split(store, split, None, max_records)
    record = np.repeat(np.arange(len(ds)), ds.lengths)
    return pd.DataFrame({"rec": record, "ch": ds.channel, "t": ds.time, "v": ds.value,
                         "mod": np.asarray(ds.modalities)[ds.channel_modality[ds.channel]]})


def features(df: pd.DataFrame, pattern: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """Feature rows for the lab elements of ``df`` (vectorised: group-bys and as-of merges)."""
    labs, vit, st = df[df["mod"] == LABS], df[df["mod"] == VITALS], df[df["mod"] == STATIC]
    X = labs[["rec", "ch", "t"]].copy()
    s = st.pivot_table(index="rec", columns="ch", values="v", aggfunc="first")
    s.columns = [f"static{c}" for c in s.columns]
    agg = vit.groupby(["rec", "ch"])["v"].agg(["mean", "std", "count", "min", "max"]).unstack()
    agg.columns = [f"vital{c}_{a}" for a, c in agg.columns]
    X = X.join(s, on="rec").join(agg, on="rec").join(df.groupby("rec")["t"].max().rename("stay_hours"), on="rec")
    X = X.sort_values("t").reset_index()
    for c in np.unique(vit["ch"]):
        near = vit[vit["ch"] == c][["rec", "t", "v"]].dropna(subset=["t"]).sort_values("t")
        X = pd.merge_asof(X, near.rename(columns={"v": f"vital{c}_near"}), on="t", by="rec",
                          direction="nearest", tolerance=6.0)
    X = X.set_index("index").sort_index()
    if pattern:
        drawn = labs.groupby(["rec", "ch"]).size().unstack(fill_value=0)
        drawn.columns = [f"drawn{c}" for c in drawn.columns]
        X = X.join(drawn, on="rec").join(labs.groupby(["rec", "t"]).size().rename("labs_this_hour"), on=["rec", "t"])
    return X.drop(columns="rec"), labs["v"].loc[X.index].to_numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--store", default=None, help="an ingested PhysioNet store (else ingested from --data)")
    ap.add_argument("--train-records", type=int, default=8000)
    args = ap.parse_args()
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError:
        print("SKIP: scikit-learn is not installed (pip install scikit-learn)")
        return 0
    from datasets.ingest import ingest
    from datasets.store import open_store

    store_path = args.store
    if store_path is None:
        if not (Path(args.data) / "physionet2019").is_dir():
            print(f"SKIP: reference data not found under {args.data}")
            return 0
        store_path = str(Path(tempfile.mkdtemp(prefix="percival-labs-")) / "physionet.zarr")
        ingest("physionet2019", str(Path(args.data) / "physionet2019"), store_path, workers=2)
    store = open_store(store_path)
    train, test = frame(store, "train", args.train_records), frame(store, "test", None)
    means = train[train["mod"] == LABS].groupby("ch")["v"].mean()
    for pattern in (False, True):
        t0 = time.perf_counter()
        X, y = features(train, pattern)
        Xt, yt = features(test, pattern)
        keep = [c for c in X.columns if X[c].nunique() > 1]
        model = HistGradientBoostingRegressor(max_iter=400, learning_rate=0.1, max_leaf_nodes=63,
                                              categorical_features=[keep.index("ch")], random_state=0)
        model.fit(X[keep], y)
        pred = model.predict(Xt.reindex(columns=keep))
        base = means.reindex(Xt["ch"]).fillna(0.0).to_numpy()
        mse, mse_mean = np.mean((pred - yt) ** 2), np.mean((base - yt) ** 2)
        label = "vitals + static + lab measurement pattern" if pattern else "vitals + static"
        print(f"{label}: MSE {mse:.3f} vs channel mean {mse_mean:.3f} = {mse / mse_mean:.3f}x "
              f"({len(yt):,} test lab elements, {args.train_records:,} train records, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
