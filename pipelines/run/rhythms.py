"""Invented rhythms: how much a grid reconstruction varies faster than its channel's own sampling supports,
and the band limit that keeps it from doing so.

A grid curve of a (record, channel) is smoothed by :func:`band_limit` before it is written (``reconstruct``;
:class:`pipelines.run.reconstruction.GridSpec` ``band_limit``): a twiced Gaussian kernel (``2 G - G G``)
whose Gaussian has a standard deviation of :data:`BAND_LIMIT_FRACTION` of the channel's Nyquist period in that
record (twice its median gap; where the record has fewer than two of its times, the contract's per-channel
``time_min_period``), applied in normalised space, so means and intervals stay inside the channel's valid
range. Its gain is 0.50 at the Nyquist period, 0.014 at half of it, 0.93 at twice it and 0.98 at three
times it: the decoder's evidence from other, faster channels (hourly vitals for a daily lab) no longer draws
hour-scale wiggles on a daily channel, while changes that the channel's own observations resolve are kept.

Chosen on the PhysioNet validation split (first 200 records for the sub-Nyquist RMS against PCHIP's; first
150 for the RMS distance of the grid curves from the observations, vitals, normalised units), against the
decoder's own curves (labs 1.36x, vitals 1.01x; distance 0.232):

=====================  ======  ======  ========  =============================================
kernel                 labs    vitals  distance  synthetic test (tiny model, 300 steps)
=====================  ======  ======  ========  =============================================
Gaussian, 0.0625       0.86x   0.93x   0.233
Gaussian, 0.125        0.47x   0.69x   0.244     1.29x (fails; 0.98x after 800 steps)
twiced, 0.25 (chosen)  0.22x   0.33x   0.265     0.48x
Gaussian, 0.25         0.13x   0.19x   0.297     0.30x
=====================  ======  ======  ========  =============================================

The twiced kernel holds the aim (<= 1.0x) with a margin also for a less trained, wigglier decoder, at half
the distance cost of a Gaussian of the same strength.

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
    table = sub_nyquist_rms(model, ds, records=np.arange(200))
    # {modality: {"model" (band-limited, as written), "model_raw" (the decoder's curve), "pchip", "curves", ...}}
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import PchipInterpolator

from datasets.loader import ElementDataset
from perceiver.model import Percival
from perceiver.queries import Queries, predict

#: observations a (record, channel) needs for a curve to be scored
MIN_OBSERVATIONS = 3
#: the band limit's Gaussian standard deviation, as a fraction of the channel's Nyquist period
BAND_LIMIT_FRACTION = 0.25
#: curves smoothed per (curves x G x G) kernel block
_BLOCK = 512


def band_limit(curves: np.ndarray, dt: np.ndarray, min_period: np.ndarray) -> np.ndarray:
    """Rows of ``curves`` (n, G; or n, G, m: m curves on the same times; row i sampled every ``dt[i]``)
    smoothed by a twiced Gaussian kernel (Tukey's twicing, ``2 G - G G``: gain ``1 - (1 - g)^2`` where the
    Gaussian's is ``g``) of standard deviation :data:`BAND_LIMIT_FRACTION` ``* min_period[i]``, renormalised at
    the curve's ends; rows whose ``min_period`` or ``dt`` is not a positive number are returned unchanged."""
    curves = np.asarray(curves, np.float64)
    out = curves.copy()
    g = curves.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = BAND_LIMIT_FRACTION * np.asarray(min_period, np.float64) / np.asarray(dt, np.float64)  # grid steps
    rows = np.flatnonzero(np.isfinite(sd) & (sd > 0))
    lag = (np.arange(g)[:, None] - np.arange(g)[None, :]).astype(np.float64)
    for a in range(0, len(rows), _BLOCK):
        r = rows[a:a + _BLOCK]
        w = np.exp(-0.5 * (lag[None] / sd[r, None, None]) ** 2)
        w /= w.sum(-1, keepdims=True)
        once = np.einsum("cij,cj...->ci...", w, curves[r])
        out[r] = 2 * once - np.einsum("cij,cj...->ci...", w, once)  # twicing: 1 - (1 - G)^2, flatter above the cut
    return out


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
    rows: list[tuple[int, float, float, float]] = []  # (modality, model rms, raw model rms, pchip rms)
    for batch_items in token_batches(ds.lengths[records], max_tokens, shuffle=False):
        items = records[batch_items]
        curves = _curves(ds, items, n_grid)
        if not curves:
            continue
        counts = np.bincount([c[0] for c in curves], minlength=len(items))
        grid_t = np.concatenate([c[2] for c in curves])
        grid_c = np.concatenate([np.full(n_grid, c[1]) for c in curves])
        pred = predict(model, ds.collate(items), Queries.from_arrays(grid_t, grid_c, np.nan, counts * n_grid))
        raw = pred.mean.numpy().reshape(-1, n_grid)
        pchip = np.stack([PchipInterpolator(c[3], c[4])(c[2] - ds.t_ref[items[c[0]]]) for c in curves])
        dt = np.array([(c[2][-1] - c[2][0]) / (n_grid - 1) for c in curves])
        nyquist = np.array([2.0 * np.median(np.diff(c[3])) for c in curves])
        scores = [high_frequency_rms(x, dt, nyquist) for x in (band_limit(raw, dt, nyquist), raw, pchip)]
        for c, *rms in zip(curves, *scores, strict=True):
            rows.append((int(ds.channel_modality[c[1]]), *map(float, rms)))
    out = {}
    for m, name in enumerate(ds.modalities):
        sel = np.array([r[1:] for r in rows if r[0] == m])
        if len(sel):
            model_rms, raw_rms, pchip_rms = (float(x) for x in sel.mean(0))
            vs = [x / pchip_rms if pchip_rms > 0 else float("nan") for x in (model_rms, raw_rms)]
            out[name] = {"model": model_rms, "model_raw": raw_rms, "pchip": pchip_rms, "curves": len(sel),
                         "model_vs_pchip": vs[0], "model_raw_vs_pchip": vs[1]}
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
