"""Predictions for the held-out elements of a dataset's records (evaluation, out-of-sample reconstruction).

The query provider itself (:class:`perceiver.queries.Queries`, :func:`perceiver.queries.predict`) is part of
the model core; this module builds batches with chosen elements hidden from an :class:`ElementDataset`::

    from perceiver import load
    from datasets.loader import ElementDataset
    from pipelines.run.inference import predict_hidden

    model = load("runs/demo")
    ds = ElementDataset(elements, channels, model.config.contract)   # normalised with the model's contract
    positions, pred = predict_hidden(model, ds, items=[0, 1], hidden=hidden)  # hidden: bool per element
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from datasets.loader import ElementDataset
from perceiver.model import Percival
from perceiver.packing import PackedBatch, offsets_from_counts, ranges, segment_ids
from perceiver.queries import Prediction, Queries, predict

__all__ = ["Prediction", "Queries", "masked_batch", "predict", "predict_hidden"]


def masked_batch(ds: ElementDataset, items: np.ndarray, hidden: np.ndarray) -> tuple[PackedBatch, np.ndarray]:
    """Records ``items`` of ``ds`` packed, with the ``hidden`` elements (bool per dataset element) invisible and
    the targets; also the dataset element positions of the batch's elements."""
    items = np.asarray(items, np.int64)
    batch = ds.collate(items)
    idx = ranges(ds.offsets[items], ds.lengths[items])
    h = hidden[idx]
    batch = dataclasses.replace(batch, visible=torch.from_numpy(~h), target=torch.from_numpy(h.copy()))
    return batch, idx


def predict_hidden(model: Percival, ds: ElementDataset, items: np.ndarray, hidden: np.ndarray,
                   dtype: torch.dtype | None = None, n_samples: int = 0, seed: int = 0
                   ) -> tuple[np.ndarray, Prediction]:
    """Predict the ``hidden`` elements (bool per dataset element) of records ``items`` from their other
    elements: the dataset positions of the hidden elements (packed order) and the prediction for them (with
    ``n_samples`` draws of each, their measurement errors included)."""
    items = np.asarray(items, np.int64)
    batch, idx = masked_batch(ds, items, hidden)
    h = hidden[idx]
    q = idx[h]
    counts = np.bincount(segment_ids(offsets_from_counts(ds.lengths[items]))[h], minlength=len(items))
    queries = Queries.from_arrays(ds.elements.time[ds.element_index[q]], ds.channel[q], ds.coord[q], counts=counts,
                                  error=ds.error[q])
    return q, predict(model, batch, queries, dtype=dtype, n_samples=n_samples, seed=seed)
