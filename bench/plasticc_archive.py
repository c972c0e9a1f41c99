"""A seeded PLAsTiCC *test-layout* archive: ``plasticc_test_set_batchK.csv`` + ``plasticc_test_metadata.csv``.

Light curves are resampled from the PLAsTiCC training set (``../shared/data/plasticc/``, else the bundled sample
in ``datasets/samples/plasticc/``): each new object copies a training object's cadence (its MJDs shifted by a
whole number of days, -300..300), passbands, flux errors and ``detected_bool``, with its fluxes scaled by a
log-normal factor (sigma 0.3) plus Gaussian noise of the row's flux error, so cadence and flux/error
distributions are those of the simulation. Metadata rows (redshift, extinction, DDF flag, ``true_target``) are
drawn from the training metadata. Objects are contiguous and sorted by ``object_id`` (as in the real test set);
the last object is cut so that the archive holds exactly ``rows`` rows. Generation is vectorised and written in
blocks of ~1 M rows, so memory stays bounded for 10^8 rows.

    python -m bench.plasticc_archive --rows 20000 --batches 2 --out /tmp/plasticc-test --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "plasticc"
SAMPLE = ROOT / "datasets" / "samples" / "plasticc"
LC_HEADER = "object_id,mjd,passband,flux,flux_err,detected_bool\n"
META_COLUMNS = ["ra", "decl", "ddf_bool", "hostgal_specz", "hostgal_photoz", "hostgal_photoz_err", "distmod",
                "mwebv", "true_target"]
BLOCK_ROWS = 1 << 20


def _find(name: str) -> Path:
    for d in (SHARED, SAMPLE):
        for ext in (".csv.gz", ".csv"):
            if (d / (name + ext)).exists():
                return d / (name + ext)
    raise FileNotFoundError(f"{name}.csv(.gz) is in neither {SHARED} nor {SAMPLE}")


def load_templates() -> tuple[dict[str, np.ndarray], np.ndarray, pd.DataFrame]:
    """Training light curves sorted by object (columns as arrays), each object's row offsets (n_objects+1),
    and the training metadata (with ``true_target`` from ``true_target`` or ``target``)."""
    lc = pacsv.read_csv(_find("plasticc_train_lightcurves")).to_pandas()
    lc = lc.sort_values(["object_id", "mjd"], kind="stable")
    _, counts = np.unique(lc["object_id"].to_numpy(), return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    meta = pacsv.read_csv(_find("plasticc_train_metadata")).to_pandas()
    meta.columns = [c.strip() for c in meta.columns]
    if "true_target" not in meta:
        meta["true_target"] = meta["target"]
    for c in META_COLUMNS:
        if c not in meta:
            meta[c] = np.nan
    return {c: lc[c].to_numpy() for c in ("mjd", "passband", "flux", "flux_err", "detected_bool")}, offsets, \
        meta[META_COLUMNS].reset_index(drop=True)


def write_archive(out: str | Path, rows: int, batches: int = 11, seed: int = 0, compress: bool = False) -> dict:
    """Write a test-layout archive of exactly ``rows`` light-curve rows in ``batches`` files under ``out``;
    returns counts (rows, objects, files, seconds)."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lc, offsets, meta = load_templates()
    lengths = np.diff(offsets)
    ext = ".csv.gz" if compress else ".csv"
    per_batch = np.full(batches, rows // batches)
    per_batch[: rows % batches] += 1
    next_id, objects, metas = 13, 0, []
    for k, n_rows in enumerate(per_batch, start=1):
        path = out / f"plasticc_test_set_batch{k}{ext}"
        with (gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")) as f:
            f.write(LC_HEADER.encode())
            written = 0
            while written < n_rows:  # one block of whole objects (~1 M rows) at a time
                want = min(BLOCK_ROWS, n_rows - written)
                pick = rng.integers(0, len(lengths), size=max(8, 2 * want // max(int(lengths.mean()), 1)))
                n = lengths[pick]
                keep = int(np.searchsorted(np.cumsum(n), want)) + 1  # objects until ``want`` rows are reached
                pick, n = pick[:keep], n[:keep].copy()
                n[-1] -= max(int(n.sum()) - want, 0)  # cut the last object to hit ``want`` exactly
                pick, n = pick[n > 0], n[n > 0]
                obj = np.repeat(np.arange(len(pick)), n)
                within = np.arange(len(obj)) - np.repeat(np.cumsum(n) - n, n)
                src = offsets[pick][obj] + within
                ids = next_id + np.cumsum(rng.integers(1, 40, size=len(pick)))
                next_id = int(ids[-1])
                shift = rng.integers(-300, 301, size=len(pick)).astype(np.float64)
                scale = np.exp(rng.normal(0.0, 0.3, size=len(pick)))
                err = lc["flux_err"][src]
                table = pa.table({
                    "object_id": ids[obj], "mjd": np.round(lc["mjd"][src] + shift[obj], 4),
                    "passband": lc["passband"][src],
                    "flux": np.round(lc["flux"][src] * scale[obj] + rng.normal(0.0, 1.0, len(src)) * err, 6),
                    "flux_err": err, "detected_bool": lc["detected_bool"][src]})
                pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False))
                m = meta.iloc[rng.integers(0, len(meta), size=len(pick))].reset_index(drop=True)
                metas.append(m.assign(object_id=ids)[["object_id", *META_COLUMNS]])
                written += len(src)
                objects += len(pick)
    meta_path = out / f"plasticc_test_metadata{ext}"
    with (gzip.open(meta_path, "wb", compresslevel=1) if compress else open(meta_path, "wb")) as f:
        pd.concat(metas, ignore_index=True).to_csv(f, index=False)
    return {"rows": int(rows), "objects": objects, "files": batches + 1,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, required=True, help="light-curve rows in all batches together")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=11, help="batch files (default 11, as the real test set)")
    p.add_argument("--gzip", action="store_true", help="write .csv.gz files")
    args = p.parse_args(argv)
    print(write_archive(args.out, args.rows, args.batches, args.seed, args.gzip))


if __name__ == "__main__":
    main()
