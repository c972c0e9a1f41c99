"""The reconstruction store: what batch inference writes, aligned with the input store.

Zarr v3, written through :class:`~datasets.store.appendable.AppendableGroup` (the same commit protocol as
the element-set store), readable by ``xarray.open_zarr``:

- ``record``: ``record_id``, ``row_size`` (elements, as in the input store), ``grid_row_size``, ``latent``
  (record x ``latent_index``: the pooled latent), optionally ``latents`` (record x n_latents*d_latent);
- ``element`` (aligned element for element with the input store's records, in their order): ``mean``,
  ``sigma``, ``lower95``, ``upper95`` (the channel's physical unit; the 95 % interval is computed in the
  normalised space and mapped back, so it is asymmetric for ``asinh`` channels), ``mean_normalised``,
  ``sigma_normalised``; where the run had
  out-of-sample folds (attrs ``percival.folds`` >= 2) also ``mean_oos``, ``sigma_oos`` (physical),
  ``mean_oos_normalised``, ``sigma_oos_normalised`` and ``residual_z`` (each element predicted with its fold
  hidden, and its standardised residual; NaN for records of fewer than 2 elements);
- ``grid``: ``grid_time``, ``grid_channel``, ``grid_coord``, ``grid_mean``, ``grid_sigma``,
  ``grid_lower95``, ``grid_upper95`` (the reconstruction on requested grids; ``grid_row_size`` per record);
- ``completed_shard``: ``shard_key`` (shards of input records already written: a re-run skips them);
- attrs ``percival``: input store, checkpoint and its SHA-256, model config, grid, code version, times.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from datasets.store import _zarr
from datasets.store.appendable import AppendableGroup, StoreError

FORMAT = "percival-reconstruction"
DIMENSIONS = ("record", "element", "grid", "completed_shard")
ELEMENT_ARRAYS = {"mean": np.float32, "sigma": np.float32, "lower95": np.float32, "upper95": np.float32,
                  "mean_normalised": np.float32, "sigma_normalised": np.float32}
#: out-of-sample element arrays (present where the store was created with folds >= 2) and their attributes
OOS_ARRAYS = {
    "mean_oos": {"long_name": "out-of-sample reconstruction mean (the element's fold hidden), in the "
                              "channel's unit (input store's channel table)"},
    "sigma_oos": {"long_name": "out-of-sample reconstruction sigma (the element's fold hidden), in the "
                               "channel's unit (input store's channel table)"},
    "mean_oos_normalised": {"long_name": "out-of-sample reconstruction mean, normalised units", "units": "1"},
    "sigma_oos_normalised": {"long_name": "out-of-sample reconstruction sigma, normalised units", "units": "1"},
    "residual_z": {"long_name": "standardised out-of-sample residual (z - mean_oos_normalised) / "
                                "sqrt(sigma_oos_normalised^2 + e^2), e the normalised measurement error "
                                "(0 where unknown)", "units": "1"},
}
GRID_ARRAYS = {"time": np.float64, "channel": np.int16, "coord": np.float32, "mean": np.float32,
               "sigma": np.float32, "lower95": np.float32, "upper95": np.float32}
#: arrays of stores made with samples (K draws per element and per grid point; also ``grid_<name>``)
SAMPLE_ARRAYS = {
    "samples": {"long_name": "draws of the reconstruction (joint over a record where the head models that), in the "
                             "channel's unit", "comment": "dimension sample: the draw"},
    "samples_mean": {"long_name": "mean of the draws, in the channel's unit"},
    "samples_lower95": {"long_name": "2.5 % quantile of the draws, in the channel's unit"},
    "samples_upper95": {"long_name": "97.5 % quantile of the draws, in the channel's unit"},
}


def store_samples(meta: dict) -> int:
    """Draws per element of a store's (or a run's) ``percival`` metadata: 0 where off or absent."""
    return int(meta.get("samples") or 0)


def store_folds(meta: dict) -> int:
    """The out-of-sample folds of a store's (or a run's) ``percival`` metadata: 0 where off or absent."""
    k = int(meta.get("folds") or 0)
    return k if k >= 2 else 0


class ReconstructionWriter:
    """Append shards of reconstructed records, each shard one commit, in the order given."""

    def __init__(self, url: str, provenance: dict, d_latent: int, storage_options: dict | None = None):
        self.out = AppendableGroup(url, {"format": FORMAT, **provenance}, DIMENSIONS, storage_options,
                                   attrs={"title": "Percival reconstructions", "Conventions": "CF-1.11"})
        try:
            self._open(url, provenance, d_latent)
        except BaseException:  # release the lock: a retried commit in this thread must not wait for it
            self.out.close()
            raise

    def _open(self, url: str, provenance: dict, d_latent: int) -> None:
        if self.out.created:
            o = self.out
            o.create_array("record_id", str, "record", {"cf_role": "timeseries_id"})
            o.create_array("row_size", np.int64, "record", {"sample_dimension": "element"})
            o.create_array("grid_row_size", np.int64, "record", {"sample_dimension": "grid"})
            o.create_array("latent", np.float32, "record", {"long_name": "mean of the latent array"}, width=d_latent)
            for name, dt in ELEMENT_ARRAYS.items():
                o.create_array(name, dt, "element", {"long_name": f"reconstruction {name}"}, big=True)
            if store_folds(provenance):
                for name, attrs in OOS_ARRAYS.items():
                    o.create_array(name, np.float32, "element", attrs, big=True)
            for name, dt in GRID_ARRAYS.items():
                o.create_array(f"grid_{name}", dt, "grid", provenance.get("time_attrs") if name == "time" else None,
                               big=True)
            k = store_samples(provenance)
            for prefix, dim in (("", "element"), ("grid_", "grid")) if k else ():
                for name, attrs in SAMPLE_ARRAYS.items():
                    o.create_array(prefix + name, np.float32, dim, attrs, big=True,
                                   **({"width": k, "width_dim": "sample"} if name == "samples" else {}))
            o.create_array("shard_key", str, "completed_shard")
            o.commit()
        else:
            same = {k: self.out.meta.get(k) for k in ("input_store", "checkpoint_sha256")}
            want = {k: provenance.get(k) for k in same}
            if same != want:
                raise StoreError(f"{url} holds reconstructions of {same}, not {want}: choose another output")
            missing = [n for n in (*ELEMENT_ARRAYS, *(f"grid_{g}" for g in GRID_ARRAYS))
                       if n not in self.out.group.array_keys()]
            if missing:
                raise StoreError(f"{url} was written by an older Percival (it lacks {missing}): choose another "
                                 "output")
            if store_folds(self.out.meta) != store_folds(provenance):
                raise StoreError(f"{url} holds reconstructions with folds={store_folds(self.out.meta)}, not "
                                 f"{store_folds(provenance)}: choose another output or the same folds")
            if store_samples(self.out.meta) != store_samples(provenance):
                raise StoreError(f"{url} holds reconstructions with samples={store_samples(self.out.meta)}, not "
                                 f"{store_samples(provenance)}: choose another output or the same samples")
        self.oos = bool(store_folds(self.out.meta))
        self.samples = store_samples(self.out.meta)
        n = self.out.count("completed_shard")
        self.completed = set(self.out.group["shard_key"][:n].tolist()) if n else set()

    @property
    def records_done(self) -> int:
        """Input records ``[0, records_done)`` are committed (the output is always a prefix of the input)."""
        return int(self.out.meta.get("input_records_done", self.out.count("record")))

    def append_range(self, start: int, stop: int, rec: dict[str, np.ndarray]) -> int:
        """Input records ``[start, stop)``, reconstructed, committed after the prefix already there; returns
        how many were new. A range already committed (a retried commit, or another run that got there
        first, with any shard size) is skipped or cut to its new part, never stored twice; a gap is an
        error, never a hole."""
        done = self.records_done
        if stop <= done:
            return 0
        if start > done:
            raise StoreError(f"{self.out.url}: records {start}..{stop} would leave a gap after record {done}")
        rec = _drop_leading_records(rec, done - start)
        self.out.meta["input_records_done"] = stop
        self.append(f"{start}-{stop}", rec)
        return stop - done

    def append(self, key: str, rec: dict[str, np.ndarray]) -> None:
        """One shard (arrays as :func:`reconstruction_arrays` gives them), then commit."""
        o = self.out
        o.append("record", {"record_id": rec["record_id"].astype(object), "row_size": rec["row_size"],
                            "grid_row_size": rec["grid_row_size"], "latent": rec["latent"]})
        if self.oos and any(name not in rec for name in OOS_ARRAYS):
            raise StoreError(f"{o.url}: the store holds out-of-sample outputs, the shard has none")
        sampled = tuple(SAMPLE_ARRAYS) if self.samples else ()
        if sampled and any(name not in rec for name in sampled):
            raise StoreError(f"{o.url}: the store holds {self.samples} draws per element, the shard has none")
        o.append("element", {name: rec[name] for name in (*ELEMENT_ARRAYS, *(OOS_ARRAYS if self.oos else ()),
                                                          *sampled)})
        o.append("grid", {f"grid_{name}": rec[f"grid_{name}"] for name in (*GRID_ARRAYS, *sampled)})
        o.append("completed_shard", {"shard_key": np.array([key], dtype=object)})
        o.commit()
        self.completed.add(key)

    def close(self) -> None:
        self.out.close()

    def __enter__(self) -> ReconstructionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_leading_records(rec: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The shard without its first ``k`` records (their elements and grid points too)."""
    if k == 0:
        return rec
    e, g = int(rec["row_size"][:k].sum()), int(rec["grid_row_size"][:k].sum())
    out = {n: rec[n][k:] for n in ("record_id", "row_size", "grid_row_size", "latent")}
    out |= {n: rec[n][e:] for n in (*ELEMENT_ARRAYS, *OOS_ARRAYS, *SAMPLE_ARRAYS) if n in rec}
    out |= {f"grid_{n}": rec[f"grid_{n}"][g:] for n in (*GRID_ARRAYS, *SAMPLE_ARRAYS) if f"grid_{n}" in rec}
    return out


def reconstruction_arrays(r, row_size: np.ndarray) -> dict[str, np.ndarray]:
    """A :class:`pipelines.run.reconstruction.Reconstruction` as the flat arrays the writer stores (and stages)."""
    return {"record_id": np.asarray(r.record_id, dtype=str), "row_size": np.asarray(row_size, np.int64),
            "grid_row_size": r.grid_row_size, "latent": r.latent, "mean": r.mean, "sigma": r.sigma,
            "lower95": r.lower95, "upper95": r.upper95,
            "mean_normalised": r.mean_normalised, "sigma_normalised": r.sigma_normalised,
            **{name: getattr(r, name) for name in OOS_ARRAYS if getattr(r, name, None) is not None},
            **{name: getattr(r, name) for name in SAMPLE_ARRAYS if getattr(r, name, None) is not None},
            **{f"grid_{k}": v for k, v in r.grid.items()}}


def committed_meta(url: str, storage_options: dict | None = None) -> dict:
    """The last commit's ``percival`` attribute of a reconstruction store (no arrays read); {} where none."""
    try:
        group = _zarr.open_committed(url, storage_options)
    except (FileNotFoundError, StoreError):
        return {}
    meta = dict(_zarr.percival_meta(group.attrs) or {}) if group is not None else {}
    return meta if meta.get("format") == FORMAT else {}


def open_reconstruction(url: str, storage_options: dict | None = None) -> dict:
    """The committed reconstructions as numpy arrays and a records DataFrame (for notebooks and evaluate)."""
    g = _zarr.open_committed(url, storage_options)  # meta and shapes from this one read
    if g is None:
        raise StoreError(f"{url}: not a Percival reconstruction store (no zarr.json)")
    meta = dict(_zarr.percival_meta(g.attrs) or {})
    if meta.get("format") != FORMAT:
        raise StoreError(f"{url}: not a Percival reconstruction store")
    records = pd.DataFrame({"record_id": g["record_id"][:].astype(object), "row_size": g["row_size"][:],
                            "grid_row_size": g["grid_row_size"][:]})
    out = {"meta": meta, "records": records, "latent": g["latent"][:],
           "content_hash": _zarr.content_hash(g)}
    out.update({name: g[name][:] for name in ELEMENT_ARRAYS if name in g})  # older stores lack the intervals
    out.update({name: g[name][:] for name in OOS_ARRAYS if name in g})
    out.update({prefix + name: g[prefix + name][:] for name in SAMPLE_ARRAYS for prefix in ("", "grid_")
                if prefix + name in g})
    out.update({f"grid_{name}": g[f"grid_{name}"][:] for name in GRID_ARRAYS if f"grid_{name}" in g})
    return out
