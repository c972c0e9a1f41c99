"""Percival: a Perceiver IO encoder-decoder over packed sets of elements.

Reading order (top to bottom of :meth:`Percival.forward`):

1. the *visible* elements of each record become tokens (:class:`~perceiver.encodings.ElementEncoding`:
   position = time, coord, channel, modality; plus measurement = value and error);
2. the learned latent array cross-attends to each record's tokens (one SDPA call per group of records of
   similar length, no compute on padding beyond a bounded slack -- :mod:`perceiver.attention`);
3. a stack of latent self-attention blocks refines the latents (B, L, D);
4. every *target* element becomes a query from its position (never its value) plus what the interpolation
   baselines know about it -- its channel's previous and next *visible* values in the record and the gaps to
   them, and the same for every other channel (:mod:`perceiver.neighbours`) -- and cross-attends to its
   record's latents, then (``decoder_local_heads`` > 0) to a bounded neighbourhood of its record's visible
   element tokens (:mod:`perceiver.local_attention`: a fixed number of elements on each side in time, and of its
   own channel) -- the latents carry the record's summary, the neighbourhood the local evidence (the same
   channel an hour earlier, the same hour's other vitals, the neighbouring pixels); a head returns the mean and
   log-sigma of the normalised value.

Every step is linear in the elements and the queries of a record (the neighbour search sorts once): a record of
10^5 elements costs about 100 times one of 10^3. Without gradients, :meth:`Percival.decode` runs the queries
in chunks of :data:`QUERY_CHUNK`, so inference memory is bounded whatever the number of queries.

Queries need not be observed elements: :func:`perceiver.inference.predict` asks for any (time, channel,
coord).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from datasets.loader.batches import Batch
from perceiver.attention import CrossAttentionBlock, SelfAttentionBlock, plan_varlen
from perceiver.config import ModelConfig
from perceiver.encodings import ElementEncoding
from perceiver.local_attention import LocalAttention
from perceiver.neighbours import NeighbourFeatures

#: queries decoded at once without gradients. Bounds inference memory (the local attention holds
#: QUERY_CHUNK x window x 2 x d_input floats, ~330 MB at the default sizes); a chunk searches only its own
#: records' elements, so only a single record of far more elements than this re-sorts them per chunk.
QUERY_CHUNK = 16384


@dataclass
class Encoded:
    """What the decoder reads about a batch: the ``latents`` (B, L, D) and the visible element ``tokens``
    (packed, N x d_input) with their positions (``time``, ``channel``, ``coord``), normalised ``value`` and
    ``offsets`` (B+1, CPU)."""

    latents: torch.Tensor
    tokens: torch.Tensor
    time: torch.Tensor
    channel: torch.Tensor
    coord: torch.Tensor
    value: torch.Tensor
    offsets: torch.Tensor

    def records(self, first: int, stop: int) -> Encoded:
        """The records ``first .. stop - 1`` only (their latents and element tokens, offsets from 0)."""
        a, b = int(self.offsets[first]), int(self.offsets[stop])
        return Encoded(self.latents[first:stop], self.tokens[a:b], self.time[a:b], self.channel[a:b],
                       self.coord[a:b], self.value[a:b], self.offsets[first:stop + 1] - a)


@dataclass
class ModelOutput:
    """Predictions for the target elements (packed in batch order), the latents, and the target offsets."""

    mean: torch.Tensor
    log_sigma: torch.Tensor
    latents: torch.Tensor
    target_offsets: torch.Tensor


def subset_offsets(offsets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Offsets (B+1, on the CPU) of the elements selected by ``mask`` from packed records."""
    off = np.asarray(offsets.cpu(), np.int64)
    m = np.asarray(mask.cpu(), bool)
    seg = np.repeat(np.arange(len(off) - 1), np.diff(off))
    counts = np.bincount(seg[m], minlength=len(off) - 1)
    return torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


class Percival(nn.Module):
    """The encoder-decoder; see the module docstring. Build it from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        if c.n_channels < 1 or len(c.channel_modality) != c.n_channels:
            raise ValueError("ModelConfig needs the channel vocabulary: call fit_data_statistics first")
        self.encoding = ElementEncoding(c)
        self.latents = nn.Parameter(torch.randn(c.n_latents, c.d_latent) * 0.02)
        self.encoder = CrossAttentionBlock(c.d_latent, c.d_input, c.cross_heads,
                                           c.cross_head_dim or c.d_input, c.cross_mlp_ratio)
        n_blocks = 1 if c.share_weights else c.n_layers
        self.blocks = nn.ModuleList(SelfAttentionBlock(c.d_latent, c.n_heads, c.mlp_ratio)
                                    for _ in range(n_blocks))
        self.query_proj = nn.Linear(c.d_input, c.d_query)
        self.neighbours = (NeighbourFeatures(c.d_query, c.time_min_period, c.coord_min_period,
                                             c.n_channels if c.decoder_snapshot else 0)
                           if c.decoder_neighbours else None)
        head_dim = c.decoder_head_dim or c.d_query // c.decoder_heads
        self.decoder = CrossAttentionBlock(c.d_query, c.d_latent, c.decoder_heads, head_dim,
                                           c.decoder_mlp_ratio)
        self.local_decoder = (LocalAttention(c.d_query, c.d_input, c.decoder_local_heads, c.decoder_local_time,
                                             c.decoder_local_channel, c.time_min_period, c.coord_min_period,
                                             c.decoder_mlp_ratio)
                              if c.decoder_local_heads > 0 else None)
        self.head_norm = nn.LayerNorm(c.d_query)
        self.head = nn.Linear(c.d_query, 2)
        self.log_min_sigma = float(np.log(c.min_sigma))

    def encode(self, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor, value: torch.Tensor,
               error: torch.Tensor, offsets: torch.Tensor) -> Encoded:
        """Latents (B, L, D) and tokens of packed observed elements (``offsets`` B+1 on the CPU)."""
        tokens = self.encoding(time, channel, coord, value, error)
        plan = plan_varlen(offsets, self.config.varlen).to(tokens.device)
        x = self.encoder.latents_to_elements(self.latents, tokens, plan)
        for i in range(self.config.n_layers):
            x = self.blocks[0 if self.config.share_weights else i](x)
        return Encoded(x, tokens, time, channel, coord, value, offsets)

    def decode(self, encoded: Encoded, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor,
               offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-sigma (normalised units, float32) of packed queries (time, channel, coord).

        A query's modality is its channel's (from the channel table); it carries no value. Queries are
        independent of each other: without gradients they run in chunks of :data:`QUERY_CHUNK`.
        """
        n = len(channel)
        if torch.is_grad_enabled() or n <= QUERY_CHUNK:
            return self._decode(encoded, time, channel, coord, offsets)
        off = np.asarray(offsets.cpu(), np.int64)
        outs = []
        for start in range(0, n, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, n)
            # the records this chunk's queries belong to, and only their elements and latents
            first = int(np.searchsorted(off, start, side="right")) - 1
            last = int(np.searchsorted(off, stop, side="left"))
            part = encoded.records(first, last)
            chunk_off = torch.from_numpy(np.clip(off[first:last + 1], start, stop) - start)
            outs.append(self._decode(part, time[start:stop], channel[start:stop], coord[start:stop], chunk_off))
        return torch.cat([m for m, _ in outs]), torch.cat([s for _, s in outs])

    def _decode(self, encoded: Encoded, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor,
                offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.query_proj(self.encoding(time, channel, coord))
        if self.neighbours is not None:
            q = q + self.neighbours(time, channel, coord, offsets, encoded.time, encoded.channel, encoded.coord,
                                    encoded.value, encoded.offsets)
        plan = plan_varlen(offsets, self.config.varlen).to(q.device)
        h = self.decoder.queries_to_latents(q, encoded.latents, plan)
        if self.local_decoder is not None:
            h = self.local_decoder(h, time, channel, coord, offsets, encoded.tokens, encoded.time,
                                   encoded.channel, encoded.coord, encoded.offsets)
        return self.head_outputs(h)

    def head_outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-sigma (float32) from decoded query states; sigma = exp(raw) + min_sigma (smooth)."""
        out = self.head(self.head_norm(h)).float()
        log_sigma = torch.logaddexp(out[:, 1], torch.tensor(self.log_min_sigma, device=out.device))
        return out[:, 0], log_sigma

    def forward(self, batch: Batch) -> ModelOutput:
        """Encode the visible elements of ``batch``, predict its target elements."""
        vis, tgt = batch.visible, batch.target
        all_vis = bool(vis.all())
        sel = (lambda x: x) if all_vis else (lambda x: x[vis])
        vis_offsets = batch.offsets if all_vis else subset_offsets(batch.offsets, vis)
        encoded = self.encode(sel(batch.time), sel(batch.channel), sel(batch.coord), sel(batch.value),
                              sel(batch.error), vis_offsets)
        all_tgt = bool(tgt.all())
        pick = (lambda x: x) if all_tgt else (lambda x: x[tgt])
        tgt_offsets = batch.offsets if all_tgt else subset_offsets(batch.offsets, tgt)
        mean, log_sigma = self.decode(encoded, pick(batch.time), pick(batch.channel), pick(batch.coord),
                                      tgt_offsets)
        return ModelOutput(mean, log_sigma, encoded.latents, tgt_offsets)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
