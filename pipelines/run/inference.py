"""Inference: latents and predictions for any query elements of a batch of records.

    from perceiver import load
    from pipelines.run.inference import Queries, predict
    from datasets.loader import ElementDataset

    model = load("runs/demo")
    ds = ElementDataset(elements, channels, model.config.contract, split="test")  # the model's normalisation
    batch = ds.collate([0, 1, 2])                       # every element visible
    pred = predict(model, batch)                        # reconstruct the observed elements
    grid = Queries.from_arrays(time, channel, coord, counts=[n0, n1, n2])  # absolute times, data units
    pred = predict(model, batch, grid)                  # any (time, channel, coord): a grid, another modality
    value, sigma = datasets.normalise.denormalise(pred.mean, pred.sigma, grid.channel, model.config.contract)

``pred.mean`` and ``pred.sigma`` are in normalised units: ``sigma`` is the model's uncertainty about the true
value (add a measurement error in quadrature to predict a new observation). ``pred.latent`` is the mean over
the latent array per record (B, d_latent).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from datasets.loader import ElementDataset
from perceiver.model import Percival
from perceiver.packing import PackedBatch, offsets_from_counts, ranges, segment_ids, subset_offsets


@dataclass
class Queries:
    """Packed query elements: ``offsets`` (B+1), absolute ``time`` (float64, data units; NaN = static),
    ``channel`` (int64) and ``coord`` (float32; NaN = none)."""

    offsets: torch.Tensor
    time: torch.Tensor
    channel: torch.Tensor
    coord: torch.Tensor

    @classmethod
    def from_arrays(cls, time, channel, coord, counts) -> Queries:
        """Queries from flat arrays and the number of queries per record (in batch order)."""
        counts = np.asarray(counts, np.int64)
        n = int(counts.sum())
        time = np.broadcast_to(np.asarray(time, np.float64), (n,))
        channel = np.broadcast_to(np.asarray(channel, np.int64), (n,))
        coord = np.broadcast_to(np.asarray(coord, np.float32), (n,))
        offsets = offsets_from_counts(counts)
        return cls(torch.from_numpy(offsets), torch.from_numpy(time.copy()), torch.from_numpy(channel.copy()),
                   torch.from_numpy(coord.copy()))


@dataclass
class Prediction:
    """Per query: ``mean`` and ``sigma`` (normalised units, float32); per record: ``latent`` (B, d_latent) and
    the query ``offsets`` (B+1)."""

    mean: torch.Tensor
    sigma: torch.Tensor
    latent: torch.Tensor
    offsets: torch.Tensor


@torch.no_grad()
def predict(model: Percival, batch: PackedBatch, queries: Queries | None = None,
            dtype: torch.dtype | None = None) -> Prediction:
    """Encode the visible elements of ``batch`` and predict ``queries`` (default: every element of the batch).

    ``dtype`` = ``torch.bfloat16`` runs under autocast (faster on GPUs and AMX/AVX512-BF16 CPUs).
    """
    model.eval()
    device = next(model.parameters()).device
    batch = batch.to(device)
    vis = batch.visible
    vis_offsets = batch.offsets if bool(vis.all()) else subset_offsets(batch.offsets, vis)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                             enabled=False)
    with ctx:
        encoded = model.encode(batch.time[vis], batch.channel[vis], batch.coord[vis],
                               batch.value[vis], batch.error[vis], vis_offsets)
        if queries is None:
            time, channel, coord, offsets = batch.time, batch.channel, batch.coord, batch.offsets
        else:
            if len(queries.offsets) != len(batch.offsets):
                raise ValueError("queries must have one group per record of the batch")
            offsets = queries.offsets
            seg = torch.repeat_interleave(torch.arange(batch.n_records), offsets[1:] - offsets[:-1])
            time = (queries.time.double() - batch.t_ref.double()[seg]).float().to(device)
            channel, coord = queries.channel.to(device), queries.coord.float().to(device)
        if len(channel) and (int(channel.min()) < 0 or int(channel.max()) >= model.config.n_channels):
            raise ValueError("query channel outside the model's channel table")
        out = model.decode(encoded, time, channel, coord, offsets)
    return Prediction(out.mean.float(), torch.exp(out.log_sigma.float()), encoded.latents.float().mean(1), offsets)


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
                   dtype: torch.dtype | None = None) -> tuple[np.ndarray, Prediction]:
    """Predict the ``hidden`` elements (bool per dataset element) of records ``items`` from their other
    elements: the dataset positions of the hidden elements (packed order) and the prediction for them."""
    items = np.asarray(items, np.int64)
    batch, idx = masked_batch(ds, items, hidden)
    h = hidden[idx]
    q = idx[h]
    counts = np.bincount(segment_ids(offsets_from_counts(ds.lengths[items]))[h], minlength=len(items))
    queries = Queries.from_arrays(ds.elements.time[ds.element_index[q]], ds.channel[q], ds.coord[q], counts=counts)
    return q, predict(model, batch, queries, dtype=dtype)
