"""The masking plan: which elements the encoder sees and which ones the decoder must reconstruct.

The plan is data, decided here with a seeded :class:`numpy.random.Generator` and carried by the batch as two
boolean arrays (``visible``, ``target``); attention code never decides what is hidden. One *mode* is drawn per
record:

``autoencode``
    every element is visible and every element is a target.
``modality_dropout``
    (records with at least two modalities) a random non-empty proper subset of the record's modalities is
    hidden from the encoder; their elements are the targets. At least one modality is always kept.
``forecast``
    (records with at least two distinct times) the elements after a random cut time are hidden and become
    targets; static elements stay visible.
``holdout`` (the default mode)
    a fixed fraction of the record's elements, chosen at random, is hidden and becomes the targets.

Whatever the mode, every record keeps at least one visible element and gets at least one target (a record
with a single element is auto-encoded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perceiver.packing import segment_ids

AUTOENCODE, MODALITY_DROPOUT, FORECAST, HOLDOUT = 0, 1, 2, 3
MODE_NAMES = ("autoencode", "modality_dropout", "forecast", "holdout")


@dataclass
class MaskingConfig:
    """Probabilities of the masking modes (per record) and the hold-out fraction."""

    #: fraction of a record's elements hidden in ``holdout`` mode
    holdout: float = 0.3
    #: probability per record of whole-modality dropout (records with one modality fall back to holdout)
    modality_dropout: float = 0.25
    #: probability per record of forecasting (hide everything after a random cut time)
    forecast: float = 0.0
    #: probability per record of full auto-encoding (all visible, all targets)
    autoencode: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        total = self.modality_dropout + self.forecast + self.autoencode
        if min(self.modality_dropout, self.forecast, self.autoencode) < 0 or total > 1.0 + 1e-9:
            raise ValueError("mode probabilities must be >= 0 and sum to at most 1")


@dataclass
class MaskPlan:
    """Per element: ``visible`` to the encoder, ``target`` of the decoder; per record: the ``mode`` drawn."""

    visible: np.ndarray
    target: np.ndarray
    mode: np.ndarray


def _segment_rank(record: np.ndarray, keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Rank of each element's key within its record (0 = smallest)."""
    order = np.lexsort((keys, record))
    rank = np.empty(len(record), np.int64)
    rank[order] = np.arange(len(record)) - offsets[record[order]]
    return rank


def plan_masks(offsets: np.ndarray, modality: np.ndarray, time: np.ndarray, rng: np.random.Generator,
               config: MaskingConfig) -> MaskPlan:
    """Draw a masking plan for packed records (``offsets`` of length B+1, element ``modality`` and ``time``).

    Deterministic given the state of ``rng``: the training loop seeds it from (seed, epoch, batch number), so
    a resumed run draws the same plans as an uninterrupted one.
    """
    offsets = np.asarray(offsets, np.int64)
    n_rec, n = len(offsets) - 1, int(offsets[-1])
    lengths = np.diff(offsets)
    record = segment_ids(offsets)
    modality = np.asarray(modality, np.int64)
    time = np.asarray(time, np.float64)

    # Distinct modalities per record, and distinct finite times per record (both vectorised).
    pairs = np.unique(record * (int(modality.max(initial=0)) + 1) + modality)
    n_mod = np.bincount(pairs // (int(modality.max(initial=0)) + 1), minlength=n_rec)
    finite = np.isfinite(time)
    tmin = np.full(n_rec, np.inf)
    tmax = np.full(n_rec, -np.inf)
    np.minimum.at(tmin, record[finite], time[finite])
    np.maximum.at(tmax, record[finite], time[finite])

    u = rng.random(n_rec)
    c = config
    mode = np.full(n_rec, HOLDOUT, np.int8)
    mode[u < c.autoencode + c.modality_dropout + c.forecast] = FORECAST
    mode[u < c.autoencode + c.modality_dropout] = MODALITY_DROPOUT
    mode[u < c.autoencode] = AUTOENCODE
    mode[(mode == MODALITY_DROPOUT) & (n_mod < 2)] = HOLDOUT
    mode[(mode == FORECAST) & ~(tmax > tmin)] = HOLDOUT
    mode[lengths < 2] = AUTOENCODE
    emode = mode[record]

    hidden = np.zeros(n, bool)
    # holdout: exactly round(holdout * n) elements per record, at least one hidden and one visible.
    k = np.clip(np.rint(c.holdout * lengths), 1, np.maximum(lengths - 1, 1)).astype(np.int64)
    rank = _segment_rank(record, rng.random(n), offsets)
    hold = emode == HOLDOUT
    hidden[hold] = rank[hold] < k[record[hold]]

    # forecast: hide elements after a cut drawn uniformly inside the record's time span.
    has_span = tmax > tmin
    cut = np.where(has_span, tmin, 0.0) + np.where(has_span, tmax - tmin, 0.0) * rng.uniform(0.5, 0.95, n_rec)
    fc = (emode == FORECAST) & finite
    hidden[fc] = time[fc] > cut[record[fc]]

    # modality dropout: drop a random non-empty proper subset of the record's modalities.
    for r in np.flatnonzero(mode == MODALITY_DROPOUT):
        s = slice(offsets[r], offsets[r + 1])
        present = np.unique(modality[s])
        n_drop = rng.integers(1, len(present))
        dropped = rng.choice(present, size=n_drop, replace=False)
        hidden[s] = np.isin(modality[s], dropped)

    visible = ~hidden
    target = hidden.copy()
    target[emode == AUTOENCODE] = True
    # A forecast whose cut left nothing hidden (or nothing visible) falls back to auto-encoding that record.
    n_vis = np.bincount(record[visible], minlength=n_rec)
    n_tgt = np.bincount(record[target], minlength=n_rec)
    bad = (n_vis == 0) | (n_tgt == 0)
    if bad.any():
        fix = bad[record]
        visible[fix] = True
        target[fix] = True
        mode[bad] = AUTOENCODE
    return MaskPlan(visible=visible, target=target, mode=mode)


def full_plan(offsets: np.ndarray) -> MaskPlan:
    """Everything visible and everything a target (inference, reconstruction of observed elements)."""
    n = int(offsets[-1])
    return MaskPlan(np.ones(n, bool), np.ones(n, bool), np.full(len(offsets) - 1, AUTOENCODE, np.int8))
