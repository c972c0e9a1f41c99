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

Queries need not be observed elements: :func:`pipelines.run.inference.predict` asks for any (time,
channel, coord). The output head (:mod:`perceiver.heads`; Gaussian by default) turns a decoded query into
a prediction and owns the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from perceiver.attention import CrossAttentionBlock, SelfAttentionBlock, plan_varlen
from perceiver.config import ModelConfig
from perceiver.encodings import ElementEncoding
from perceiver.heads import HeadOutput, build_head
from perceiver.local_attention import LocalAttention
from perceiver.neighbours import NeighbourFeatures
from perceiver.packing import PackedBatch, subset_offsets

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
    """The head's prediction for the target elements (packed in batch order), the latents, and the target
    offsets. ``mean`` / ``log_sigma``: the head's point prediction and scale (normalised units)."""

    head: HeadOutput
    latents: torch.Tensor
    target_offsets: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.head.mean

    @property
    def log_sigma(self) -> torch.Tensor:
        return self.head.log_sigma


class Percival(nn.Module):
    """The encoder-decoder; see the module docstring. Build it from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        z, d = config.sizes, config.decoder
        if config.n_channels < 1:
            raise ValueError("ModelConfig needs its data contract (the channel vocabulary): fit one with "
                             "datasets.loader.fit_contract")
        self.encoding = ElementEncoding(config)
        self.latents = nn.Parameter(torch.randn(z.n_latents, z.d_latent) * 0.02)
        self.encoder = CrossAttentionBlock(z.d_latent, z.d_input, z.cross_heads, z.cross_head_dim or z.d_input,
                                           z.cross_mlp_ratio)
        n_blocks = 1 if z.share_weights else z.n_layers
        self.blocks = nn.ModuleList(SelfAttentionBlock(z.d_latent, z.n_heads, z.mlp_ratio) for _ in range(n_blocks))
        k = config.contract
        self.query_proj = nn.Linear(z.d_input, d.d_query)
        self.neighbours = (NeighbourFeatures(d.d_query, k.time_min_period, k.coord_min_period,
                                             config.n_channels if d.snapshot else 0)
                           if d.neighbours else None)
        self.decoder = CrossAttentionBlock(d.d_query, z.d_latent, d.heads, d.head_dim or d.d_query // d.heads,
                                           d.mlp_ratio)
        self.local_decoder = (LocalAttention(d.d_query, z.d_input, d.local_heads, d.local_time, d.local_channel,
                                             k.time_min_period, k.coord_min_period, d.mlp_ratio)
                              if d.local_heads > 0 else None)
        self.head = build_head(config.head, d.d_query)

    def encode(self, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor, value: torch.Tensor,
               error: torch.Tensor, offsets: torch.Tensor, position: torch.Tensor | None = None) -> Encoded:
        """Latents (B, L, D) and tokens of packed observed elements (``offsets`` B+1 on the CPU;
        ``position``: their position features when already computed)."""
        tokens = self.encoding(time, channel, coord, value, error, position=position)
        plan = plan_varlen(offsets, self.config.varlen).to(tokens.device)
        x = self.encoder.latents_to_elements(self.latents, tokens, plan)
        shared = self.config.sizes.share_weights
        for i in range(self.config.sizes.n_layers):
            x = self.blocks[0 if shared else i](x)
        return Encoded(x, tokens, time, channel, coord, value, offsets)

    def decode(self, encoded: Encoded, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor,
               offsets: torch.Tensor, position: torch.Tensor | None = None) -> HeadOutput:
        """The head's prediction (normalised units, float32) for packed queries (time, channel, coord;
        ``position``: their position features when already computed).

        A query's modality is its channel's (from the contract); it carries no value. Queries are
        independent of each other: without gradients they run in chunks of :data:`QUERY_CHUNK`.
        """
        n = len(channel)
        if torch.is_grad_enabled() or n <= QUERY_CHUNK:
            return self._decode(encoded, time, channel, coord, offsets, position)
        off = np.asarray(offsets.cpu(), np.int64)
        outs = []
        for start in range(0, n, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, n)
            # the records this chunk's queries belong to, and only their elements and latents
            first = int(np.searchsorted(off, start, side="right")) - 1
            last = int(np.searchsorted(off, stop, side="left"))
            part = encoded.records(first, last)
            chunk_off = torch.from_numpy(np.clip(off[first:last + 1], start, stop) - start)
            outs.append(self._decode(part, time[start:stop], channel[start:stop], coord[start:stop], chunk_off,
                                     None if position is None else position[start:stop]))
        return HeadOutput(torch.cat([o.mean for o in outs]), torch.cat([o.log_sigma for o in outs]),
                          {k: torch.cat([o.extra[k] for o in outs]) for k in outs[0].extra})

    def _decode(self, encoded: Encoded, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor,
                offsets: torch.Tensor, position: torch.Tensor | None) -> HeadOutput:
        q = self.query_proj(self.encoding(time, channel, coord, position=position))
        if self.neighbours is not None:
            q = q + self.neighbours(time, channel, coord, offsets, encoded.time, encoded.channel, encoded.coord,
                                    encoded.value, encoded.offsets)
        plan = plan_varlen(offsets, self.config.varlen).to(q.device)
        h = self.decoder.queries_to_latents(q, encoded.latents, plan)
        if self.local_decoder is not None:
            h = self.local_decoder(h, time, channel, coord, offsets, encoded.tokens, encoded.time,
                                   encoded.channel, encoded.coord, encoded.offsets)
        return self.head(h)

    def forward(self, batch: PackedBatch) -> ModelOutput:
        """Encode the visible elements of ``batch``, predict its target elements (position features are
        computed once per element and shared by the two)."""
        vis, tgt = batch.visible, batch.target
        position = self.encoding.position_features(batch.time, batch.coord)
        all_vis = bool(vis.all())
        sel = (lambda x: x) if all_vis else (lambda x: x[vis])
        vis_offsets = batch.offsets if all_vis else subset_offsets(batch.offsets, vis)
        encoded = self.encode(sel(batch.time), sel(batch.channel), sel(batch.coord), sel(batch.value),
                              sel(batch.error), vis_offsets, sel(position))
        all_tgt = bool(tgt.all())
        pick = (lambda x: x) if all_tgt else (lambda x: x[tgt])
        tgt_offsets = batch.offsets if all_tgt else subset_offsets(batch.offsets, tgt)
        head = self.decode(encoded, pick(batch.time), pick(batch.channel), pick(batch.coord), tgt_offsets,
                           pick(position))
        return ModelOutput(head, encoded.latents, tgt_offsets)

    def loss(self, batch: PackedBatch, output: ModelOutput) -> torch.Tensor:
        """The head's training loss on the target elements of ``batch``."""
        t = batch.target
        return self.head.loss(output.head, batch.value[t], batch.error[t], output.target_offsets)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
