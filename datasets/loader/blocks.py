"""Training data in bounded memory: a split read in blocks of windows, one block in memory per process.

A split of at most ``block_elements`` elements is one block: it is read whole and batched as one set, as
:func:`~datasets.loader.token_batches` and :func:`~datasets.loader.shard` do. A larger split is never read
whole. Its records are cut into contiguous *windows* (one range read each, about a store chunk), and every
epoch deals the windows, in a seeded random order, into *blocks* of ``windows_per_block`` windows (about
``block_elements`` elements, so a block mixes records from all over the store). Data-parallel ranks take the
blocks round-robin, so a rank reads only its own blocks: one rank's memory and I/O do not grow with the store
or with the number of ranks. Batches are drawn inside a block; in each round of blocks (one per rank) every
rank takes the same number of batches, so the ranks stay in step.

The plan is a function of (seed, epoch) and the records' sizes only, so a resumed run reads the same blocks
and draws the same batches as an uninterrupted one.

>>> blocks = RecordBlocks(store.records["row_size"], store.records["split"] == "train", store.read)
>>> plan = blocks.epoch_plan(epoch=0, seed=0, rank=0, batching=dict(max_tokens=4096))
>>> block, items = plan[0]                  # a block number and the positions of a batch's records in it
>>> elements = blocks.read(block, epoch=0, seed=0)   # that block's records (an ElementSet), in item order
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from datasets.format import ELEMENT_DTYPES, ElementSet
from datasets.loader.batches import shard, token_batches

#: elements one process holds of a split at a time (about 60 B each once normalised: ~250 MB)
DEFAULT_BLOCK_ELEMENTS = 1 << 22
#: windows per block: records from that many places of the store in every block
DEFAULT_WINDOWS_PER_BLOCK = 16


class RecordBlocks:
    """The records of one split (``in_split``, a bool per record) of a record source, in blocks.

    ``row_size``: elements per record (all records of the source); ``read(start, stop)``: the source's records
    ``start:stop`` as an :class:`~datasets.format.ElementSet` (``Store.read``, or a slice of one in memory).
    """

    def __init__(self, row_size, in_split, read: Callable[[int, int], ElementSet],
                 block_elements: int = DEFAULT_BLOCK_ELEMENTS, world_size: int = 1,
                 windows_per_block: int = DEFAULT_WINDOWS_PER_BLOCK):
        self.row_size = np.asarray(row_size, np.int64)
        self.in_split = np.asarray(in_split, bool)
        self._read = read
        self.world_size = world_size
        self.n_elements = int(self.row_size[self.in_split].sum())
        n_blocks = -(-self.n_elements // max(int(block_elements), 1))
        #: blocks per epoch: 1 (the split in memory) or a multiple of the ranks, each within the budget
        self.n_blocks = 1 if n_blocks <= 1 else -(-n_blocks // world_size) * world_size
        self.windows_per_block = windows_per_block if self.n_blocks > 1 else 1
        self.windows = self._cut(self.n_blocks * self.windows_per_block)

    @property
    def in_memory(self) -> bool:
        """Whether the split is one block (read once, batched as a whole)."""
        return self.n_blocks == 1

    def _cut(self, n: int) -> np.ndarray:
        """``n`` contiguous record ranges ``[start, stop)`` holding about equal numbers of split elements."""
        counts = np.where(self.in_split, self.row_size, 0)
        cum = np.concatenate([[0], np.cumsum(counts)])
        edges = np.searchsorted(cum, np.linspace(0, cum[-1], n + 1)[1:-1], side="left")
        bounds = np.concatenate([[0], edges, [len(counts)]])
        return np.column_stack([bounds[:-1], bounds[1:]])

    def block_windows(self, block: int, epoch: int, seed: int) -> np.ndarray:
        """The windows (rows of :attr:`windows`) of ``block`` in ``epoch``, in store order."""
        if self.in_memory:
            return self.windows
        order = np.random.default_rng([seed, epoch, 0xB10C]).permutation(len(self.windows))
        m = self.windows_per_block
        return self.windows[np.sort(order[block * m:(block + 1) * m])]

    def records(self, block: int, epoch: int, seed: int) -> np.ndarray:
        """Positions (in the source) of the split's records of ``block``, in the order :meth:`read` gives."""
        parts = [np.arange(a, b) for a, b in self.block_windows(block, epoch, seed)]
        pos = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return pos[self.in_split[pos]]

    def read(self, block: int, epoch: int, seed: int) -> ElementSet:
        """The split's records of ``block`` (one range read per window; other splits' records dropped)."""
        return self._read_windows(self.block_windows(block, epoch, seed))

    def _read_windows(self, windows: np.ndarray) -> ElementSet:
        """The split's records of ``windows``, one range read each, in order."""
        parts = [select(self._read(int(a), int(b)), self.in_split[a:b]) for a, b in windows if b > a]
        return concat(parts) if parts else self._read(0, 0)

    def epoch_plan(self, epoch: int, seed: int, rank: int, batching: dict) -> list[tuple[int, np.ndarray]]:
        """This rank's batches of ``epoch`` (of the ``world_size`` ranks the blocks were made for): (block,
        positions of the batch's records among the block's split records). ``batching`` is
        :func:`token_batches`' keyword arguments (``max_tokens``, ...)."""
        world_size = self.world_size
        if self.in_memory:
            lengths = self.row_size[self.in_split]
            return [(0, items) for items in shard(token_batches(lengths, shuffle=True, seed=seed, epoch=epoch,
                                                                **batching), rank, world_size)]
        plan = []
        for first in range(0, self.n_blocks, world_size):
            batches = [token_batches(self.row_size[self.records(b, epoch, seed)], shuffle=True, seed=seed,
                                     epoch=epoch * self.n_blocks + b, **batching)
                       for b in range(first, first + world_size)]
            n = min(len(b) for b in batches)  # the ranks stay in step: each takes as many batches as the least
            plan += [(first + rank, items) for items in batches[rank][:n]]
        return plan

    def sample(self, budget: int) -> ElementSet:
        """About ``budget`` elements of the split from windows spread evenly over the source (all of it where
        it fits): what a data contract is fitted on and a validation score is computed on."""
        m = DEFAULT_WINDOWS_PER_BLOCK  # m evenly spaced windows of about budget / m elements each
        if self.n_elements <= budget:  # all of it, still one window at a time (memory: the split, not the source)
            windows = self._cut(m)
        else:
            windows = self._cut(-(-m * self.n_elements // max(budget, 1)))
            windows = windows[np.unique(np.linspace(0, len(windows) - 1, m).round().astype(int))]
        return self._read_windows(windows)


def select(elements: ElementSet, keep: np.ndarray) -> ElementSet:
    """The records of ``elements`` where ``keep`` (bool per record), in order."""
    keep = np.asarray(keep, bool)
    if keep.all():
        return elements
    mask = np.repeat(keep, elements.row_size)
    return ElementSet(records=elements.records[keep].reset_index(drop=True), row_size=elements.row_size[keep],
                      **{k: getattr(elements, k)[mask] for k in ELEMENT_DTYPES})


def concat(parts: list[ElementSet]) -> ElementSet:
    """Element sets one after the other."""
    if len(parts) == 1:
        return parts[0]
    return ElementSet(records=pd.concat([p.records for p in parts], ignore_index=True),
                      row_size=np.concatenate([p.row_size for p in parts]),
                      **{k: np.concatenate([getattr(p, k) for p in parts]) for k in ELEMENT_DTYPES})


def slice_reader(elements: ElementSet) -> Callable[[int, int], ElementSet]:
    """``read(start, stop)`` over an ElementSet in memory (records ``start:stop``; the whole set without a copy)."""
    offsets = elements.offsets

    def read(start: int, stop: int) -> ElementSet:
        if start == 0 and stop >= elements.n_records:
            return elements
        e0, e1 = int(offsets[start]), int(offsets[stop])
        return ElementSet(records=elements.records.iloc[start:stop].reset_index(drop=True),
                          row_size=elements.row_size[start:stop],
                          **{k: getattr(elements, k)[e0:e1] for k in ELEMENT_DTYPES})

    return read
