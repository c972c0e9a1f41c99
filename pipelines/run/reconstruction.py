"""Batch inference over records: pooled latents, reconstructions of the observed elements, and grids.

For a chunk of records (an :class:`~datasets.format.ElementSet` with its channel table) and a trained model:

- ``latent``: the mean over the latent array per record (``d_latent`` floats), a record embedding;
- per observed element, the reconstruction mean and sigma with every element visible (an auto-encoding
  check), in normalised and physical units;
- per observed element, with ``folds`` = k >= 2 (default :data:`DEFAULT_FOLDS`), an *out-of-sample*
  reconstruction made without that element: each record's elements are dealt into k folds
  (:func:`fold_assignment`), and for fold f the elements of fold f are hidden from the encoder and predicted
  from the others. Since the element's own value never reaches the encoder, its standardised residual
  ``residual_z = (z - mean_oos_normalised) / sqrt(sigma_oos_normalised^2 + e^2)`` (``e`` the normalised
  measurement error, 0 where unknown) says how unusual the value is given the rest of its record: the
  score to sort an archive by when scanning it for anomalies. The in-sample residual cannot do this (the
  model was shown the value it reconstructs);
- per record, the reconstruction on a *grid*: ``GridSpec.n_times`` times evenly spaced over the record's
  observed time span for each channel the record has timed elements of, and, for channels whose elements
  span wavelengths (spectra), ``GridSpec.n_coords`` wavelengths over the observed range at the record's
  median time of that channel. Time curves are band-limited at the channel's own Nyquist period in the record
  (:func:`pipelines.run.rhythms.band_limit`; ``GridSpec.band_limit``), so that they show no rhythm the channel's
  sampling cannot support.

Choosing k: each out-of-sample prediction sees (k-1)/k of its record, so more folds give a context closer to
the in-sample one (sharper predictions, a smaller sigma, more sensitive scores) at the price of k encoder
passes per record (the decoder still answers each element once). The default, 5, hides 20 % of a record per
pass: less than the 30 % the training plans hide, so the model predicts from the kind of context it was
trained on, with more to go on, for 5 encoder passes (on the bundled PhysioNet sample, small preset, one
CPU thread, the whole ``reconstruct`` took about 2.2 times as long as with ``folds=0``). A record with
fewer than 2 elements has nothing to predict from once its element is hidden: its out-of-sample mean,
sigma and residual are NaN. ``folds`` = 0 or 1 disables the out-of-sample outputs (their fields are then
None). A strong outlier is visible when its neighbours' folds are predicted and pulls them towards it, so
they may get moderate residuals of the opposite sign: read the scores from the largest |residual_z| down.

Deterministic for given inputs (fixed length-sorted batches, float32 by default); the fold of an element
depends only on its record's id, its position in the record, the record's length, k and ``fold_seed``,
never on which other records are reconstructed with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from datasets.format import ElementSet
from datasets.loader import ElementDataset, token_batches
from datasets.loader.contract import median_gaps
from datasets.normalise import denormalise, interval
from perceiver.model import Percival
from perceiver.packing import offsets_from_counts, ranges, segment_ids
from pipelines.run.inference import Queries, predict, predict_hidden
from pipelines.run.rhythms import band_limit

#: out-of-sample folds per record by default (see the module docstring for the choice)
DEFAULT_FOLDS = 5


@dataclass
class GridSpec:
    """Where to reconstruct besides the observed elements (0 disables a grid)."""

    #: times per channel, evenly spaced over the record's observed time span
    n_times: int = 64
    #: wavelengths per spectral channel (elements whose coord varies), over the observed range
    n_coords: int = 0
    #: channel names to grid (default: every channel the record has timed elements of)
    channels: list[str] | None = None
    #: smooth each time curve at its channel's Nyquist period in the record (:func:`pipelines.run.rhythms.band_limit`)
    band_limit: bool = True


@dataclass
class Reconstruction:
    """Arrays for a chunk of records, in the chunk's record and element order."""

    record_id: np.ndarray
    latent: np.ndarray  # (R, d_latent) float32
    mean: np.ndarray  # per element, physical units
    sigma: np.ndarray
    lower95: np.ndarray  # the 95 % interval, computed in normalised space and mapped back (physical units)
    upper95: np.ndarray
    mean_normalised: np.ndarray
    sigma_normalised: np.ndarray
    grid_row_size: np.ndarray  # (R,)
    grid: dict[str, np.ndarray] = field(default_factory=dict)  # time, channel, coord, mean, sigma, lower95, upper95
    #: out-of-sample outputs per element (None where folds are off; NaN for records of fewer than 2 elements)
    folds: int = 0
    fold: np.ndarray | None = None  # int16, the element's fold (0..folds-1)
    mean_oos: np.ndarray | None = None  # physical units
    sigma_oos: np.ndarray | None = None
    mean_oos_normalised: np.ndarray | None = None
    sigma_oos_normalised: np.ndarray | None = None
    residual_z: np.ndarray | None = None  # (z - mean_oos_normalised) / sqrt(sigma_oos_normalised^2 + e^2)
    #: with n_samples = K > 0: K draws per element (E, K; physical units), their mean and 2.5 / 97.5 % quantiles
    samples: np.ndarray | None = None
    samples_mean: np.ndarray | None = None
    samples_lower95: np.ndarray | None = None
    samples_upper95: np.ndarray | None = None


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each uint64 (vectorised, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def fold_assignment(record_ids, row_size: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """The out-of-sample fold (int16, ``0..folds-1``) of every element of packed records.

    Per record, its elements are shuffled by a hash of (``seed``, record id, position in the record) and dealt
    round-robin into the folds, so fold sizes differ by at most one and a record of at least 2 elements keeps
    at least one element visible in every fold. The assignment of a record depends on nothing else (not on
    the other records of a chunk or batch). Vectorised over elements; one hash per record id.
    """
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    row_size = np.asarray(row_size, np.int64)
    offsets = offsets_from_counts(row_size)
    rec = segment_ids(offsets)
    h = np.array([int.from_bytes(hashlib.blake2b(f"{seed}\x1f{r}".encode(), digest_size=8).digest(), "little")
                  for r in record_ids], dtype=np.uint64)
    if len(h) != len(row_size):
        raise ValueError("one record id per record is needed")
    position = (np.arange(int(offsets[-1])) - offsets[rec]).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(h[rec] + _splitmix64(position))
    order = np.lexsort((key, rec))
    rank = np.empty(len(rec), np.int64)
    rank[order] = np.arange(len(rec)) - offsets[rec[order]]
    return (rank % folds).astype(np.int16)


def _out_of_sample(model: Percival, ds: ElementDataset, batches: list[np.ndarray], fold: np.ndarray, folds: int,
                   dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised mean and sigma of every element predicted with its fold hidden (NaN for records of fewer
    than 2 elements). Per batch and fold one packed masked copy of the batch: the fold's elements invisible
    and queried, the records without an element in that fold left out."""
    n_rec = len(ds)
    rec = segment_ids(ds.offsets)
    counts = np.bincount(rec * folds + fold, minlength=n_rec * folds).reshape(n_rec, folds)
    counts[ds.lengths < 2] = 0
    hidden = [fold == f for f in range(folds)]
    mean, sigma = np.full(ds.n_elements, np.nan, np.float32), np.full(ds.n_elements, np.nan, np.float32)
    for items in batches:
        for f in range(folds):
            sel = items[counts[items, f] > 0]
            if len(sel):
                q, pred = predict_hidden(model, ds, sel, hidden[f], dtype)
                mean[q], sigma[q] = pred.mean.numpy(), pred.sigma.numpy()
    return mean, sigma


def _grid_queries(ds: ElementDataset, items: np.ndarray, spec: GridSpec, allowed: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grid queries of the records ``items`` of ``ds`` (vectorised over records and channels): absolute time,
    channel, coord, the number of queries per record, whether each query is on a time curve (those come in
    blocks of ``spec.n_times``, in order), and per time curve its channel's Nyquist period in the record (twice
    its median gap; the contract's ``time_min_period`` where the record has fewer than two of its times)."""
    idx = ranges(ds.offsets[items], ds.lengths[items])
    rec = segment_ids(offsets_from_counts(ds.lengths[items]))
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
        pairs, first, curve = np.unique(rec[r] * n_ch + ch[r], return_index=True, return_inverse=True)
        pr, pc = pairs // n_ch, pairs % n_ch
        frac = np.linspace(0.0, 1.0, spec.n_times)
        parts.append((np.repeat(pr, spec.n_times),
                      (tmin[pr][:, None] + (tmax - tmin)[pr][:, None] * frac).ravel(),
                      np.repeat(pc, spec.n_times), np.repeat(co[r][first], spec.n_times),  # the band's coord
                      np.ones(len(pr) * spec.n_times, bool)))
        nyquist = 2.0 * median_gaps(t[r], curve, len(pairs))
        fallback = np.array([c.time_min_period for c in ds.contract.channels])[pc]
        nyquist = np.where(np.isfinite(nyquist), nyquist, fallback)
    else:
        nyquist = np.zeros(0)

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
                      (cmin[keep][:, None] + (cmax - cmin)[keep][:, None] * frac).ravel(),
                      np.zeros(len(pr) * spec.n_coords, bool)))

    if not parts:
        return (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(len(items), np.int64),
                np.zeros(0, bool), nyquist)
    r, t, c, co, on_curve = (np.concatenate(x) for x in zip(*parts, strict=True))
    order = np.argsort(r, kind="stable")  # keeps each record's time curves in pair order, as ``nyquist``
    return (t[order], c[order].astype(np.int64), co[order].astype(np.float32),
            np.bincount(r, minlength=len(items)).astype(np.int64), on_curve[order], nyquist)


def reconstruct(model: Percival, elements: ElementSet, channels: pd.DataFrame, grid: GridSpec | None = None,
                max_tokens: int = 16_384, dtype: torch.dtype | None = None, folds: int = DEFAULT_FOLDS,
                fold_seed: int = 0, n_samples: int = 0, sample_seed: int = 0) -> Reconstruction:
    """Latents and reconstructions of every record of ``elements`` (see the module docstring), normalised
    and denormalised with the model's data contract (``channels``, the store's channel table, only says what
    the element channel codes mean). Elements of channels outside the contract get NaN outputs.

    ``folds`` (k) >= 2 adds the out-of-sample outputs (each element predicted with its fold of the record
    hidden, at about k times the encoder cost; default 5); 0 or 1 leaves them out. ``fold_seed`` seeds the
    per-record fold draw (:func:`fold_assignment`).

    ``n_samples`` = K > 0 adds K draws of every element (every element visible) and of every grid point
    (band-limited like the grid's mean), joint over a record's queries where the head models that
    (:meth:`perceiver.heads.OutputHead.sample`), mapped to physical units draw by draw (so inside each
    channel's valid range), with their mean and 2.5 / 97.5 % quantiles. The draws are seeded by
    ``sample_seed`` and the batch: the same input and settings give the same draws.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if folds < 0:
        raise ValueError(f"folds must be >= 0 (0 or 1: no out-of-sample outputs), got {folds}")
    grid = grid or GridSpec(n_times=0)
    contract = model.config.contract
    ds = ElementDataset(elements, channels, contract)
    n_rec, n_el = len(ds), ds.n_elements
    latent = np.zeros((n_rec, model.config.sizes.d_latent), np.float32)
    mean_n = np.zeros(n_el, np.float32)
    sigma_n = np.zeros(n_el, np.float32)
    draws_n = np.zeros((n_el, n_samples), np.float32)
    names = np.asarray(contract.channel_names)
    allowed = np.isin(names, grid.channels) if grid.channels is not None else np.ones(len(names), bool)
    grid_parts: dict[int, tuple] = {}
    batches = token_batches(ds.lengths, max_tokens, shuffle=False)
    for b, items in enumerate(batches):
        batch = ds.collate(items)
        seeds = np.random.SeedSequence([sample_seed, b]).generate_state(2)  # elements, grid: distinct streams
        pred = predict(model, batch, dtype=dtype, n_samples=n_samples, seed=int(seeds[0]))
        latent[items] = pred.latent.numpy()
        # batch elements are the records' elements in order: scatter them back by dataset position
        pos = ranges(ds.offsets[items], ds.lengths[items])
        mean_n[pos], sigma_n[pos] = pred.mean.numpy(), pred.sigma.numpy()
        if n_samples:
            draws_n[pos] = pred.samples.numpy().T
        if grid.n_times > 0 or grid.n_coords > 0:
            t, c, co, counts, on_curve, nyquist = _grid_queries(ds, items, grid, allowed)
            g = predict(model, batch, Queries.from_arrays(t, c, co, counts), dtype=dtype, n_samples=n_samples,
                        seed=int(seeds[1]))
            draws = g.samples.numpy().T if n_samples else np.zeros((len(t), 0), np.float32)
            # per grid point: mean, sigma, then the draws (band-limited together: one kernel per curve)
            values = np.column_stack([g.mean.numpy(), g.sigma.numpy(), draws]).astype(np.float32)
            if grid.band_limit and on_curve.any():
                dt = np.diff(t[on_curve].reshape(-1, grid.n_times)[:, :2], axis=1)[:, 0] if grid.n_times > 1 else 0
                values[on_curve] = band_limit(values[on_curve].reshape(-1, grid.n_times, values.shape[1]), dt,
                                              nyquist).reshape(-1, values.shape[1])
            g_mean, g_sigma, g_draws = values[:, 0], values[:, 1], values[:, 2:]
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for k, i in enumerate(items):
                s = slice(bounds[k], bounds[k + 1])
                grid_parts[int(i)] = (t[s], c[s], co[s], g_mean[s], g_sigma[s], g_draws[s])
    def aligned(x: np.ndarray, fill=np.nan) -> np.ndarray:
        """Per dataset element -> per input element (``fill`` for elements of channels outside the contract)."""
        if n_el == elements.n_elements:
            return x
        full = np.full(elements.n_elements, fill, x.dtype)
        full[ds.element_index] = x
        return full

    mean, sigma = denormalise(mean_n, sigma_n, ds.channel, contract)
    lower, upper = interval(mean_n, sigma_n, ds.channel, contract)
    out = Reconstruction(record_id=elements.records["record_id"].astype(str).to_numpy(), latent=latent,
                         mean=aligned(mean), sigma=aligned(sigma), lower95=aligned(lower.astype(np.float32)),
                         upper95=aligned(upper.astype(np.float32)), mean_normalised=aligned(mean_n),
                         sigma_normalised=aligned(sigma_n),
                         grid_row_size=np.array([len(grid_parts[i][0]) if i in grid_parts else 0
                                                 for i in range(n_rec)], np.int64))
    if n_samples:
        draws = _physical_draws(draws_n, ds.channel, contract)
        out.samples = np.stack([aligned(d) for d in draws.T], axis=1)
        out.samples_mean, out.samples_lower95, out.samples_upper95 = (aligned(x) for x in _draw_summary(draws))
    if folds >= 2:
        fold = fold_assignment(out.record_id, ds.lengths, folds, fold_seed)
        m_oos, s_oos = _out_of_sample(model, ds, batches, fold, folds, dtype)
        e = np.nan_to_num(ds.error, nan=0.0)
        m_phys, s_phys = denormalise(m_oos, s_oos, ds.channel, contract)
        out.folds, out.fold = folds, aligned(fold, fill=-1)
        out.mean_oos_normalised, out.sigma_oos_normalised = aligned(m_oos), aligned(s_oos)
        out.mean_oos, out.sigma_oos = aligned(m_phys), aligned(s_phys)
        out.residual_z = aligned(((ds.value - m_oos) / np.sqrt(s_oos**2 + e**2)).astype(np.float32))
    parts = [grid_parts[i] for i in range(n_rec) if i in grid_parts]
    if parts:
        t, c, co, m, s, d = (np.concatenate(x) for x in zip(*parts, strict=True))
        gm, gs = denormalise(m, s, c, contract)
        gl, gu = interval(m, s, c, contract)
        out.grid = {"time": t, "channel": ds.store_channel[c].astype(np.int16), "coord": co, "mean": gm,
                    "sigma": gs, "lower95": gl.astype(np.float32), "upper95": gu.astype(np.float32)}
    else:
        out.grid = {"time": np.zeros(0), "channel": np.zeros(0, np.int16), "coord": np.zeros(0, np.float32),
                    **{k: np.zeros(0, np.float32) for k in ("mean", "sigma", "lower95", "upper95")}}
        c, d = np.zeros(0, np.int64), np.zeros((0, n_samples), np.float32)
    if n_samples:
        draws = _physical_draws(d, c, contract)
        out.grid |= {"samples": draws, **dict(zip(("samples_mean", "samples_lower95", "samples_upper95"),
                                                  _draw_summary(draws), strict=True))}
    return out


def _physical_draws(draws: np.ndarray, channel: np.ndarray, contract) -> np.ndarray:
    """Normalised draws (N, K) in physical units, each one mapped back (inside its channel's valid range)."""
    flat = np.ascontiguousarray(draws).ravel()
    return denormalise(flat, np.zeros_like(flat), np.repeat(channel, draws.shape[1]), contract)[0].reshape(draws.shape)


def _draw_summary(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean and the 2.5 / 97.5 % quantiles of draws (N, K), per row."""
    if draws.shape[0] == 0:
        return tuple(np.zeros(0, np.float32) for _ in range(3))
    with np.errstate(invalid="ignore", over="ignore"):
        lo, hi = np.quantile(draws, [0.025, 0.975], axis=1)
        return draws.mean(1).astype(np.float32), lo.astype(np.float32), hi.astype(np.float32)
