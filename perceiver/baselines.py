"""Honest baselines for reconstructing hidden elements, scored on exactly the model's hidden elements.

All three work in normalised units on packed records (``offsets``, per-element ``time``, ``channel``,
``value``) with a ``visible`` mask (what a baseline may look at) and a ``target`` mask (what it must predict):

- :func:`channel_mean`: the channel's mean over the train split, whatever the record;
- :func:`forward_fill`: the record's last visible value of the same channel at or before the target's time;
- :func:`linear_interpolation`: per record and channel, linear in time between the visible neighbours,
  constant beyond the first and last visible element.

For spectra (a channel a record observed at one time over many wavelengths) "time" is the wavelength: forward
fill and interpolation run along ``coord`` when it is given (:func:`along_axis`).

Where a record has no visible element of the target's channel (or the target is static, time NaN), the
time-based baselines fall back to the channel mean. The neighbours come from
:func:`perceiver.neighbours.same_channel_neighbours` (the one implementation the model's decoder features use
too): vectorised, no per-record Python loop.
"""

from __future__ import annotations

import numpy as np
import torch

from perceiver.model import subset_offsets
from perceiver.neighbours import same_channel_neighbours


def channel_means(channel: np.ndarray, value: np.ndarray, n_channels: int) -> np.ndarray:
    """Mean normalised value per channel (0 for channels without elements: the normalised location)."""
    counts = np.bincount(channel, minlength=n_channels)
    sums = np.bincount(channel, weights=value.astype(np.float64), minlength=n_channels)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def channel_mean(channel: np.ndarray, target: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Prediction for each target element: its channel's train-split mean."""
    return means[channel[target]]


def along_axis(offsets: np.ndarray, time: np.ndarray, channel: np.ndarray, coord: np.ndarray | None) -> np.ndarray:
    """The axis a record's channel is interpolated along: its time, or, for a channel the record observed at a
    single time over many wavelengths (a spectrum), its ``coord`` (wavelength)."""
    if coord is None:
        return time
    n_rec = len(offsets) - 1
    record = np.repeat(np.arange(n_rec), np.diff(offsets))
    n_ch = int(channel.max(initial=0)) + 1
    _, group = np.unique(record.astype(np.int64) * n_ch + channel, return_inverse=True)
    t = np.where(np.isfinite(time), time, np.nan)
    n_g = int(group.max(initial=-1)) + 1
    tmin, tmax = np.full(n_g, np.inf), np.full(n_g, -np.inf)
    cmin, cmax = np.full(n_g, np.inf), np.full(n_g, -np.inf)
    ok_t, ok_c = np.isfinite(t), np.isfinite(coord)
    np.minimum.at(tmin, group[ok_t], t[ok_t])
    np.maximum.at(tmax, group[ok_t], t[ok_t])
    np.minimum.at(cmin, group[ok_c], coord[ok_c])
    np.maximum.at(cmax, group[ok_c], coord[ok_c])
    spectral = (tmax <= tmin) & (cmax > cmin)  # one time (or none), many wavelengths
    use_coord = spectral[group] & ok_c
    return np.where(use_coord, coord.astype(np.float64), time)


def _neighbours(offsets, time, channel, visible, target):
    """For each target (packed index ``tgt``): packed index of the previous and next visible element of the
    same record and channel along ``time`` (-1 if none; :func:`perceiver.neighbours.same_channel_neighbours`)."""
    offsets = np.asarray(offsets, np.int64)
    visible = np.asarray(visible, bool) & np.isfinite(time)
    target = np.asarray(target, bool)
    tgt, vis = np.flatnonzero(target), np.flatnonzero(visible)
    t = torch.from_numpy(np.asarray(time, np.float64))
    c = torch.from_numpy(np.asarray(channel, np.int64))
    off = torch.from_numpy(offsets)
    prev, nxt = same_channel_neighbours(subset_offsets(off, torch.from_numpy(visible)), c[vis], [t[vis]],
                                        subset_offsets(off, torch.from_numpy(target)), c[tgt], [t[tgt]])
    vis = np.append(vis, -1)  # index -1 (no neighbour) maps to -1
    return tgt, vis[prev.numpy()], vis[nxt.numpy()]


def forward_fill(offsets, time, channel, value, visible, target, means: np.ndarray, coord=None) -> np.ndarray:
    """Last visible value of the same record and channel at or before the target's time (else the channel
    mean; a target before the first visible element takes the channel mean too, as a forward fill would)."""
    tgt, prev, _ = _neighbours(offsets, along_axis(offsets, time, channel, coord), channel, visible, target)
    out = means[channel[tgt]].astype(np.float64)
    has = prev >= 0
    out[has] = value[prev[has]]
    return out


def linear_interpolation(offsets, time, channel, value, visible, target, means: np.ndarray, coord=None
                         ) -> np.ndarray:
    """Linear interpolation in time between the visible neighbours of the same record and channel."""
    time = along_axis(offsets, time, channel, coord)
    tgt, prev, nxt = _neighbours(offsets, time, channel, visible, target)
    out = means[channel[tgt]].astype(np.float64)
    both = (prev >= 0) & (nxt >= 0)
    only_prev = (prev >= 0) & (nxt < 0)
    only_next = (prev < 0) & (nxt >= 0)
    out[only_prev] = value[prev[only_prev]]
    out[only_next] = value[nxt[only_next]]
    t0, t1 = time[prev[both]], time[nxt[both]]
    v0, v1 = value[prev[both]].astype(np.float64), value[nxt[both]].astype(np.float64)
    w = np.where(t1 > t0, (time[tgt[both]] - t0) / np.where(t1 > t0, t1 - t0, 1.0), 0.5)
    out[both] = v0 + w * (v1 - v0)
    return out


BASELINES = {"channel_mean": None, "forward_fill": forward_fill, "linear_interpolation": linear_interpolation}


def predict_baseline(name: str, offsets, time, channel, value, visible, target, means: np.ndarray,
                     coord: np.ndarray | None = None) -> np.ndarray:
    """Predictions of baseline ``name`` for the target elements, in packed order. With ``coord``, spectra
    (a channel seen at one time over many wavelengths) are filled and interpolated along wavelength."""
    if name == "channel_mean":
        return channel_mean(channel, target, means)
    return BASELINES[name](offsets, time, channel, value, visible, target, means, coord)
