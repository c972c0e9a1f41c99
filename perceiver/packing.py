"""Packed records: the model's batch type and the one home of offsets, segment ids and ranges.

A :class:`PackedBatch` holds the elements of B records *packed* one after the other (no padding) plus
``offsets`` (B+1 entries, like ``cu_seqlens``): the elements of record ``b`` are ``offsets[b]:offsets[b + 1]``.
Two boolean tensors say, per element, whether it is ``visible`` to the encoder and whether it is a ``target``
of the decoder. The loader (:mod:`datasets.loader`) fills it; the model reads nothing else.

Build one by hand (no store needed)::

    import torch
    from perceiver import PackedBatch
    batch = PackedBatch.from_elements(time=torch.tensor([0., 1., 2., 0.5]), channel=torch.tensor([0, 1, 0, 1]),
                                      value=torch.randn(4), counts=[3, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """Offsets (B+1, int64) of records of ``counts`` elements each."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64)


def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """The record index of every packed element (numpy)."""
    offsets = np.asarray(offsets, np.int64)
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def segment_ids_tensor(offsets: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The record index of every packed element, as a tensor on ``device`` (``offsets`` B+1, CPU)."""
    counts = torch.diff(torch.as_tensor(offsets, dtype=torch.int64))
    n = int(offsets[-1])
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts.to(device), output_size=n)


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` without a Python loop."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = offsets_from_counts(counts)
    seg = segment_ids(offsets)
    return np.asarray(starts, np.int64)[seg] + np.arange(total) - offsets[seg]


def subset_offsets(offsets: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Offsets (B+1, CPU tensor) of the elements selected by ``mask`` from packed records."""
    off = np.asarray(offsets.cpu() if isinstance(offsets, torch.Tensor) else offsets, np.int64)
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, bool)
    counts = np.bincount(segment_ids(off)[m], minlength=len(off) - 1)
    return torch.from_numpy(offsets_from_counts(counts))


@dataclass
class PackedBatch:
    """Packed elements of B records. Per element (length N): ``time`` (float32, relative to the record's
    ``t_ref``; NaN = static), ``channel`` and ``modality`` (int64, indices into the model's data contract),
    ``value`` and ``error`` (float32, normalised; error NaN = unknown), ``coord`` (float32; NaN = none),
    ``visible`` and ``target`` (bool), ``element_index`` (int64, the element's position in its source, -1 when
    built by hand). Per record: ``offsets`` (B+1, int64), ``record_index`` (int64, the record's position in its
    source), ``t_ref`` (float64, the record's reference time in data units)."""

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

    @classmethod
    def from_elements(cls, time: torch.Tensor, channel: torch.Tensor, value: torch.Tensor, counts,
                      error: torch.Tensor | None = None, coord: torch.Tensor | None = None,
                      modality: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                      target: torch.Tensor | None = None) -> PackedBatch:
        """A batch from flat (already normalised) element tensors and the element count of each record.
        Missing errors and coords are NaN (unknown / none); every element is visible and a target unless
        ``visible`` / ``target`` say otherwise; ``modality`` defaults to 0 (the model derives a query's
        modality from its channel)."""
        n = len(time)
        offsets = torch.from_numpy(offsets_from_counts(counts))
        if int(offsets[-1]) != n:
            raise ValueError(f"counts sum to {int(offsets[-1])}, but there are {n} elements")
        nan = torch.full((n,), math.nan)
        b = len(offsets) - 1
        return cls(offsets=offsets, time=time.float(), channel=channel.long(),
                   modality=modality.long() if modality is not None else torch.zeros(n, dtype=torch.int64),
                   value=value.float(), error=error.float() if error is not None else nan,
                   coord=coord.float() if coord is not None else nan.clone(),
                   visible=visible if visible is not None else torch.ones(n, dtype=torch.bool),
                   target=target if target is not None else torch.ones(n, dtype=torch.bool),
                   record_index=torch.arange(b), element_index=torch.full((n,), -1, dtype=torch.int64),
                   t_ref=torch.zeros(b, dtype=torch.float64))

    @property
    def n_records(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_elements(self) -> int:
        return len(self.time)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy on ``device`` (``offsets`` and ``t_ref`` stay on the CPU: they steer host-side planning)."""
        keep = {"offsets", "t_ref"}
        return PackedBatch(**{f.name: getattr(self, f.name) if f.name in keep
                              else getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in fields(self)})

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})
