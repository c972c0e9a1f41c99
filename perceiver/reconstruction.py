"""Batch inference over records: pooled latents, reconstructions of the observed elements, and grids.

For a chunk of records (an :class:`~datasets.format.ElementSet` with its channel table) and a trained model:

- ``latent``: the mean over the latent array per record (``d_latent`` floats), a record embedding;
- per observed element, the reconstruction mean and sigma with every element visible (an auto-encoding
  check: large residuals flag unusual measurements), in normalised and physical units;
- per record, the reconstruction on a *grid*: ``GridSpec.n_times`` times evenly spaced over the record's
  observed time span for each channel the record has timed elements of, and, for channels whose elements
  span wavelengths (spectra), ``GridSpec.n_coords`` wavelengths over the observed range at the record's
  median time of that channel.

Deterministic for given inputs (fixed length-sorted batches, float32 by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from datasets.format import ElementSet
from datasets.loader.batches import ElementDataset, ranges, token_batches
from datasets.normalise import denormalise
from perceiver.inference import Queries, predict
from perceiver.model import Percival


@dataclass
class GridSpec:
    """Where to reconstruct besides the observed elements (0 disables a grid)."""

    #: times per channel, evenly spaced over the record's observed time span
    n_times: int = 64
    #: wavelengths per spectral channel (elements whose coord varies), over the observed range
    n_coords: int = 0
    #: channel names to grid (default: every channel the record has timed elements of)
    channels: list[str] | None = None


@dataclass
class Reconstruction:
    """Arrays for a chunk of records, in the chunk's record and element order."""

    record_id: np.ndarray
    latent: np.ndarray  # (R, d_latent) float32
    mean: np.ndarray  # per element, physical units
    sigma: np.ndarray
    mean_normalised: np.ndarray
    sigma_normalised: np.ndarray
    grid_row_size: np.ndarray  # (R,)
    grid: dict[str, np.ndarray] = field(default_factory=dict)  # time, channel, coord, mean, sigma


def _grid_queries(ds: ElementDataset, items: np.ndarray, spec: GridSpec, allowed: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grid queries of the records ``items`` of ``ds`` (vectorised over records and channels): absolute time,
    channel, coord, and the number of queries per record."""
    idx = ranges(ds.offsets[items], ds.lengths[items])
    rec = np.repeat(np.arange(len(items)), ds.lengths[items])
    t = ds.time[idx].astype(np.float64) + ds.t_ref[items][rec]
    ch, co = ds.channel[idx], ds.coord[idx].astype(np.float64)
    n_ch = len(allowed)
    parts = []  # (record, time, channel, coord) blocks, concatenated then ordered by record

    timed = np.isfinite(t) & allowed[ch]
    if spec.n_times > 0 and timed.any():
        r = np.flatnonzero(timed)
        tmin = np.full(len(items), np.inf)
        tmax = np.full(len(items), -np.inf)
        np.minimum.at(tmin, rec[r], t[r])
        np.maximum.at(tmax, rec[r], t[r])
        pairs, first = np.unique(rec[r] * n_ch + ch[r], return_index=True)
        pr, pc = pairs // n_ch, pairs % n_ch
        frac = np.linspace(0.0, 1.0, spec.n_times)
        parts.append((np.repeat(pr, spec.n_times),
                      (tmin[pr][:, None] + (tmax - tmin)[pr][:, None] * frac).ravel(),
                      np.repeat(pc, spec.n_times), np.repeat(co[r][first], spec.n_times)))  # the band's coord

    spectral = np.isfinite(co) & allowed[ch]
    if spec.n_coords > 0 and spectral.any():
        r = np.flatnonzero(spectral)
        pairs, inverse = np.unique(rec[r] * n_ch + ch[r], return_inverse=True)
        cmin = np.full(len(pairs), np.inf)
        cmax = np.full(len(pairs), -np.inf)
        np.minimum.at(cmin, inverse, co[r])
        np.maximum.at(cmax, inverse, co[r])
        tt = np.where(np.isfinite(t[r]), t[r], 0.0)
        n_t = np.bincount(inverse, weights=np.isfinite(t[r]), minlength=len(pairs))
        tmean = np.where(n_t > 0, np.bincount(inverse, weights=tt, minlength=len(pairs)) / np.maximum(n_t, 1), np.nan)
        keep = cmax > cmin  # a band at one wavelength has no spectral grid
        pr, pc = pairs[keep] // n_ch, pairs[keep] % n_ch
        frac = np.linspace(0.0, 1.0, spec.n_coords)
        parts.append((np.repeat(pr, spec.n_coords), np.repeat(tmean[keep], spec.n_coords), np.repeat(pc, spec.n_coords),
                      (cmin[keep][:, None] + (cmax - cmin)[keep][:, None] * frac).ravel()))

    if not parts:
        return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(len(items), np.int64)
    r, t, c, co = (np.concatenate(x) for x in zip(*parts, strict=True))
    order = np.argsort(r, kind="stable")
    return (t[order], c[order].astype(np.int64), co[order].astype(np.float32),
            np.bincount(r, minlength=len(items)).astype(np.int64))


def reconstruct(model: Percival, elements: ElementSet, channels: pd.DataFrame, grid: GridSpec | None = None,
                max_tokens: int = 16_384, dtype: torch.dtype | None = None) -> Reconstruction:
    """Latents and reconstructions of every record of ``elements`` (see the module docstring)."""
    grid = grid or GridSpec(n_times=0)
    cfg = model.config
    ds = ElementDataset(elements, channels, split=None, modalities=cfg.modalities)
    n_rec, n_el = len(ds), ds.n_elements
    latent = np.zeros((n_rec, cfg.d_latent), np.float32)
    mean_n = np.zeros(n_el, np.float32)
    sigma_n = np.zeros(n_el, np.float32)
    names = channels["name"].astype(str).to_numpy()
    allowed = np.isin(names, grid.channels) if grid.channels is not None else np.ones(len(names), bool)
    grid_parts: dict[int, tuple] = {}
    for items in token_batches(ds.lengths, max_tokens, shuffle=False):
        batch = ds.collate(items)
        pred = predict(model, batch, dtype=dtype)
        latent[items] = pred.latent.numpy()
        # batch elements are the records' elements in order: scatter them back by dataset position
        pos = ranges(ds.offsets[items], ds.lengths[items])
        mean_n[pos], sigma_n[pos] = pred.mean.numpy(), pred.sigma.numpy()
        if grid.n_times > 0 or grid.n_coords > 0:
            t, c, co, counts = _grid_queries(ds, items, grid, allowed)
            g = predict(model, batch, Queries.from_arrays(t, c, co, counts), dtype=dtype)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for k, i in enumerate(items):
                s = slice(bounds[k], bounds[k + 1])
                grid_parts[int(i)] = (t[s], c[s], co[s], g.mean.numpy()[s], g.sigma.numpy()[s])
    mean, sigma = denormalise(mean_n, sigma_n, ds.channel, channels)
    out = Reconstruction(record_id=elements.records["record_id"].astype(str).to_numpy(), latent=latent,
                         mean=mean, sigma=sigma, mean_normalised=mean_n, sigma_normalised=sigma_n,
                         grid_row_size=np.array([len(grid_parts[i][0]) if i in grid_parts else 0
                                                 for i in range(n_rec)], np.int64))
    parts = [grid_parts[i] for i in range(n_rec) if i in grid_parts]
    if parts:
        t, c, co, m, s = (np.concatenate(x) for x in zip(*parts, strict=True))
        gm, gs = denormalise(m, s, c, channels)
        out.grid = {"time": t, "channel": c.astype(np.int16), "coord": co, "mean": gm, "sigma": gs}
    else:
        out.grid = {"time": np.zeros(0), "channel": np.zeros(0, np.int16), "coord": np.zeros(0, np.float32),
                    "mean": np.zeros(0, np.float32), "sigma": np.zeros(0, np.float32)}
    return out
