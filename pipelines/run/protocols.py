"""Evaluation protocols: which elements of a split are hidden from the encoder and scored.

``holdout`` (or ``holdout:FRACTION``)
    a fixed fraction (default 30 %, rounded per record, at least one hidden and one kept) of every record's
    elements, drawn by :func:`datasets.loader.plan_masks` in its ``holdout`` mode only. Records of a single
    element hide nothing and are not scored.
``modality:NAME``
    every element of modality ``NAME`` (e.g. PhysioNet ``labs`` from ``vitals`` + ``static``; DESI
    ``spectrum`` from ``photometry``), in the records that have that modality *and* at least one other; the
    other records are not scored.
``channel:NAME``
    every element of channel ``NAME`` (e.g. PLAsTiCC ``lsst_u``: a band predicted from the others), in the
    records that have that channel *and* an element of another channel.

The plan of a split is a function of (``seed``, split name, the records evaluated) only: the same seed gives
the same hidden elements on every run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from datasets.loader import ElementDataset, MaskingConfig, plan_masks
from datasets.loader.blocks import RecordBlocks
from datasets.store.reader import Store
from perceiver.contract import DataContract
from perceiver.packing import segment_ids

log = logging.getLogger("pipelines.run.protocols")

#: each split's stream of the seeded generator (the plan of a split never depends on another split)
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Protocol:
    """``kind`` is ``holdout`` (hide ``fraction`` of every record's elements), ``modality`` (hide modality
    ``target`` in the records that have it and another modality) or ``channel`` (hide channel ``target`` in the
    records that have it and another channel)."""

    kind: str
    target: str | None = None
    fraction: float = 0.3

    @property
    def modality(self) -> str | None:
        """The hidden modality of a ``modality`` protocol."""
        return self.target if self.kind == "modality" else None

    @classmethod
    def parse(cls, spec: str | Protocol) -> Protocol:
        """``"holdout"``, ``"holdout:0.3"``, ``"modality:NAME"`` or ``"channel:NAME"``."""
        if isinstance(spec, Protocol):
            return spec
        kind, _, arg = str(spec).partition(":")
        if kind == "holdout":
            fraction = float(arg) if arg else 0.3
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"holdout fraction must be in (0, 1), got {spec!r}")
            return cls("holdout", None, fraction)
        if kind in ("modality", "channel") and arg:
            return cls(kind, arg)
        raise ValueError(f"unknown protocol {spec!r}: use 'holdout', 'holdout:FRACTION', 'modality:NAME' or "
                         "'channel:NAME'")

    @property
    def name(self) -> str:
        if self.kind in ("modality", "channel"):
            return f"{self.kind}:{self.target}"
        return "holdout" if self.fraction == 0.3 else f"holdout:{self.fraction:g}"

    @property
    def slug(self) -> str:
        """A file-name and artifact-key friendly name (lowercase letters, digits, dashes)."""
        text = self.name.replace(":", "-").replace(".", "p").lower()
        return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in text)

    def describe(self) -> str:
        if self.kind in ("modality", "channel"):
            return (f"all `{self.target}` elements hidden, in records that have `{self.target}` and at least "
                    f"one other {self.kind}")
        return f"{self.fraction:.0%} of each record's elements hidden at random (rounded per record)"


def hidden_elements(offsets: np.ndarray, modality: np.ndarray, time: np.ndarray, protocol: Protocol | str,
                    modalities: list[str], rng: np.random.Generator, channel: np.ndarray | None = None,
                    channel_names: list[str] | None = None) -> np.ndarray:
    """Boolean per packed element: hidden from the encoder and scored.

    ``offsets`` (B+1), element ``modality`` (index into ``modalities``), ``time`` and ``channel`` (index into
    ``channel_names``) describe packed records. ``holdout`` uses :func:`~datasets.loader.plan_masks` with its
    hold-out mode only (``round(fraction * n)`` elements per record, at least one hidden and one kept; a
    one-element record hides nothing). ``modality`` / ``channel`` hide the named modality / channel where the
    record also has another one; ``rng`` is not used there.
    """
    protocol = Protocol.parse(protocol)
    offsets = np.asarray(offsets, np.int64)
    modality = np.asarray(modality, np.int64)
    if protocol.kind == "holdout":
        config = MaskingConfig(holdout=protocol.fraction, modality_dropout=0.0, forecast=0.0, autoencode=0.0)
        plan = plan_masks(offsets, modality, time, rng, config)
        return ~plan.visible
    kind_codes, names = (modality, modalities) if protocol.kind == "modality" else (channel, channel_names)
    if names is None or protocol.target not in names:
        raise ValueError(f"protocol {protocol.name!r}: no {protocol.kind} {protocol.target!r} (have {names})")
    n_rec = len(offsets) - 1
    record = segment_ids(offsets)
    is_m = np.asarray(kind_codes, np.int64) == names.index(protocol.target)
    has_m = np.bincount(record[is_m], minlength=n_rec) > 0
    has_other = np.bincount(record[~is_m], minlength=n_rec) > 0
    return is_m & (has_m & has_other)[record]


#: elements of a split an evaluation holds at a time (~1 GB normalised): a larger split is scored on a sample
#: of windows of records spread over the store (the full PhysioNet and PLAsTiCC splits are far below it)
EVALUATION_ELEMENTS = 1 << 24


def load_split(store: Store, split: str, contract: DataContract, max_records: int | None = None,
               max_elements: int = EVALUATION_ELEMENTS) -> ElementDataset:
    """The records of ``split`` (the first ``max_records`` in store order), normalised with the model's
    ``contract``, as an ElementDataset. The store is read window by window, so memory holds the split, not the
    store; a split of more than ``max_elements`` elements is sampled (16 windows of records spread over it,
    about ``max_elements`` in all, logged)."""
    in_split = store.records["split"].astype(str).to_numpy() == split
    if max_records is not None:
        positions = np.flatnonzero(in_split)[:max_records]
        return ElementDataset(store.take(positions), store.channels, contract, where=store.url)
    blocks = RecordBlocks(store.records["row_size"].to_numpy(), in_split, store.read, max_elements)
    if blocks.n_elements > max_elements:
        log.warning("%s: the %s split has %d elements, more than %d: scoring a sample of windows spread over it",
                    store.url, split, blocks.n_elements, max_elements)
    return ElementDataset(blocks.sample(max_elements), store.channels, contract, where=store.url)


def split_plan(ds: ElementDataset, protocol: Protocol | str, seed: int, split: str) -> np.ndarray:
    """The hidden elements of a split's dataset (packed dataset order) for ``protocol`` and ``seed``."""
    rng = np.random.default_rng([seed, SPLIT_STREAM.get(split, 99)])
    return hidden_elements(ds.offsets, ds.modality, ds.time, protocol, ds.modalities, rng, ds.channel,
                           ds.channels["name"].astype(str).tolist())


def hidden_counts(ds: ElementDataset, hidden: np.ndarray) -> np.ndarray:
    """Hidden elements per record of the dataset."""
    return np.bincount(segment_ids(ds.offsets)[hidden], minlength=len(ds)).astype(np.int64)
