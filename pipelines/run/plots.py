"""Evaluation plots (matplotlib's Agg canvas, object-oriented: no display, no pyplot state, the caller's
backend untouched).

- :func:`record_plot`: a few records of the scored split, one panel per (record, channel): the visible
  observations with their error bars, the hidden (scored) observations marked, the model's mean with its
  ±1σ and ±2σ bands on a dense grid, and linear interpolation of the visible points for comparison — in the
  channel's physical unit against time in the store's time unit (or against wavelength for a channel
  observed at one time and many wavelengths, a spectrum).
- :func:`calibration_plot`: observed against expected coverage of central intervals, per method.

The model's band is the interval of the true value (its σ; the measurement error is drawn on the points),
mapped back to physical units through the channel's transform (asymmetric for ``asinh`` channels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from datasets.loader import ElementDataset
from datasets.normalise import denormalise
from perceiver.model import Percival
from pipelines.run.baselines import linear_interpolation
from pipelines.run.inference import Queries, masked_batch, predict
from pipelines.run.protocols import hidden_counts

STYLE = {"model": "C0", "channel_mean": "C2", "per_record_mean": "C8", "forward_fill": "C4",
         "linear_interpolation": "C1", "gradient_boost": "C5"}


def _axis_label(name: str, unit: str) -> str:
    unit = (unit or "").strip()
    return f"{name} [{unit}]" if unit else f"{name} [dimensionless]"


def choose_panels(ds: ElementDataset, hidden: np.ndarray, n_records: int = 3, n_channels: int = 3
                  ) -> list[tuple[int, list[int]]]:
    """Records to draw (those with the most hidden elements that have a finite time or coord) and, per record,
    up to ``n_channels`` drawable channels (see :func:`x_axis`) with the most hidden elements:
    ``[(dataset position, [channel, ...]), ...]``."""
    seg = ds.offsets
    placed = np.isfinite(ds.time) | np.isfinite(ds.coord)
    score = hidden_counts(ds, hidden & placed)
    out = []
    for r in np.argsort(-score, kind="stable"):
        if len(out) == n_records or score[r] == 0:
            break
        s = slice(seg[r], seg[r + 1])
        ch = ds.channel[s]
        n_hid = np.bincount(ch[hidden[s] & placed[s]], minlength=len(ds.channels))
        n_all = np.bincount(ch[placed[s]], minlength=len(ds.channels))
        chosen = []
        for c in np.lexsort((-n_all, -n_hid)):
            if n_hid[c] == 0 or len(chosen) == n_channels:
                break
            m = ch == c
            if x_axis(ds.time[s][m], ds.coord[s][m]) is not None:
                chosen.append(int(c))
        if chosen:
            out.append((int(r), chosen))
    return out


def x_axis(time: np.ndarray, coord: np.ndarray) -> str | None:
    """How to draw one channel of a record: against ``coord`` (wavelength) when it is seen at one time and
    several wavelengths (a spectrum), against ``time`` when it has finite times, else not at all (None:
    static, or a single untimed photometric point)."""
    t, c = time[np.isfinite(time)], coord[np.isfinite(coord)]
    if len(np.unique(t)) <= 1 and len(np.unique(c)) > 1:
        return "coord"
    return "time" if len(t) else None


def record_plot(model: Percival, ds: ElementDataset, hidden: np.ndarray, path: str | Path, time_unit: str,
                means: np.ndarray | None = None, n_records: int = 3, n_channels: int = 3, grid_points: int = 200,
                title: str = "") -> Path:
    """Draw a few records of ``ds`` with the elements ``hidden`` hidden from the encoder (see the module
    docstring); writes a PNG to ``path`` and returns it. ``means`` (train-split mean normalised value per
    channel) is what linear interpolation falls back to where a record has no visible point of a channel
    (default: 0, the channel's normalised location)."""
    path = Path(path)
    panels = choose_panels(ds, hidden, n_records, n_channels)
    channels: pd.DataFrame = ds.channels
    ncols = max([len(c) for _, c in panels] + [1])
    fig = Figure(figsize=(4.6 * ncols, 3.2 * max(len(panels), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(panels), 1), ncols, squeeze=False)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no hidden element with a time or wavelength to draw\n(static elements only)",
                         ha="center", va="center")
        axes[0, 0].set_axis_off()
    else:
        means = np.zeros(len(channels)) if means is None else np.asarray(means, np.float64)
        _draw(model, ds, hidden, panels, channels, axes, time_unit, grid_points, means)
    for i, (_, chans) in enumerate(panels):
        for j in range(len(chans), ncols):
            axes[i, j].set_axis_off()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path


def _draw(model, ds, hidden, panels, channels, axes, time_unit, grid_points, means) -> None:
    items = np.array([r for r, _ in panels], np.int64)
    batch, _ = masked_batch(ds, items, hidden)
    # queries: a dense grid per (record, channel), in time (or wavelength for spectra)
    q_time, q_channel, q_coord, counts, grids = [], [], [], [], []
    for r, chans in panels:
        s = slice(ds.offsets[r], ds.offsets[r + 1])
        t_abs = ds.elements.time[ds.element_index[s]]
        n = 0
        for c in chans:
            m = ds.channel[s] == c
            axis = x_axis(t_abs[m], ds.coord[s][m])
            if axis == "time":
                finite = t_abs[np.isfinite(t_abs)]
                lo, hi = float(finite.min()), float(finite.max())
                pad = 0.02 * (hi - lo) if hi > lo else 1.0
                x = np.linspace(lo - pad, hi + pad, grid_points)
                ch_coord = float(channels["coord"].to_numpy(np.float64)[c]) if "coord" in channels else np.nan
                tq, cq = x, np.full(grid_points, ch_coord)
            else:
                cc = ds.coord[s][m]
                x = np.linspace(float(np.nanmin(cc)), float(np.nanmax(cc)), grid_points)
                t0 = t_abs[m][np.isfinite(t_abs[m])]
                tq, cq = np.full(grid_points, t0[0] if len(t0) else np.nan), x
            q_time.append(tq)
            q_channel.append(np.full(grid_points, c))
            q_coord.append(cq)
            grids.append((axis, x))
            n += grid_points
        counts.append(n)
    queries = Queries.from_arrays(np.concatenate(q_time), np.concatenate(q_channel), np.concatenate(q_coord),
                                  counts)
    pred = predict(model, batch, queries)
    mu, sd = pred.mean.numpy().astype(np.float64), pred.sigma.numpy().astype(np.float64)
    qc = np.concatenate(q_channel)

    def phys(z):
        return denormalise(z, np.zeros_like(z), qc, ds.contract)[0]

    mean_v = phys(mu)
    bands = {k: (phys(mu - k * sd), phys(mu + k * sd)) for k in (1, 2)}
    names, units = channels["name"].astype(str).to_numpy(), channels["unit"].astype(str).to_numpy()
    record_ids = ds.elements.records["record_id"].astype(str).to_numpy()

    k = 0
    for i, (r, chans) in enumerate(panels):
        s = slice(ds.offsets[r], ds.offsets[r + 1])
        e_idx = ds.element_index[s]
        t_abs, v, err = ds.elements.time[e_idx], ds.elements.value[e_idx], ds.elements.error[e_idx]
        h = hidden[s]
        for j, c in enumerate(chans):
            ax = axes[i, j]
            axis, x = grids[k // grid_points]
            g = slice(k, k + grid_points)
            k += grid_points
            m = ds.channel[s] == c
            xs = t_abs if axis == "time" else ds.coord[s].astype(np.float64)
            ax.fill_between(x, bands[2][0][g], bands[2][1][g], color=STYLE["model"], alpha=0.15, lw=0,
                            label="model ±2σ")
            ax.fill_between(x, bands[1][0][g], bands[1][1][g], color=STYLE["model"], alpha=0.3, lw=0,
                            label="model ±1σ")
            ax.plot(x, mean_v[g], color=STYLE["model"], lw=1.5, label="model mean", zorder=4)
            if axis == "time":
                li, fallback = _linear_on_grid(ds, r, hidden, c, x, means)
                ax.plot(x, li, color=STYLE["linear_interpolation"], lw=1.2, ls="--", zorder=4,
                        label="linear interpolation" + (" (= train mean)" if fallback else ""))
            dense = m.sum() > 300  # a spectrum: small markers, light error bars
            vis = m & ~h
            yerr = np.where(np.isfinite(err[vis]), err[vis], 0.0) if np.isfinite(err[vis]).any() else None
            ax.errorbar(xs[vis], v[vis], yerr=yerr, fmt="o", ms=1.5 if dense else 3.5, color="k",
                        elinewidth=0.3 if dense else 0.8, label="observed (visible)")
            hid = m & h
            yerr = np.where(np.isfinite(err[hid]), err[hid], 0.0) if np.isfinite(err[hid]).any() else None
            ax.errorbar(xs[hid], v[hid], yerr=yerr, fmt="o", ms=2 if dense else 5, mfc="none", mec="C3",
                        color="C3", elinewidth=0.3 if dense else 0.8, label="hidden (scored)")
            ax.set_title(f"{record_ids[r]} · {names[c]}", fontsize=10)
            ax.set_xlabel(f"time [{time_unit}]" if axis == "time" else "wavelength [Angstrom]")
            ax.set_ylabel(_axis_label(names[c], units[c]))
            ax.tick_params(labelsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles, labels, fontsize=7, loc="best")


def _linear_on_grid(ds: ElementDataset, r: int, hidden: np.ndarray, c: int, x_abs: np.ndarray,
                    means: np.ndarray) -> tuple[np.ndarray, bool]:
    """:func:`pipelines.run.baselines.linear_interpolation` of record ``r``'s visible channel-``c`` elements at
    the absolute times ``x_abs``, in physical units; True when there is none visible (the baseline then
    predicts the channel's train mean)."""
    s = slice(ds.offsets[r], ds.offsets[r + 1])
    m = (ds.channel[s] == c) & ~hidden[s] & np.isfinite(ds.time[s])
    t_vis = ds.time[s][m].astype(np.float64)
    z_vis = ds.value[s][m]
    t_rel = x_abs - float(ds.t_ref[r])
    n_v, n_g = len(t_vis), len(t_rel)
    time = np.concatenate([t_vis, t_rel])
    channel = np.full(n_v + n_g, c, np.int64)
    value = np.concatenate([z_vis, np.zeros(n_g, np.float32)])
    visible = np.concatenate([np.ones(n_v, bool), np.zeros(n_g, bool)])
    z = linear_interpolation(np.array([0, n_v + n_g]), time, channel, value, visible, ~visible, means)
    return denormalise(z, np.zeros_like(z), np.full(n_g, c), ds.contract)[0], not m.any()


def calibration_plot(levels, curves: dict[str, list[float]], path: str | Path, title: str = "",
                     n: int | None = None) -> Path:
    """Observed against expected coverage of the central predictive intervals, one line per method."""
    path = Path(path)
    fig = Figure(figsize=(5.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1, label="calibrated")
    for method, obs in curves.items():
        ax.plot(levels, obs, marker="o", ms=3, lw=1.4, color=STYLE.get(method), label=method)
    for lv in (0.6827, 0.9545):
        ax.axvline(lv, color="0.85", lw=0.8, zorder=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("expected coverage (central interval level of N(μ, σ² + e²))")
    ax.set_ylabel("observed coverage (fraction of hidden elements)")
    ax.set_title(title + (f" (n = {n:,})" if n is not None else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    return path
