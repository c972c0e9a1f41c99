"""The query provider: which outputs are asked for, and the prediction for them.

A decoder query is a position -- (time, channel, coord) -- never a value, so any set can be asked for: the
held-out elements of a batch (what training scores), a regular grid of times per channel (a reconstruction
curve), another modality's wavelengths (a spectrum from photometry). :class:`Queries` packs them per record
like the elements; :func:`predict` encodes a batch's visible elements once and answers them::

    pred = predict(model, batch)                        # every element of the batch, reconstructed
    grid = Queries.from_arrays(time, channel, coord, counts=[n0, n1, n2])  # absolute times, data units
    pred = predict(model, batch, grid)                  # any (time, channel, coord)

``pred.mean`` and ``pred.sigma`` are in normalised units (the contract's): ``sigma`` is the model's uncertainty
about the true value (add a measurement error in quadrature to predict a new observation). ``pred.latent`` is
the mean over the latent array per record (B, d_latent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from perceiver.model import Percival
from perceiver.packing import PackedBatch, offsets_from_counts, segment_ids_tensor, subset_offsets


@dataclass
class Queries:
    """Packed query elements: ``offsets`` (B+1), absolute ``time`` (float64, data units; NaN = static),
    ``channel`` (int64) and ``coord`` (float32; NaN = none); ``error``: the normalised measurement error of
    the observation a query stands for (float32, NaN = unknown; None = none known), which samples include."""

    offsets: torch.Tensor
    time: torch.Tensor
    channel: torch.Tensor
    coord: torch.Tensor
    error: torch.Tensor | None = None

    @classmethod
    def from_arrays(cls, time, channel, coord, counts, error=None) -> Queries:
        """Queries from flat arrays and the number of queries per record (in batch order)."""
        counts = np.asarray(counts, np.int64)
        n = int(counts.sum())
        time = np.broadcast_to(np.asarray(time, np.float64), (n,))
        channel = np.broadcast_to(np.asarray(channel, np.int64), (n,))
        coord = np.broadcast_to(np.asarray(coord, np.float32), (n,))
        offsets = offsets_from_counts(counts)
        err = None if error is None else torch.from_numpy(np.broadcast_to(np.asarray(error, np.float32), (n,)).copy())
        return cls(torch.from_numpy(offsets), torch.from_numpy(time.copy()), torch.from_numpy(channel.copy()),
                   torch.from_numpy(coord.copy()), err)


@dataclass
class Prediction:
    """Per query: ``mean`` and ``sigma`` (normalised units, float32); per record: ``latent`` (B, d_latent) and
    the query ``offsets`` (B+1); ``samples`` (K, N): draws of the queries' observations when asked for (joint
    over a record's queries where the head models that; :meth:`perceiver.heads.OutputHead.sample`)."""

    mean: torch.Tensor
    sigma: torch.Tensor
    latent: torch.Tensor
    offsets: torch.Tensor
    samples: torch.Tensor | None = None


@torch.no_grad()
def predict(model: Percival, batch: PackedBatch, queries: Queries | None = None,
            dtype: torch.dtype | None = None, n_samples: int = 0, seed: int = 0) -> Prediction:
    """Encode the visible elements of ``batch`` and predict ``queries`` (default: every element of the batch).

    ``dtype`` = ``torch.bfloat16`` runs under autocast (faster on GPUs and AMX/AVX512-BF16 CPUs).
    ``n_samples`` > 0 also draws that many samples per query (seeded by ``seed``). The batch and queries
    move to the model's device; the prediction comes back on the CPU.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    model.eval()
    device = next(model.parameters()).device
    batch = batch.to(device)
    vis = batch.visible
    vis_offsets = batch.offsets if bool(vis.all()) else subset_offsets(batch.offsets, vis)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                             enabled=False)
    with ctx:
        # the batch's elements are also the queries by default: their position features are computed once
        position = model.encoding.position_features(batch.time, batch.coord)
        encoded = model.encode(batch.time[vis], batch.channel[vis], batch.coord[vis],
                               batch.value[vis], batch.error[vis], vis_offsets, position[vis])
        if queries is None:
            time, channel, coord, offsets, error = batch.time, batch.channel, batch.coord, batch.offsets, batch.error
        else:
            error = None if queries.error is None else queries.error.to(device)
            if len(queries.offsets) != len(batch.offsets):
                raise ValueError("queries must have one group per record of the batch")
            offsets, position = queries.offsets.to(device), None
            seg = segment_ids_tensor(queries.offsets, "cpu")
            time = (queries.time.double() - batch.t_ref.double().cpu()[seg]).float().to(device)
            channel, coord = queries.channel.to(device), queries.coord.float().to(device)
        if len(channel) and (int(channel.min()) < 0 or int(channel.max()) >= model.config.n_channels):
            raise ValueError("query channel outside the model's channel table")
        out = model.decode(encoded, time, channel, coord, offsets, position)
        samples = None
        if n_samples:
            generator = torch.Generator(device).manual_seed(seed)
            samples = model.head.sample(out, offsets, n_samples, error, generator).float()
    # on the CPU whatever the model's device: callers index and convert to numpy
    return Prediction(out.mean.float().cpu(), torch.exp(out.log_sigma.float()).cpu(),
                      encoded.latents.float().mean(1).cpu(), offsets.cpu(), None if samples is None else samples.cpu())
