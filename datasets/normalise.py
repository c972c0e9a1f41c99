"""Per-channel normalisation: one implementation for the store (statistics) and the loader (apply).

A channel's value ``v`` (physical unit) becomes ``z = (T(v) - location) / scale`` where ``T`` is the
channel's ``transform``: ``identity``, or ``asinh`` with ``T(v) = asinh(v / softening)`` for flux-like
channels (linear near zero, logarithmic for bright sources, defined for negative fluxes). Errors are
propagated to first order: ``sigma_z = |T'(v)| * sigma / scale``. ``location`` is the median of ``T(v)``
over the train split and ``scale`` its standard deviation after clipping to the 0.1-99.9 % quantiles: every
channel's normalised train values then have a variance of about one, so no channel dominates the loss or a
normalised metric (a MAD scale does not do that for a skewed channel: SaO2, tightly packed at 95-100 % with a
long low tail, had a normalised variance of ~80 under it), and a single absurd value cannot inflate the scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TRANSFORMS = ("identity", "asinh")
MAD_TO_SIGMA = 1.4826
#: an ``identity`` channel whose 0.1-99.9 % range exceeds this many robust sigmas (1.4826 x MAD) is switched to
#: ``asinh`` (a Gaussian spans 6.2)
HEAVY_TAIL = 25.0
#: quantiles the transformed values are clipped to before their standard deviation is the channel's scale
SCALE_CLIP = (0.001, 0.999)


def transform(value: np.ndarray, kind: np.ndarray | str, softening: np.ndarray | float) -> np.ndarray:
    """``T(v)`` elementwise; ``kind``/``softening`` broadcast against ``value``."""
    v = np.asarray(value, dtype=np.float64)
    asinh = np.asarray(kind) == "asinh"
    s = np.where(asinh, softening, 1.0)
    return np.where(asinh, np.arcsinh(v / s), v)


def derivative(value: np.ndarray, kind: np.ndarray | str, softening: np.ndarray | float) -> np.ndarray:
    """``|T'(v)|`` elementwise (1 for identity)."""
    v = np.asarray(value, dtype=np.float64)
    asinh = np.asarray(kind) == "asinh"
    s = np.where(asinh, softening, 1.0)
    return np.where(asinh, 1.0 / np.sqrt(s * s + v * v), 1.0)


def channel_statistics(channel: np.ndarray, value: np.ndarray, error: np.ndarray, table: pd.DataFrame,
                       train: np.ndarray) -> pd.DataFrame:
    """``transform``, ``softening``, ``location``, ``scale`` and ``count`` per channel, from train elements.

    ``table`` has one row per channel with its declared ``transform``; ``train`` is a boolean mask over
    elements. Heavy-tailed identity channels become ``asinh`` (see :data:`HEAVY_TAIL`). Channels with no
    train elements get location 0 and scale 1; a zero spread (a constant channel) gets scale 1.
    """
    n = len(table)
    kinds = table["transform"].to_numpy().astype(object).copy()
    ch = channel[train]
    order = np.argsort(ch, kind="stable")  # radix sort for int16 channel codes
    ch, v, e = ch[order], value[train][order], error[train][order]
    bounds = np.searchsorted(ch, np.arange(n + 1))
    out = {"softening": np.ones(n), "location": np.zeros(n), "scale": np.ones(n), "count": np.zeros(n, np.int64)}
    for c in range(n):  # one iteration per channel, not per element
        vc = v[bounds[c]:bounds[c + 1]].astype(np.float64)
        ec = e[bounds[c]:bounds[c + 1]]
        out["count"][c] = len(vc)
        if len(vc) == 0:
            continue
        spread = MAD_TO_SIGMA * np.median(np.abs(vc - np.median(vc)))
        if kinds[c] == "identity" and spread > 0:
            lo, hi = np.quantile(vc, [0.001, 0.999])
            if (hi - lo) / spread > HEAVY_TAIL:
                # A heavy tail (a lab value spanning decades): z-scores of thousands would dominate any
                # loss, so compress it logarithmically beyond the typical spread.
                kinds[c] = "asinh"
                out["softening"][c] = spread
        if kinds[c] == "asinh" and out["softening"][c] == 1.0:
            # Soften at the typical noise level: below it fluxes are linear, above it logarithmic.
            finite = ec[np.isfinite(ec)]
            s = np.median(finite) if len(finite) else spread
            out["softening"][c] = s if np.isfinite(s) and s > 0 else 1.0
        tv = transform(vc, kinds[c], out["softening"][c])
        scale = float(np.std(np.clip(tv, *np.quantile(tv, SCALE_CLIP))))
        if not np.isfinite(scale) or scale <= 0:
            scale = float(np.std(tv)) if np.std(tv) > 0 else 1.0
        out["location"][c], out["scale"][c] = np.median(tv), scale
    return pd.DataFrame({"transform": kinds, **out})


def _columns(table, channel: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-element transform, softening, location and scale from a channel table: a model's data contract
    (:class:`perceiver.DataContract`, or its ``table()``) or a store's channel DataFrame."""
    table = table.table() if hasattr(table, "table") else table
    return tuple(np.asarray(table[k])[channel] for k in ("transform", "softening", "location", "scale"))


def normalise(value: np.ndarray, error: np.ndarray, channel: np.ndarray, table
              ) -> tuple[np.ndarray, np.ndarray]:
    """Normalised values and errors (NaN errors stay NaN) for elements of the given channels (indices into
    ``table``: a data contract, or a store's channel table)."""
    kind, soft, loc, scale = _columns(table, channel)
    z = (transform(value, kind, soft) - loc) / scale
    sz = derivative(value, kind, soft) * np.asarray(error, np.float64) / scale
    return z.astype(np.float32), sz.astype(np.float32)


#: the standard normal quantile of a central 95 % interval
Z95 = 1.959963984540054


def interval(z: np.ndarray, sigma_z: np.ndarray, channel: np.ndarray, table, width: float = Z95
             ) -> tuple[np.ndarray, np.ndarray]:
    """The central interval ``z +- width * sigma_z`` of a Gaussian in normalised (transformed) space, mapped back
    to physical units: the 95 % interval by default. Asymmetric where the transform is not linear, and inside
    any range the transform maps onto."""
    kind, soft, loc, scale = _columns(table, channel)
    z, half = np.asarray(z, np.float64), width * np.asarray(sigma_z, np.float64)
    return (_inverse(z - half, kind, soft, loc, scale).astype(np.float32),
            _inverse(z + half, kind, soft, loc, scale).astype(np.float32))


def _inverse(z: np.ndarray, kind: np.ndarray, soft: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``T^-1(z * scale + location)`` per element (float64; beyond float range: +-inf)."""
    t = np.asarray(z, np.float64) * scale + loc
    asinh = kind == "asinh"
    v = t.copy()
    with np.errstate(over="ignore"):
        v[asinh] = np.sinh(t[asinh]) * soft[asinh]
    return v


def denormalise(z: np.ndarray, sigma_z: np.ndarray, channel: np.ndarray, table
                ) -> tuple[np.ndarray, np.ndarray]:
    """Back to physical units: mean ``T^-1(z * scale + location)``, sigma by first-order propagation."""
    kind, soft, loc, scale = _columns(table, channel)
    v = _inverse(z, kind, soft, loc, scale)
    with np.errstate(over="ignore", divide="ignore"):  # beyond float range: +-inf (a huge sigma's interval)
        sigma = np.asarray(sigma_z, np.float64) * scale / derivative(v, kind, soft)
        return v.astype(np.float32), sigma.astype(np.float32)
