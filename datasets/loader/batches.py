"""Batches for the model: packed element tensors, length-aware batching, the dataset view of an ElementSet.

A :class:`Batch` holds the elements of B records *packed* one after the other (no padding) plus ``offsets``
(B+1 entries, like ``cu_seqlens``): the elements of record ``b`` are ``offsets[b]:offsets[b + 1]``. Two
boolean arrays say, per element, whether it is ``visible`` to the encoder and whether it is a ``target``
of the decoder (see :mod:`datasets.loader.masking`).

Values and errors are normalised per channel with :func:`datasets.normalise.normalise`; times are relative to
the record's reference time ``t_ref`` (the record's ``t0`` attribute where present, else its first finite
time), so that Fourier features of time see small, precise float32 numbers.

:func:`token_batches` groups records of similar length under a token budget, so that batches cost in
proportion to their real elements and padding (where a padded kernel is used) stays small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch

from datasets.format import ElementSet
from datasets.loader.masking import MaskingConfig, full_plan, plan_masks
from datasets.normalise import normalise

REQUIRED_CHANNEL_COLUMNS = ("name", "modality", "transform", "softening", "location", "scale")


@dataclass
class Batch:
    """Packed elements of B records. Per element (length N): ``time`` (float32, relative to the record's
    ``t_ref``; NaN = static), ``channel``, ``modality`` (int64), ``value`` and ``error`` (float32, normalised;
    error NaN = unknown), ``coord`` (float32; NaN = none), ``visible`` and ``target`` (bool),
    ``element_index`` (int64, index into the source ElementSet's elements). Per record: ``offsets`` (B+1,
    int64), ``record_index`` (int64, index into the ElementSet's records), ``t_ref`` (float64)."""

    offsets: torch.Tensor
    time: torch.Tensor
    channel: torch.Tensor
    modality: torch.Tensor
    value: torch.Tensor
    error: torch.Tensor
    coord: torch.Tensor
    visible: torch.Tensor
    target: torch.Tensor
    record_index: torch.Tensor
    element_index: torch.Tensor
    t_ref: torch.Tensor

    @property
    def n_records(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_elements(self) -> int:
        return len(self.time)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy on ``device`` (``offsets`` and ``t_ref`` stay on the CPU: they steer host-side planning)."""
        keep = {"offsets", "t_ref"}
        return Batch(**{f.name: getattr(self, f.name) if f.name in keep
                        else getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def modality_names(channels: pd.DataFrame) -> list[str]:
    """Modalities in order of first appearance in the channel table (a stable index for embeddings)."""
    return list(dict.fromkeys(channels["modality"].astype(str)))


def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """The record index of every packed element."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` without a Python loop."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    seg = np.repeat(np.arange(len(counts)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.asarray(starts, np.int64)[seg] + np.arange(total) - first[seg]


class ElementDataset:
    """The records of one split of an :class:`ElementSet`, normalised and ready to be packed into batches.

    ``split`` selects records by the ``split`` column of ``elements.records`` (a name or a sequence of names;
    ``None`` takes every record). ``modalities`` fixes the modality index order (pass the trained model's
    list at inference); by default it is the order of first appearance in ``channels``.
    """

    def __init__(self, elements: ElementSet, channels: pd.DataFrame, split: str | Sequence[str] | None = None,
                 modalities: Sequence[str] | None = None):
        missing = [c for c in REQUIRED_CHANNEL_COLUMNS if c not in channels.columns]
        if missing:
            raise ValueError(f"channel table lacks columns {missing} (normalisation statistics are required)")
        self.channels = channels.reset_index(drop=True)
        self.modalities = list(modalities) if modalities is not None else modality_names(self.channels)
        unknown = set(self.channels["modality"].astype(str)) - set(self.modalities)
        if unknown:
            raise ValueError(f"channel table has modalities {sorted(unknown)} not in {self.modalities}")
        lookup = {m: i for i, m in enumerate(self.modalities)}
        self.channel_modality = np.array([lookup[m] for m in self.channels["modality"].astype(str)], np.int64)

        if split is None:
            rec = np.arange(elements.n_records)
        else:
            if "split" not in elements.records.columns:
                raise ValueError("elements.records has no 'split' column; "
                                 "pass split=None to use every record")
            names = [split] if isinstance(split, str) else list(split)
            rec = np.flatnonzero(elements.records["split"].astype(str).isin(names).to_numpy())
        self.elements = elements
        self.record_index = rec
        all_offsets = elements.offsets
        self.lengths = np.asarray(elements.row_size, np.int64)[rec]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.element_index = ranges(all_offsets[rec], self.lengths)

        idx = self.element_index
        self.channel = elements.channel[idx].astype(np.int64)
        if len(self.channel) and (self.channel.min() < 0 or self.channel.max() >= len(self.channels)):
            raise ValueError("element channel index outside the channel table")
        self.value, self.error = normalise(elements.value[idx], elements.error[idx], self.channel,
                                           self.channels)
        self.coord = elements.coord[idx].astype(np.float32)
        self.modality = self.channel_modality[self.channel]

        time = elements.time[idx].astype(np.float64)
        seg = segment_ids(self.offsets)
        t_ref = np.full(len(rec), np.inf)
        finite = np.isfinite(time)
        np.minimum.at(t_ref, seg[finite], time[finite])
        if "t0" in elements.records.columns:
            t0 = pd.to_numeric(elements.records["t0"], errors="coerce").to_numpy(np.float64)[rec]
            t_ref = np.where(np.isfinite(t0), t0, t_ref)
        self.t_ref = np.where(np.isfinite(t_ref), t_ref, 0.0)
        self.time = (time - self.t_ref[seg]).astype(np.float32)

    def __len__(self) -> int:
        return len(self.record_index)

    @property
    def n_elements(self) -> int:
        return int(self.offsets[-1])

    def collate(self, items: Sequence[int] | np.ndarray, masking: MaskingConfig | None = None,
                rng: np.random.Generator | None = None, max_elements: int | None = None) -> Batch:
        """Pack records ``items`` (positions in this dataset) into a :class:`Batch`.

        ``masking`` (with ``rng``) draws a masking plan; without it every element is visible and a target.
        ``max_elements`` crops longer records to a random subset of that many elements (evenly spaced ones
        when ``rng`` is None), keeping their order.
        """
        items = np.asarray(items, np.int64)
        starts, counts = self.offsets[items], self.lengths[items]
        if max_elements is not None and (counts > max_elements).any():
            parts = []
            for s, c in zip(starts, counts, strict=True):
                if c <= max_elements:
                    parts.append(np.arange(s, s + c))
                elif rng is None:
                    parts.append(s + np.linspace(0, c - 1, max_elements).round().astype(np.int64))
                else:
                    parts.append(s + np.sort(rng.choice(c, size=max_elements, replace=False)))
            idx = np.concatenate(parts)
            counts = np.minimum(counts, max_elements)
        else:
            idx = ranges(starts, counts)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if masking is not None:
            if rng is None:
                raise ValueError("a masking plan needs a seeded rng")
            plan = plan_masks(offsets, self.modality[idx], self.time[idx], rng, masking)
        else:
            plan = full_plan(offsets)
        t = torch.from_numpy
        return Batch(offsets=t(offsets), time=t(self.time[idx]), channel=t(self.channel[idx]),
                     modality=t(self.modality[idx]), value=t(self.value[idx]), error=t(self.error[idx]),
                     coord=t(self.coord[idx]), visible=t(plan.visible), target=t(plan.target),
                     record_index=t(self.record_index[items]), element_index=t(self.element_index[idx]),
                     t_ref=t(self.t_ref[items].copy()))


def token_batches(lengths: np.ndarray, max_tokens: int, max_records: int | None = None, shuffle: bool = True,
                  seed: int = 0, epoch: int = 0, pool_batches: int = 64, record_cost: int = 0,
                  max_elements: int | None = None) -> list[np.ndarray]:
    """Length-aware batches of record positions, each costing at most ``max_tokens``.

    A record costs its element count (capped at ``max_elements`` when records are cropped) plus
    ``record_cost`` (the per-record work of the latent stack, in element units). Records are shuffled, cut
    into pools of about ``pool_batches`` batches, sorted by length inside a pool and packed greedily, so a
    batch holds records of similar length; the batch order is shuffled again. A record costing more than the
    budget forms a batch on its own. Deterministic in (``seed``, ``epoch``); ``shuffle=False`` sorts all
    records by length (evaluation, inference).
    """
    lengths = np.asarray(lengths, np.int64)
    cost = (np.minimum(lengths, max_elements) if max_elements is not None else lengths) + record_cost
    n = len(lengths)
    max_records = max_records or n or 1
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
        mean_cost = max(float(cost.mean()) if n else 1.0, 1.0)
        pool = max(1, int(pool_batches * max_tokens / mean_cost))
        pools = [order[i:i + pool] for i in range(0, n, pool)]
    else:
        pools = [np.arange(n)]
    batches: list[np.ndarray] = []
    for p in pools:
        p = p[np.argsort(cost[p], kind="stable")]
        start, total = 0, 0
        for i, r in enumerate(p):
            c = int(cost[r])
            if i > start and (total + c > max_tokens or i - start >= max_records):
                batches.append(p[start:i])
                start, total = i, 0
            total += c
        if len(p):
            batches.append(p[start:])
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def shard(batches: list[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """The batches of one data-parallel rank: every rank gets the same number (the remainder is dropped)."""
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]
