"""Invented rhythms: how much a grid reconstruction varies faster than its channel's own sampling supports.

A channel observed every ``g`` hours in a record carries no information at periods shorter than ``2 g`` (its
Nyquist period): a reconstruction curve that wiggles there invents structure. For each (record, channel)
with at least :data:`MIN_OBSERVATIONS` timed observations, a grid of ``n_grid`` evenly spaced times between
the channel's first and last observation is reconstructed (every element of the record visible, as
``reconstruct`` does), the straight line through the curve's end points is removed (so that the periodic
transform sees no jump), and the RMS of the Fourier components at periods shorter than twice the channel's
median gap in that record is the curve's *sub-Nyquist RMS* (normalised units). The same number for a PCHIP
interpolant of the observations on the same grid points (monotone between observations: no invented
rhythm) is the reference. Where the grid is coarser than the channel's sampling (a light curve observed nightly
over three years, on 64 points) it cannot show such periods at all and both numbers are 0.

    from pipelines.run.rhythms import sub_nyquist_rms
    table = sub_nyquist_rms(model, ds, records=np.arange(200))   # {modality: {"model", "pchip", "curves"}}
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import PchipInterpolator

from datasets.loader import ElementDataset
from perceiver.model import Percival
from perceiver.queries import Queries, predict

#: observations a (record, channel) needs for a curve to be scored
MIN_OBSERVATIONS = 3


def high_frequency_rms(curves: np.ndarray, dt: np.ndarray, min_period: np.ndarray) -> np.ndarray:
    """Per row of ``curves`` (n, G; sampled every ``dt``): the RMS of its components at periods shorter than
    ``min_period``, after removing the line through its end points."""
    n, g = curves.shape
    line = curves[:, :1] + (curves[:, -1:] - curves[:, :1]) * np.linspace(0.0, 1.0, g)
    spectrum = np.fft.rfft(curves - line, axis=1)
    freq = np.fft.rfftfreq(g)[None, :] / dt[:, None]  # cycles per time unit
    fast = freq * min_period[:, None] > 1.0  # period = 1 / freq < min_period
    high = np.fft.irfft(np.where(fast, spectrum, 0.0), n=g, axis=1)
    return np.sqrt(np.mean(high**2, axis=1))


def sub_nyquist_rms(model: Percival, ds: ElementDataset, records: np.ndarray | None = None, n_grid: int = 64,
                    max_tokens: int = 16_384) -> dict[str, dict[str, float]]:
    """Per modality: the mean over its scored curves of the model's and of PCHIP's sub-Nyquist RMS, and the
    number of curves (see the module docstring). ``records``: positions in ``ds`` (default all)."""
    from datasets.loader import token_batches

    records = np.arange(len(ds)) if records is None else np.asarray(records, np.int64)
    rows: list[tuple[int, float, float]] = []  # (modality, model rms, pchip rms)
    for batch_items in token_batches(ds.lengths[records], max_tokens, shuffle=False):
        items = records[batch_items]
        curves = _curves(ds, items, n_grid)
        if not curves:
            continue
        counts = np.bincount([c[0] for c in curves], minlength=len(items))
        grid_t = np.concatenate([c[2] for c in curves])
        grid_c = np.concatenate([np.full(n_grid, c[1]) for c in curves])
        pred = predict(model, ds.collate(items), Queries.from_arrays(grid_t, grid_c, np.nan, counts * n_grid))
        mean = pred.mean.numpy().reshape(-1, n_grid)
        pchip = np.stack([PchipInterpolator(c[3], c[4])(c[2] - ds.t_ref[items[c[0]]]) for c in curves])
        dt = np.array([(c[2][-1] - c[2][0]) / (n_grid - 1) for c in curves])
        nyquist = np.array([2.0 * np.median(np.diff(c[3])) for c in curves])
        for c, m, p in zip(curves, high_frequency_rms(mean, dt, nyquist), high_frequency_rms(pchip, dt, nyquist),
                           strict=True):
            rows.append((int(ds.channel_modality[c[1]]), float(m), float(p)))
    out = {}
    for m, name in enumerate(ds.modalities):
        sel = [r for r in rows if r[0] == m]
        if sel:
            model_rms, pchip_rms = np.mean([r[1] for r in sel]), np.mean([r[2] for r in sel])
            out[name] = {"model": float(model_rms), "pchip": float(pchip_rms), "curves": len(sel),
                         "model_vs_pchip": float(model_rms / pchip_rms) if pchip_rms > 0 else float("nan")}
    return out


def _curves(ds: ElementDataset, items: np.ndarray, n_grid: int) -> list[tuple]:
    """For records ``items`` (batch order): (position in the batch, channel, absolute grid times, the channel's
    relative observation times, their normalised values) per (record, channel) with enough distinct times."""
    out = []
    for k, r in enumerate(items):  # one iteration per record; channels are grouped with numpy below
        s = slice(ds.offsets[r], ds.offsets[r + 1])
        t, ch, v = ds.time[s].astype(np.float64), ds.channel[s], ds.value[s].astype(np.float64)
        coord = ds.coord[s]
        timed = np.isfinite(t)
        for c in np.unique(ch[timed]):
            m = timed & (ch == c)
            if len(np.unique(coord[m][np.isfinite(coord[m])])) > 1:
                continue  # a spectrum (many wavelengths): a curve along wavelength, not time
            tc, first = np.unique(t[m], return_index=True)  # PCHIP needs strictly increasing times
            if len(tc) < MIN_OBSERVATIONS:
                continue
            grid = np.linspace(tc[0], tc[-1], n_grid) + ds.t_ref[r]
            out.append((k, int(c), grid, tc, v[m][first]))
    return out
