"""The masking plan: which elements the encoder sees and which ones the decoder must reconstruct.

The plan is data, decided here with a seeded :class:`numpy.random.Generator` and carried by the batch as two
boolean arrays (``visible``, ``target``); attention code never decides what is hidden. One *mode* is drawn per
record:

``autoencode``
    every element is visible and every element is a target.
``modality_dropout``
    (records with at least two modalities) a random non-empty proper subset of the record's modalities is
    hidden from the encoder; their elements are the targets. At least one modality is always kept. By default
    the subset is uniform over its size; with ``modality_rates`` each modality is dropped with its own
    probability (as daep trains: a spectrum more often than photometry, say; a draw that drops none drops the
    likeliest one, one that drops all keeps the least likely one); with probability ``keep_one`` all but one
    modality (chosen uniformly) are dropped instead.
``channel_dropout``
    (records with at least two channels) every element of one of the record's channels, chosen uniformly, is
    hidden and becomes the targets: what ``evaluate --protocol channel:NAME`` asks of the model (a whole band
    predicted from the others).
``forecast``
    (records with at least two distinct times) the elements after a random cut time are hidden and become
    targets; static elements stay visible.
``holdout`` (the default mode)
    a fixed fraction of the record's elements, chosen at random, is hidden and becomes the targets.

Whatever the mode, every record keeps at least one visible element and gets at least one target (a record
with a single element is auto-encoded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from perceiver.packing import segment_ids

AUTOENCODE, MODALITY_DROPOUT, FORECAST, HOLDOUT, CHANNEL_DROPOUT = 0, 1, 2, 3, 4
MODE_NAMES = ("autoencode", "modality_dropout", "forecast", "holdout", "channel_dropout")


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
    #: probability per record of hiding one whole channel (records with one channel fall back to holdout)
    channel_dropout: float = 0.0
    #: in modality-dropout mode: each named modality's own dropout probability (empty: a uniform subset)
    modality_rates: dict[str, float] = field(default_factory=dict)
    #: in modality-dropout mode: the probability of dropping every modality but one (chosen uniformly)
    keep_one: float = 0.0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.modality_rates.items() if not 0.0 <= float(v) <= 1.0}
        if bad or not 0.0 <= self.keep_one <= 1.0:
            raise ValueError(f"modality_rates and keep_one must be probabilities in [0, 1], got "
                             f"{bad or self.keep_one}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        rates = (self.modality_dropout, self.forecast, self.autoencode, self.channel_dropout)
        if min(rates) < 0 or sum(rates) > 1.0 + 1e-9:
            raise ValueError("mode probabilities must be >= 0 and sum to at most 1")


@dataclass
class MaskPlan:
    """Per element: ``visible`` to the encoder, ``target`` of the decoder; per record: the ``mode`` drawn."""

    visible: np.ndarray
    target: np.ndarray
    mode: np.ndarray


def _distinct_per_record(record: np.ndarray, codes: np.ndarray, n_rec: int) -> tuple[np.ndarray, int, np.ndarray]:
    """The distinct (record, code) pairs as ``record * width + code``, sorted (so by record), their ``width``,
    and the number of distinct codes of each record."""
    width = int(codes.max(initial=0)) + 1
    pairs = np.unique(record * width + codes)
    return pairs, width, np.bincount(pairs // width, minlength=n_rec)


def _segment_rank(record: np.ndarray, keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Rank of each element's key within its record (0 = smallest)."""
    order = np.lexsort((keys, record))
    rank = np.empty(len(record), np.int64)
    rank[order] = np.arange(len(record)) - offsets[record[order]]
    return rank


def plan_masks(offsets: np.ndarray, modality: np.ndarray, time: np.ndarray, rng: np.random.Generator,
               config: MaskingConfig, modalities: list[str] | None = None,
               channel: np.ndarray | None = None) -> MaskPlan:
    """Draw a masking plan for packed records (``offsets`` of length B+1, element ``modality``, ``time`` and
    ``channel``; ``modalities``: the names of the modality indices, which ``config.modality_rates`` refers to).
    Without ``channel``, ``channel_dropout`` records fall back to holdout.

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
    n_mod = _distinct_per_record(record, modality, n_rec)[2]
    finite = np.isfinite(time)
    tmin = np.full(n_rec, np.inf)
    tmax = np.full(n_rec, -np.inf)
    np.minimum.at(tmin, record[finite], time[finite])
    np.maximum.at(tmax, record[finite], time[finite])

    channel = np.zeros(n, np.int64) if channel is None else np.asarray(channel, np.int64)
    channel_pairs, width, n_chan = _distinct_per_record(record, channel, n_rec)
    pair_record = channel_pairs // width

    u = rng.random(n_rec)
    c = config
    mode = np.full(n_rec, HOLDOUT, np.int8)
    mode[u < c.autoencode + c.modality_dropout + c.forecast + c.channel_dropout] = CHANNEL_DROPOUT
    mode[u < c.autoencode + c.modality_dropout + c.forecast] = FORECAST
    mode[u < c.autoencode + c.modality_dropout] = MODALITY_DROPOUT
    mode[u < c.autoencode] = AUTOENCODE
    mode[(mode == MODALITY_DROPOUT) & (n_mod < 2)] = HOLDOUT
    mode[(mode == FORECAST) & ~(tmax > tmin)] = HOLDOUT
    mode[(mode == CHANNEL_DROPOUT) & (n_chan < 2)] = HOLDOUT
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

    # modality dropout: drop a non-empty proper subset of the record's modalities (vectorised over records).
    dropping = np.flatnonzero(mode == MODALITY_DROPOUT)
    if len(dropping):
        drop = _dropped_modalities(dropping, record, modality, rng, c, modalities)
        sel = np.isin(record, dropping)
        row = np.searchsorted(dropping, record[sel])
        hidden[sel] = drop[row, modality[sel]]

    # channel dropout: one of the record's channels, chosen uniformly, is hidden whole.
    dropping = np.flatnonzero(mode == CHANNEL_DROPOUT)
    if len(dropping):  # (no draw otherwise: the other modes keep their random stream)
        pick = np.minimum((rng.random(len(dropping)) * n_chan[dropping]).astype(np.int64), n_chan[dropping] - 1)
        dropped = np.full(n_rec, -1)
        dropped[dropping] = channel_pairs[np.searchsorted(pair_record, dropping) + pick] % width
        cd = emode == CHANNEL_DROPOUT
        hidden[cd] = channel[cd] == dropped[record[cd]]

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


def _dropped_modalities(records: np.ndarray, record: np.ndarray, modality: np.ndarray, rng: np.random.Generator,
                        c: MaskingConfig, modalities: list[str] | None) -> np.ndarray:
    """Which modalities (columns) each of ``records`` (rows, each with two or more modalities) drops."""
    n_mod = int(modality.max()) + 1
    present = np.zeros((len(records), n_mod), bool)
    sel = np.isin(record, records)
    present[np.searchsorted(records, record[sel]), modality[sel]] = True
    count = present.sum(1)
    # a random order of each row's present modalities: rank 0 .. count - 1 (absent ones last)
    rank = np.argsort(np.argsort(np.where(present, rng.random(present.shape), np.inf), axis=1), axis=1)
    if c.modality_rates:
        unknown = set(c.modality_rates) - set(modalities or [])
        if unknown:
            raise ValueError(f"masking.modality_rates names modalities {sorted(unknown)} the data does not have "
                             f"(it has {modalities})")
        rate = np.array([float(c.modality_rates.get(m, 0.5)) for m in modalities[:n_mod]] + [0.5] * (n_mod - len(
            modalities)))
        drop = present & (rng.random(present.shape) < rate)
        score = np.where(present, rate, np.nan)
        none, every = ~drop.any(1), (drop == present).all(1)
        drop[none, np.nanargmax(score[none], axis=1)] = True  # drops none: drop the likeliest
        drop[every, np.nanargmin(score[every], axis=1)] = False  # drops all: keep the least likely
    else:
        drop = present & (rank < rng.integers(1, np.maximum(count, 2))[:, None])  # 1 .. count - 1 of them
    keep_one = rng.random(len(records)) < c.keep_one
    drop[keep_one] = present[keep_one] & (rank[keep_one] > 0)
    return drop


def full_plan(offsets: np.ndarray) -> MaskPlan:
    """Everything visible and everything a target (inference, reconstruction of observed elements)."""
    n = int(offsets[-1])
    return MaskPlan(np.ones(n, bool), np.ones(n, bool), np.full(len(offsets) - 1, AUTOENCODE, np.int8))
