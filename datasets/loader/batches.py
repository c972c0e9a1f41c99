"""Batches for the model: the dataset view of an ElementSet, packed into :class:`perceiver.PackedBatch` es, and
length-aware batching.

Values and errors are normalised per channel with the *model's data contract* (:mod:`datasets.loader.contract`;
:func:`datasets.normalise.normalise`), never with a store's current statistics; times are relative to the
record's reference time ``t_ref`` (the record's ``t0`` attribute where present, else its first finite time), so
that Fourier features of time see small, precise float32 numbers.

:func:`token_batches` groups records of similar length under a token budget, so that batches cost in
proportion to their real elements and padding (where a padded kernel is used) stays small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from datasets.format import ElementSet
from datasets.loader.contract import complete_from_store, fit_contract, match_channels
from datasets.loader.masking import MaskingConfig, full_plan, plan_masks
from datasets.normalise import normalise
from perceiver.contract import DataContract
from perceiver.packing import PackedBatch, offsets_from_counts, ranges, segment_ids


class ElementDataset:
    """The records of one split of an :class:`ElementSet`, normalised with a data contract and ready to be
    packed into batches.

    ``channels`` is the store's channel table (it says what the ElementSet's channel codes mean);
    ``contract`` the model's (:func:`datasets.loader.fit_contract` of ``elements`` when None: a model not
    trained yet). Element channels become the contract's indices; elements of channels the contract lacks are
    left out (a warning names them). ``split`` selects records by the ``split`` column of
    ``elements.records`` (a name or a sequence of names; ``None`` takes every record). ``where`` names the
    store in error messages.
    """

    def __init__(self, elements: ElementSet, channels: pd.DataFrame, contract: DataContract | None = None,
                 split: str | Sequence[str] | None = None, where: str = "the store"):
        self.contract = fit_contract(elements, channels) if contract is None else complete_from_store(
            contract, channels, where)
        code = match_channels(self.contract, channels.reset_index(drop=True), where)
        #: the store's channel code of each contract channel
        self.store_channel = np.zeros(self.contract.n_channels, np.int64)
        self.store_channel[code[code >= 0]] = np.flatnonzero(code >= 0)
        #: the store's channel table in contract order (names, units, band wavelengths: for display; values
        #: are normalised with ``contract``, never with this table's statistics)
        self.channels = channels.iloc[self.store_channel].reset_index(drop=True)
        self.modalities = list(self.contract.modalities)
        self.channel_modality = np.asarray(self.contract.channel_modality, np.int64)

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
        lengths = np.asarray(elements.row_size, np.int64)[rec]
        idx = ranges(elements.offsets[rec], lengths)
        store_channel = elements.channel[idx].astype(np.int64)
        if len(store_channel) and (store_channel.min() < 0 or store_channel.max() >= len(code)):
            raise ValueError("element channel index outside the channel table")
        channel = code[store_channel]
        keep = channel >= 0
        if not keep.all():  # channels outside the contract (announced by match_channels)
            lengths = np.bincount(segment_ids(offsets_from_counts(lengths))[keep], minlength=len(rec))
            idx, channel = idx[keep], channel[keep]
        self.lengths = lengths.astype(np.int64)
        self.offsets = offsets_from_counts(self.lengths)
        self.element_index = idx
        self.channel = channel
        self.value, self.error = normalise(elements.value[idx], elements.error[idx], channel,
                                           self.contract.table())
        self.coord = elements.coord[idx].astype(np.float32)
        self.modality = self.channel_modality[channel]

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
                rng: np.random.Generator | None = None, max_elements: int | None = None) -> PackedBatch:
        """Pack records ``items`` (positions in this dataset) into a :class:`~perceiver.PackedBatch`.

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
        offsets = offsets_from_counts(counts)
        if masking is not None:
            if rng is None:
                raise ValueError("a masking plan needs a seeded rng")
            plan = plan_masks(offsets, self.modality[idx], self.time[idx], rng, masking, self.modalities,
                              self.channel[idx])
        else:
            plan = full_plan(offsets)
        t = torch.from_numpy
        return PackedBatch(offsets=t(offsets), time=t(self.time[idx]), channel=t(self.channel[idx]),
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
