"""The decoder's local look: each query reads a bounded neighbourhood of its record's visible elements.

The latents summarise a record; some questions are answered by the record's own nearby evidence -- the same
channel an hour earlier, the same hour's other vitals, the neighbouring pixels of a spectrum -- which is what
interpolation uses and what a small latent array cannot hold exactly. Here a query reads that evidence, at a
cost that does not grow with the record: it attends to at most

- ``decoder_local_time`` visible elements on each side of it in time (any channel; along wavelength among
  elements of one time, so a spectrum pixel reads its neighbouring pixels), and
- ``decoder_local_channel`` visible elements of its *own* channel on each side (a lab drawn daily still sees
  yesterday's and tomorrow's value, however many vitals lie between),

plus one learned *null* element (so a query with no neighbour -- a static element, a channel the record never
shows -- attends to something and falls back to the latents). The neighbourhoods come from one sort of the
record's elements (:func:`perceiver.neighbours.key_windows`, O(log N) per query after the sort), so a record
of N elements and Q queries costs O((N + Q) log(N + Q)) to search and O(Q x K) to attend, K fixed: linear, where
attending to every element of the record would be O(Q x N).

A key is the element's token plus a learned map of its position *relative to the query*: the signed log
gap in time (in units of the shortest Fourier period) and in wavelength, whether it is the query's channel,
whether it is static, and which window found it. So a head can weigh "the same channel, 2 hours earlier"
differently from "another vital, this hour".
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver.attention import MLP
from perceiver.neighbours import key_windows

#: relative-position features of a (query, element) pair, see :meth:`LocalAttention._relative`
N_RELATIVE = 7
#: queries attended at once without gradients (keeps the gathered keys around 2048 x 25 x 128 floats)
LOCAL_CHUNK = 2048


class LocalAttention(nn.Module):
    """Pre-LayerNorm cross-attention from packed queries (``d_query``) to a bounded window of their record's
    element tokens (``d_input``), then an MLP; residual on the queries. See the module docstring."""

    def __init__(self, d_query: int, d_input: int, heads: int, time_each_side: int, channel_each_side: int,
                 time_scale: float, coord_scale: float, mlp_ratio: float):
        super().__init__()
        if heads < 1 or time_each_side < 0 or channel_each_side < 0:
            raise ValueError("local attention needs heads >= 1 and window sizes >= 0")
        self.heads = heads
        self.head_dim = max(d_input // heads, 8)
        self.time_each_side, self.channel_each_side = time_each_side, channel_each_side
        self.time_scale, self.coord_scale = float(time_scale), float(coord_scale)
        inner = heads * self.head_dim
        self.q_norm = nn.LayerNorm(d_query)
        self.kv_norm = nn.LayerNorm(d_input)
        self.q = nn.Linear(d_query, inner)
        self.kv = nn.Linear(d_input, 2 * inner)
        self.relative = nn.Parameter(torch.randn(N_RELATIVE, 2 * inner) * N_RELATIVE ** -0.5)
        self.relative_bias = nn.Parameter(torch.zeros(2 * inner))
        self.null_kv = nn.Parameter(torch.zeros(2 * inner))
        self.proj = nn.Linear(inner, d_query)
        self.norm2 = nn.LayerNorm(d_query)
        self.mlp = MLP(d_query, mlp_ratio)

    @property
    def window(self) -> int:
        """Elements a query reads at most (the null element not counted)."""
        return 2 * (self.time_each_side + self.channel_each_side)

    def neighbourhood(self, q_time: torch.Tensor, q_channel: torch.Tensor, q_coord: torch.Tensor,
                      q_offsets: torch.Tensor, e_time: torch.Tensor, e_channel: torch.Tensor,
                      e_coord: torch.Tensor, e_offsets: torch.Tensor) -> torch.Tensor:
        """(n_queries, window) indices of the elements each query reads (-1 = none): the time window, then
        the own-channel window. Static queries (time NaN) read none."""
        axes_e, axes_q = [e_time, e_coord], [q_time, q_coord]
        parts = []
        if self.time_each_side:
            parts.append(key_windows(e_offsets, torch.zeros_like(e_channel), axes_e, q_offsets,
                                     torch.zeros_like(q_channel), axes_q, self.time_each_side,
                                     self.time_each_side))
        if self.channel_each_side:
            parts.append(key_windows(e_offsets, e_channel, axes_e, q_offsets, q_channel, axes_q,
                                     self.channel_each_side, self.channel_each_side))
        idx = torch.cat(parts, dim=1) if parts else q_channel.new_full((len(q_channel), 0), -1, dtype=torch.int64)
        return idx.masked_fill(torch.isnan(q_time)[:, None], -1)

    def _relative(self, idx: torch.Tensor, q_time, q_channel, q_coord, e_time, e_channel, e_coord
                  ) -> torch.Tensor:
        """(n_queries, window, N_RELATIVE) float32: signed and absolute log gaps in time and wavelength,
        same channel, static element, found by the own-channel window."""
        i = idx.clamp(min=0)
        dt = torch.nan_to_num(e_time[i].float() - q_time.float()[:, None])
        dc = torch.nan_to_num(e_coord[i].float() - q_coord.float()[:, None])
        lt, lc = torch.log1p(dt.abs() / self.time_scale), torch.log1p(dc.abs() / self.coord_scale)
        own_window = torch.zeros_like(lt)
        own_window[:, 2 * self.time_each_side:] = 1.0
        return torch.stack([lt * torch.sign(dt), lt, lc * torch.sign(dc), lc,
                            (e_channel[i] == q_channel[:, None]).float(), torch.isnan(e_time[i]).float(),
                            own_window], dim=-1)

    def forward(self, queries: torch.Tensor, q_time: torch.Tensor, q_channel: torch.Tensor,
                q_coord: torch.Tensor, q_offsets: torch.Tensor, tokens: torch.Tensor, e_time: torch.Tensor,
                e_channel: torch.Tensor, e_coord: torch.Tensor, e_offsets: torch.Tensor) -> torch.Tensor:
        """Packed ``queries`` (N, d_query) at their positions (``q_offsets`` B+1, CPU) read the nearby visible
        ``tokens`` (M, d_input) of their record (``e_offsets`` B+1, CPU) -> (N, d_query)."""
        n, h, dh = len(queries), self.heads, self.head_dim
        idx = self.neighbourhood(q_time, q_channel, q_coord, q_offsets, e_time, e_channel, e_coord, e_offsets)
        q = self.q(self.q_norm(queries)).view(n, h, dh)
        # the projected tokens with the null element appended as row M; each query reads [null, its window]
        table = torch.cat([self.kv(self.kv_norm(tokens)), self.null_kv[None].to(queries.dtype)])
        m = len(tokens)
        rows = torch.cat([idx.new_full((n, 1), m), torch.where(idx >= 0, idx, m)], dim=1)  # (N, 1 + window)
        rel = torch.cat([q.new_zeros((n, 1, N_RELATIVE), dtype=torch.float32),
                         self._relative(idx, q_time, q_channel, q_coord, e_time, e_channel, e_coord)], dim=1)
        valid = torch.cat([idx.new_ones((n, 1), dtype=torch.bool), idx >= 0], dim=1)
        # without gradients, in chunks: the gathered keys stay small (no page-faulting of fresh large buffers)
        step = max(n, 1) if torch.is_grad_enabled() else LOCAL_CHUNK
        a = torch.cat([self._attend(q[s:s + step], table, rows[s:s + step], rel[s:s + step].to(q.dtype),
                                    valid[s:s + step]) for s in range(0, n, step)]) if n else q.new_zeros((0, h, dh))
        x = queries + self.proj(a.reshape(n, h * dh))
        return x + self.mlp(self.norm2(x))

    def _attend(self, q: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, rel: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """Attention of queries ``q`` (n, H, dh) to their ``rows`` (n, K) of ``table`` with relative features
        ``rel`` (n, K, R) -> (n, H, dh).

        A key is ``k_j + rel_j W_k + b_k`` and a value ``v_j + rel_j W_v + b_v``; by linearity the relative
        terms are applied to the query (``W_k q``, R numbers per head) and to the attention-weighted mean of
        ``rel`` instead of to every key, and ``q . b_k`` is the same for every key (it cancels in the
        softmax). One query against its own K keys is a batched dot product, computed on the gathered layout
        (an SDPA call would first copy the keys into (n, H, K, dh)).
        """
        n, h, dh = q.shape
        inner = h * dh
        w_k = self.relative[:, :inner].view(N_RELATIVE, h, dh).to(q.dtype)
        w_v = self.relative[:, inner:].view(N_RELATIVE, h, dh).to(q.dtype)
        kv = table[rows].view(n, -1, 2, h, dh)
        q_rel = torch.einsum("rhd,nhd->nrh", w_k, q)  # (n, R, H)
        logits = (q[:, None] * kv[:, :, 0]).sum(-1) + torch.bmm(rel, q_rel)  # (n, K, H)
        logits = logits * dh ** -0.5
        weights = torch.softmax(logits.masked_fill(~valid[:, :, None], float("-inf")), dim=1)
        out = (weights[..., None] * kv[:, :, 1]).sum(1)  # (n, H, dh)
        rel_mean = torch.bmm(weights.transpose(1, 2), rel)  # (n, H, R)
        return out + torch.einsum("nhr,rhd->nhd", rel_mean, w_v) + self.relative_bias[inner:].view(h, dh)
