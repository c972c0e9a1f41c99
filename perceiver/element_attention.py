"""The decoder's second look: each query attends to its own record's visible elements.

The latents summarise a record; some questions are answered by the record's own nearby evidence -- the same
channel an hour earlier, the same hour's other vitals, the neighbouring pixels of a spectrum -- which is what
interpolation uses and what a small latent array cannot hold exactly. Here a query reads that evidence. To the
content term ``q . k`` its attention logits add a learned kernel of the relative position, per head ``h``::

    alpha_h [same channel] + sum_k beta_hk cos(2 pi (t_q - t_e) / P_k) + sum_k gamma_hk cos(2 pi (x_q - x_e) / Q_k)

(``t`` time, ``x`` coord, ``P_k``/``Q_k`` the Fourier periods of :mod:`perceiver.encodings`). Because
``cos(a - b) = cos a cos b + sin a sin b``, the kernel is exactly a dot product of extra query and key dimensions,
so the whole attention stays one ``scaled_dot_product_attention`` call per group of records, with no
(queries x elements) bias matrix in memory. Static elements (no time) and elements without a coord contribute
no time / coord term. Cost: queries x visible elements per record.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from perceiver.attention import MLP, VarlenPlan, attend_packed_pairs
from perceiver.config import ModelConfig
from perceiver.encodings import ElementEncoding


class ElementAttention(nn.Module):
    """Pre-LayerNorm cross-attention from packed queries (d_query) to their record's element tokens (d_input),
    with the relative-position kernel of the module docstring, then an MLP; residual on the queries."""

    def __init__(self, config: ModelConfig, encoding: ElementEncoding):
        super().__init__()
        c = config
        self.heads = c.decoder_element_heads
        self.head_dim = max(c.d_input // self.heads, 8)
        inner = self.heads * self.head_dim
        self.encoding = [encoding]  # its Fourier features and channel count (a list: not a second submodule)
        self.n_channels = max(c.n_channels, 1)
        n_time, n_coord = len(encoding.time_features.inv_period), len(encoding.coord_features.inv_period)
        self.q_norm = nn.LayerNorm(c.d_query)
        self.kv_norm = nn.LayerNorm(c.d_input)
        self.q = nn.Linear(c.d_query, inner)
        self.kv = nn.Linear(c.d_input, 2 * inner)
        self.proj = nn.Linear(inner, c.d_query)
        self.norm2 = nn.LayerNorm(c.d_query)
        self.mlp = MLP(c.d_query, c.decoder_mlp_ratio)
        #: kernel weights in logit units: a same-channel bonus, and one weight per time / coord frequency.
        #: The bonus starts spread over the heads (0 to 8): one head reads the same channel's nearest values
        #: (interpolation's evidence, even for a lab drawn a day away), others the same moment's other channels.
        self.same_channel = nn.Parameter(torch.linspace(0.0, 8.0, self.heads))
        self.time_kernel = nn.Parameter(torch.full((self.heads, n_time), 4.0 / n_time))
        self.coord_kernel = nn.Parameter(torch.full((self.heads, n_coord), 4.0 / n_coord))

    def _position(self, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        """(N, n_channels + 2 n_time + 2 n_coord) key-side position features: one-hot channel, sin/cos of
        time and coord (zero where static / no coord)."""
        enc = self.encoding[0]
        static, no_coord = torch.isnan(time), torch.isnan(coord)
        tf = enc.time_features(torch.nan_to_num(time, nan=0.0)) * (~static)[:, None]
        cf = enc.coord_features(torch.nan_to_num(coord.float(), nan=0.0)) * (~no_coord)[:, None]
        onehot = nn.functional.one_hot(channel.long(), self.n_channels).to(tf.dtype)
        return torch.cat([onehot, tf, cf], dim=-1)

    def _kernel_weights(self) -> torch.Tensor:
        """(H, n_position) per-head weights matching :meth:`_position`'s columns (sin and cos share one)."""
        n = self.n_channels
        return torch.cat([self.same_channel[:, None].expand(-1, n), self.time_kernel.repeat(1, 2),
                          self.coord_kernel.repeat(1, 2)], dim=1)

    def forward(self, queries: torch.Tensor, q_time: torch.Tensor, q_channel: torch.Tensor,
                q_coord: torch.Tensor, plan: VarlenPlan, tokens: torch.Tensor, e_time: torch.Tensor,
                e_channel: torch.Tensor, e_coord: torch.Tensor, e_offsets: torch.Tensor) -> torch.Tensor:
        """Packed ``queries`` (N, d_query) at their positions read their record's ``tokens`` (M, d_input) at
        theirs (``e_offsets`` B+1 on the CPU) -> (N, d_query)."""
        h = self.heads
        q = self.q(self.q_norm(queries)).view(-1, h, self.head_dim)
        kv = self.kv(self.kv_norm(tokens)).view(-1, 2, h, self.head_dim)
        k_pos = self._position(e_time, e_channel, e_coord)
        q_pos = self._position(q_time, q_channel, q_coord)
        d_total = self.head_dim + q_pos.shape[1]
        # SDPA divides every logit by sqrt(d_total); pre-multiplying keeps the kernel weights in logit units
        q_pos = q_pos[:, None, :] * self._kernel_weights()[None] * math.sqrt(d_total)
        q_full = torch.cat([q, q_pos.to(q.dtype)], dim=-1)
        k_full = torch.cat([kv[:, 0], k_pos[:, None, :].expand(-1, h, -1).to(kv.dtype)], dim=-1)
        a = attend_packed_pairs(q_full, k_full, kv[:, 1], plan, e_offsets).reshape(-1, h * self.head_dim)
        x = queries + self.proj(a)
        return x + self.mlp(self.norm2(x))
