"""Per-channel normalisation: one implementation for the store (statistics) and the loader (apply).

A channel's value ``v`` (physical unit) becomes ``z = (T(v) - location) / scale`` with ``T = S o B``:

``B``, the channel's *bounds* (``valid_min`` / ``valid_max``, NaN = unbounded)
    maps the open valid range onto the whole real line: the identity (shifted) far from a bound, logarithmic
    within about ``bound_width`` of it (:func:`soft_log`). Its inverse maps *any* real number back inside the
    range, so every mean and every interval the model gives in normalised space is a physical value inside the
    range by construction, not by clipping: a Gaussian there is a log-normal-like distribution near a bound,
    with an honest asymmetric interval. With two bounds, ``B`` rises from the lower one's logarithm through a
    linear middle to the upper one's (logit-like, but linear across the body of the data). Observed values
    closer to a bound than ``bound_width / 2`` (below the channel's resolution there: a lab value recorded as
    0, a saturation of 100 %) are treated as that distance. ``bound_width`` is fitted on the train split
    (:func:`bound_width`): an eighth of the 1st percentile of the channel's positive distances to the nearer
    bound, so that ``B`` bends only beyond the data's own approach to the bound. Unbounded
    channels (fluxes, magnitudes) and stores written before bounds existed have ``B`` = identity.
``S``, the channel's ``transform``
    ``identity``, or ``asinh`` with ``S(u) = asinh(u / softening)`` for flux-like channels (linear near zero,
    logarithmic for bright sources, defined for negative fluxes).

Errors are propagated to first order: ``sigma_z = |T'(v)| * sigma / scale``. ``location`` is the median of
``T(v)`` over the train split and ``scale`` its standard deviation after clipping to the 0.1-99.9 % quantiles:
every channel's normalised train values then have a variance of about one, so no channel dominates the loss or
a normalised metric (a MAD scale does not do that for a skewed channel: SaO2, tightly packed at 95-100 % with a
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
#: a bounded channel's ``bound_width`` is this fraction of the 1st percentile of its positive train distances to
#: the nearer bound: ``B`` then differs from a shift by less than ``exp(-8) = 3e-4`` of that distance for 99 %
#: of the train values
BOUND_QUANTILE, BOUND_FRACTION = 0.01, 0.125


def soft_log(x: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """``x + w log(1 - exp(-x / w))`` for distances ``x > 0`` to a bound: ``~x`` for ``x >> w``, ``~w log(x / w)``
    for ``x << w`` (to minus infinity at the bound). Its inverse is :func:`soft_log_inverse`."""
    return x + width * np.log(-np.expm1(-x / width))


def soft_log_inverse(y: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """``w log(1 + exp(y / w))`` (a softplus): strictly positive for every real ``y``."""
    return np.maximum(y, 0.0) + width * np.log1p(np.exp(-np.abs(y) / width))


def _soft_log_slope(x: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    return 1.0 / -np.expm1(-x / width)


class _Bounds:
    """Per-element bounds (``lo``, ``hi``, NaN = none) and width: the map ``B`` of the module docstring."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, width: np.ndarray):
        width = np.asarray(width, np.float64)
        ok = np.isfinite(width) & (width > 0)
        self.lo, self.hi = np.where(ok, lo, np.nan), np.where(ok, hi, np.nan)
        self.has_lo, self.has_hi = np.isfinite(self.lo), np.isfinite(self.hi)
        self.w = np.where(ok, width, 1.0)
        both = self.has_lo & self.has_hi
        self.half = np.where(both, 0.5 * (self.hi - self.lo), np.inf)
        with np.errstate(invalid="ignore"):
            # the upper branch's offset: continuous (and smooth) with the lower branch at the middle
            self.mid = np.where(both, soft_log(self.half, self.w), np.inf)
        self.top = np.where(both, 2.0 * self.mid, 0.0)

    def _distances(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        floor = 0.5 * self.w
        with np.errstate(invalid="ignore"):
            lower = self.has_lo & (~self.has_hi | (v - self.lo <= self.half))
            d_lo = np.maximum(np.where(self.has_lo, v - self.lo, 1.0), floor)
            d_hi = np.maximum(np.where(self.has_hi, self.hi - v, 1.0), floor)
        return lower, self.has_hi & ~lower, d_lo, d_hi

    def forward(self, v: np.ndarray) -> np.ndarray:
        return self.forward_and_slope(v)[0]

    def forward_and_slope(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``B(v)`` and ``B'(v)`` from one pass over the distances to the bounds."""
        lower, upper, d_lo, d_hi = self._distances(v)
        u = np.where(upper, self.top - soft_log(d_hi, self.w), np.where(lower, soft_log(d_lo, self.w), v))
        slope = np.where(lower, _soft_log_slope(d_lo, self.w), np.where(upper, _soft_log_slope(d_hi, self.w), 1.0))
        return u, slope

    def inverse(self, u: np.ndarray) -> np.ndarray:
        lower = self.has_lo & (~self.has_hi | (u <= self.mid))
        upper = self.has_hi & ~lower
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.where(lower, self.lo + soft_log_inverse(u, self.w), u)
            return np.where(upper, self.hi - soft_log_inverse(self.top - u, self.w), v)


def bound_width(value: np.ndarray, valid_min: float, valid_max: float) -> float:
    """The width over which a bounded channel's ``B`` turns logarithmic (see the module docstring; NaN for an
    unbounded channel): :data:`BOUND_FRACTION` of the smallest :data:`BOUND_QUANTILE` quantile of the positive
    distances of ``value`` (train values, inside the range) to each bound, at most a quarter of a two-sided
    range; 1 % of a two-sided range (else 1) without data."""
    bounds = [b for b in (valid_min, valid_max) if np.isfinite(b)]
    if not bounds:
        return float("nan")
    v = np.asarray(value, np.float64)
    candidates = [0.25 * (valid_max - valid_min)] if len(bounds) == 2 else []
    for d in (v - valid_min, valid_max - v):
        d = d[np.isfinite(d) & (d > 0)]
        if len(d):
            candidates.append(BOUND_FRACTION * np.quantile(d, BOUND_QUANTILE))
    if len(candidates) > (len(bounds) == 2):
        return float(min(candidates))
    return 0.01 * (valid_max - valid_min) if len(bounds) == 2 else 1.0


def transform(value: np.ndarray, kind: np.ndarray | str, softening: np.ndarray | float,
              bounds: _Bounds | None = None) -> np.ndarray:
    """``T(v)`` elementwise; ``kind``/``softening`` broadcast against ``value``; ``bounds``: ``B`` (none: the
    identity)."""
    v = np.asarray(value, dtype=np.float64)
    u = v if bounds is None else bounds.forward(v)
    asinh = np.asarray(kind) == "asinh"
    s = np.where(asinh, softening, 1.0)
    return np.where(asinh, np.arcsinh(u / s), u)


def transform_and_derivative(value: np.ndarray, kind: np.ndarray | str, softening: np.ndarray | float,
                             bounds: _Bounds | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``T(v)`` and ``|T'(v)|`` elementwise (the bounds map ``B`` evaluated once for both)."""
    v = np.asarray(value, dtype=np.float64)
    u, slope = (v, 1.0) if bounds is None else bounds.forward_and_slope(v)
    asinh = np.asarray(kind) == "asinh"
    s = np.where(asinh, softening, 1.0)
    return np.where(asinh, np.arcsinh(u / s), u), slope * np.where(asinh, 1.0 / np.sqrt(s * s + u * u), 1.0)


def derivative(value: np.ndarray, kind: np.ndarray | str, softening: np.ndarray | float,
               bounds: _Bounds | None = None) -> np.ndarray:
    """``|T'(v)|`` elementwise (1 for an unbounded identity channel)."""
    return transform_and_derivative(value, kind, softening, bounds)[1]


def channel_statistics(channel: np.ndarray, value: np.ndarray, error: np.ndarray, table: pd.DataFrame,
                       train: np.ndarray) -> pd.DataFrame:
    """``transform``, ``softening``, ``bound_width``, ``location``, ``scale`` and ``count`` per channel, from
    train elements.

    ``table`` has one row per channel with its declared ``transform`` and, optionally, ``valid_min`` /
    ``valid_max``; ``train`` is a boolean mask over elements. Heavy-tailed identity channels become ``asinh``
    (see :data:`HEAVY_TAIL`). Channels with no train elements get location 0 and scale 1; a zero spread (a
    constant channel) gets scale 1.
    """
    n = len(table)
    kinds = table["transform"].to_numpy().astype(object).copy()
    valid = [np.asarray(table[k], np.float64) if k in table else np.full(n, np.nan) for k in ("valid_min", "valid_max")]
    ch = channel[train]
    order = np.argsort(ch, kind="stable")  # radix sort for int16 channel codes
    ch, v, e = ch[order], value[train][order], error[train][order]
    bounds = np.searchsorted(ch, np.arange(n + 1))
    out = {"softening": np.ones(n), "bound_width": np.full(n, np.nan), "location": np.zeros(n), "scale": np.ones(n),
           "count": np.zeros(n, np.int64)}
    for c in range(n):  # one iteration per channel, not per element
        vc = v[bounds[c]:bounds[c + 1]].astype(np.float64)
        ec = e[bounds[c]:bounds[c + 1]]
        out["count"][c] = len(vc)
        lo, hi = valid[0][c], valid[1][c]
        out["bound_width"][c] = bound_width(vc, lo, hi)
        if len(vc) == 0:
            continue
        b = _Bounds(np.array([lo]), np.array([hi]), out["bound_width"][c:c + 1])
        uc = b.forward(vc)  # S (the shape transform) is chosen on the bounded values
        spread = MAD_TO_SIGMA * np.median(np.abs(uc - np.median(uc)))
        if kinds[c] == "identity" and spread > 0:
            q_lo, q_hi = np.quantile(uc, [0.001, 0.999])
            if (q_hi - q_lo) / spread > HEAVY_TAIL:
                # A heavy tail (a lab value spanning decades): z-scores of thousands would dominate any
                # loss, so compress it logarithmically beyond the typical spread.
                kinds[c] = "asinh"
                out["softening"][c] = spread
        if kinds[c] == "asinh" and out["softening"][c] == 1.0:
            # Soften at the typical noise level: below it fluxes are linear, above it logarithmic.
            finite = ec[np.isfinite(ec)]
            s = np.median(finite) if len(finite) else spread
            out["softening"][c] = s if np.isfinite(s) and s > 0 else 1.0
        tv = transform(vc, kinds[c], out["softening"][c], b)
        scale = float(np.std(np.clip(tv, *np.quantile(tv, SCALE_CLIP))))
        if not np.isfinite(scale) or scale <= 0:
            scale = float(np.std(tv)) if np.std(tv) > 0 else 1.0
        out["location"][c], out["scale"][c] = np.median(tv), scale
    return pd.DataFrame({"transform": kinds, **out})


def _columns(table, channel: np.ndarray) -> tuple:
    """Per-element transform, softening, bounds (``B``), location and scale from a channel table: a model's data
    contract (:class:`perceiver.DataContract`, or its ``table()``) or a store's channel DataFrame (a table
    without bounds or ``bound_width``, from before they existed, is unbounded)."""
    table = table.table() if hasattr(table, "table") else table
    kind, soft, loc, scale = (np.asarray(table[k])[channel] for k in ("transform", "softening", "location", "scale"))
    lo, hi, width = (np.asarray(table[k], np.float64)[channel] if k in table else np.full(len(channel), np.nan)
                     for k in ("valid_min", "valid_max", "bound_width"))
    return kind, soft, _Bounds(lo, hi, width), loc, scale


def normalise(value: np.ndarray, error: np.ndarray, channel: np.ndarray, table
              ) -> tuple[np.ndarray, np.ndarray]:
    """Normalised values and errors (NaN errors stay NaN) for elements of the given channels (indices into
    ``table``: a data contract, or a store's channel table)."""
    kind, soft, bounds, loc, scale = _columns(table, channel)
    t, slope = transform_and_derivative(value, kind, soft, bounds)
    z = (t - loc) / scale
    sz = slope * np.asarray(error, np.float64) / scale
    return z.astype(np.float32), sz.astype(np.float32)


#: the standard normal quantile of a central 95 % interval
Z95 = 1.959963984540054


def interval(z: np.ndarray, sigma_z: np.ndarray, channel: np.ndarray, table, width: float = Z95
             ) -> tuple[np.ndarray, np.ndarray]:
    """The central interval ``z +- width * sigma_z`` of a Gaussian in normalised (transformed) space, mapped back
    to physical units: the 95 % interval by default. Asymmetric where the transform is not linear, and inside
    the channel's valid range (the transform maps all of normalised space into it)."""
    kind, soft, bounds, loc, scale = _columns(table, channel)
    z, half = np.asarray(z, np.float64), width * np.asarray(sigma_z, np.float64)
    with np.errstate(over="ignore"):  # beyond float32 range: +-inf
        return (_inverse(z - half, kind, soft, bounds, loc, scale).astype(np.float32),
                _inverse(z + half, kind, soft, bounds, loc, scale).astype(np.float32))


def _inverse(z: np.ndarray, kind: np.ndarray, soft: np.ndarray, bounds: _Bounds, loc: np.ndarray,
             scale: np.ndarray) -> np.ndarray:
    """``T^-1(z * scale + location)`` per element (float64; beyond float range: +-inf, or the bound)."""
    t = np.asarray(z, np.float64) * scale + loc
    asinh = kind == "asinh"
    u = t.copy()
    with np.errstate(over="ignore"):
        u[asinh] = np.sinh(t[asinh]) * soft[asinh]
    return bounds.inverse(u)


def denormalise(z: np.ndarray, sigma_z: np.ndarray, channel: np.ndarray, table
                ) -> tuple[np.ndarray, np.ndarray]:
    """Back to physical units: mean ``T^-1(z * scale + location)`` (the median of the predictive distribution in
    physical units), sigma by first-order propagation."""
    kind, soft, bounds, loc, scale = _columns(table, channel)
    v = _inverse(z, kind, soft, bounds, loc, scale)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # beyond float range: +-inf
        sigma = np.asarray(sigma_z, np.float64) * scale / derivative(v, kind, soft, bounds)
        return v.astype(np.float32), sigma.astype(np.float32)
