"""Attention blocks over packed variable-length records, all through ``scaled_dot_product_attention``.

Records are packed (no padding) with ``offsets`` (B+1). Two cross-attention shapes occur:

- the encoder: fixed-size latent queries attend to a variable number of element keys per record;
- the decoder: a variable number of element queries per record attend to that record's latents (its bounded
  look at nearby elements is :mod:`perceiver.local_attention`).

Both go through a :class:`VarlenPlan`: records are sorted by length and cut into *groups*; each group is one
SDPA call on a padded ``(g, H, len, dh)`` view. A group of equal lengths needs no mask (and, when its records
are contiguous in the packing, no copy either); otherwise padded keys are masked out and padded queries are
dropped. The grouping minimises ``sum(padded tokens) + calls * call_cost`` exactly (dynamic programme over
records sorted by length), so a batch of very different lengths costs about its real elements plus a bounded
number of calls. ``varlen="padded"`` (one group, pad to max) and ``varlen="loop"`` (one call per record) are
the two extremes, kept for comparison. Why not nested tensors or flex_attention: see ``docs/model.md``
(measured on the CPUs here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _cpu_has_fast_bf16_attention() -> bool:
    """Whether the CPU flash-attention kernel runs natively in bf16 (it uses AMX tiles when present)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: no probe, assume not
        return False


#: On CPUs without AMX the bf16 flash-attention kernel is slower than the fp32 one for short key sequences
#: and a little faster for long ones (AVX512-BF16 EPYC, 1 thread, fwd+bwd: 8x8 heads x 256 x 256 x 32:
#: fp32 30 ms, bf16 40 ms; 8 x 256 queries x 8192 keys x 64: fp32 228 ms, bf16 195 ms). There, reduced-
#: precision attention over fewer than this many keys runs in fp32; the projections around it stay in bf16.
CPU_BF16_SDPA_MIN_KEYS = 0 if _cpu_has_fast_bf16_attention() else 1024


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
         ) -> torch.Tensor:
    """``scaled_dot_product_attention``; on CPUs without AMX, short bf16 attention is computed in fp32."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and k.shape[-2] < CPU_BF16_SDPA_MIN_KEYS):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


#: cost of one extra SDPA call in units of padded tokens (measured: ~0.1 ms fwd+bwd ~ 64 keys of 256 queries)
CALL_COST_TOKENS = 64


@dataclass
class Group:
    """One SDPA call: ``records`` (batch positions), padded length ``length``; ``gather`` (g*length rows of
    the packed tensor, padding rows point at a real row and are masked/dropped), ``mask`` (g, length) or None
    when all lengths are equal; ``start`` set when the group is a contiguous equal-length run of the
    packing. ``host_records`` is the same record list kept on the CPU (reading ``records`` back from a GPU
    would stall it)."""

    records: torch.Tensor
    length: int
    gather: torch.Tensor | None
    mask: torch.Tensor | None
    start: int | None
    host_records: np.ndarray


@dataclass
class VarlenPlan:
    """How to run attention over packed records: groups, and where each real row lands in the padded
    output."""

    n_records: int
    n_rows: int
    groups: list[Group]
    #: for packed-query attention: index of each packed row in the concatenation of padded group outputs
    row_index: torch.Tensor | None
    #: for packed-key attention: index of each record in the concatenation of group outputs (-1 = empty)
    record_index: torch.Tensor
    empty: torch.Tensor

    def to(self, device: torch.device) -> VarlenPlan:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        groups = [Group(mv(g.records), g.length, mv(g.gather), mv(g.mask), g.start, g.host_records)
                  for g in self.groups]
        return VarlenPlan(self.n_records, self.n_rows, groups, mv(self.row_index), mv(self.record_index),
                          mv(self.empty))


def _partition(sorted_lengths: np.ndarray, call_cost: float) -> list[tuple[int, int]]:
    """Optimal cut of lengths sorted descending into contiguous groups: min sum(g * first + call_cost)."""
    n = len(sorted_lengths)
    best = np.zeros(n + 1)
    arg = np.zeros(n + 1, np.int64)
    lengths = sorted_lengths.astype(np.float64)
    for j in range(1, n + 1):
        i = np.arange(j)  # group = [i, j): padded to lengths[i]
        c = best[:j] + (j - i) * lengths[:j] + call_cost
        k = int(np.argmin(c))
        best[j], arg[j] = c[k], k
    cuts, j = [], n
    while j > 0:
        cuts.append((int(arg[j]), j))
        j = int(arg[j])
    return cuts[::-1]


def plan_varlen(offsets: torch.Tensor | np.ndarray, mode: str = "auto",
                call_cost: float = CALL_COST_TOKENS) -> VarlenPlan:
    """Group packed records (``offsets`` on the CPU) for SDPA calls; see the module docstring."""
    off = np.asarray(offsets.cpu() if isinstance(offsets, torch.Tensor) else offsets, np.int64)
    lengths = np.diff(off)
    n_rec, n_rows = len(lengths), int(off[-1])
    nonempty = np.flatnonzero(lengths > 0)
    order = nonempty[np.argsort(-lengths[nonempty], kind="stable")]
    if len(order) == 0:
        cuts = []
    elif mode == "padded" or (lengths[order] == lengths[order[0]]).all():
        cuts = [(0, len(order))]
    elif mode == "loop":
        cuts = [(i, i + 1) for i in range(len(order))]
    elif mode == "auto":
        cuts = _partition(lengths[order], call_cost)
    else:
        raise ValueError(f"unknown varlen mode {mode!r}")

    groups, row_index = [], np.zeros(n_rows, np.int64)
    record_index = np.full(n_rec, -1, np.int64)
    base = 0
    for gi, (a, b) in enumerate(cuts):
        recs = order[a:b]
        if gi == 0 and len(cuts) == 1 and len(recs) == n_rec:
            recs = np.sort(recs)  # keep batch order when one group holds everything
        length = int(lengths[recs].max())
        g = len(recs)
        pos = np.arange(length)
        real = pos[None, :] < lengths[recs][:, None]
        rows = off[recs][:, None] + pos[None, :]
        contiguous = bool(real.all() and np.all(off[recs[1:]] == off[recs[:-1]] + length))
        gather = None if contiguous else torch.from_numpy(np.where(real, rows, off[recs][:, None]).ravel())
        mask = None if real.all() else torch.from_numpy(real)
        start = int(off[recs[0]]) if contiguous else None
        groups.append(Group(torch.from_numpy(recs), length, gather, mask, start, recs))
        row_index[rows[real]] = base + (np.arange(g * length).reshape(g, length))[real]
        record_index[recs] = np.arange(len(recs)) + sum(len(x.records) for x in groups[:-1])
        base += g * length
    return VarlenPlan(n_rec, n_rows, groups, torch.from_numpy(row_index), torch.from_numpy(record_index),
                      torch.from_numpy(lengths == 0))


def _rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The group's rows of packed ``x`` as ``(g, length, ...)`` (a view when contiguous, else a gather)."""
    g = len(group.records)
    if group.start is not None:
        return x[group.start:group.start + g * group.length].view(g, group.length, *x.shape[1:])
    return x.index_select(0, group.gather).view(g, group.length, *x.shape[1:])


def attend_packed_keys(q: torch.Tensor, kv: torch.Tensor, plan: VarlenPlan) -> torch.Tensor:
    """Shared queries ``q`` (H, Lq, dh) attend to each record's packed keys/values ``kv`` (N, 2, H, dh).

    Returns (B, H, Lq, dh); a record without keys gets zeros.
    """
    outs = []
    for group in plan.groups:
        rows = _rows(kv, group)  # (g, len, 2, H, dh)
        k = rows[:, :, 0].transpose(1, 2)
        v = rows[:, :, 1].transpose(1, 2)
        mask = None if group.mask is None else group.mask[:, None, None, :]
        qg = q.unsqueeze(0).expand(len(group.records), -1, -1, -1)
        outs.append(sdpa(qg, k, v, attn_mask=mask))
    n_rec = plan.n_records
    if not outs:
        return q.new_zeros((n_rec, *q.shape))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if len(plan.groups) == 1 and len(plan.groups[0].records) == n_rec and not plan.empty.any():
        return out  # one group in batch order
    out = torch.cat([out, out.new_zeros((1, *out.shape[1:]))])
    return out.index_select(0, torch.where(plan.record_index >= 0, plan.record_index, len(out) - 1))


def attend_packed_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan
                          ) -> torch.Tensor:
    """Packed queries ``q`` (N, H, dh) attend to their record's keys/values ``k``, ``v`` (B, H, Lk, dh).

    Returns (N, H, dh) in packed order.
    """
    outs = []
    for group in plan.groups:
        qg = _rows(q, group).transpose(1, 2)  # (g, H, len, dh)
        if group.start is not None and len(group.records) == plan.n_records:
            kg, vg = k, v
        else:
            kg, vg = k.index_select(0, group.records), v.index_select(0, group.records)
        o = sdpa(qg, kg, vg)  # padded queries are computed and dropped
        outs.append(o.transpose(1, 2).reshape(-1, *q.shape[1:]))
    if not outs:
        return q.new_zeros(q.shape)
    if len(outs) == 1 and outs[0].shape[0] == q.shape[0] and plan.groups[0].start is not None:
        return outs[0]
    return torch.cat(outs).index_select(0, plan.row_index)


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = max(1, int(round(dim * ratio)))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block on the dense latent array (B, L, D): fused QKV, SDPA, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"latent width {dim} not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = sdpa(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-LayerNorm cross-attention ``q_dim`` <- ``kv_dim`` with fused K/V projection, then an MLP.

    ``heads`` x ``head_dim`` is the attention width; the query residual is kept (queries are latents or
    query encodings).
    """

    def __init__(self, q_dim: int, kv_dim: int, heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q_norm = nn.LayerNorm(q_dim)
        self.kv_norm = nn.LayerNorm(kv_dim)
        self.q = nn.Linear(q_dim, inner)
        self.kv = nn.Linear(kv_dim, 2 * inner)
        self.proj = nn.Linear(inner, q_dim)
        self.norm2 = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, mlp_ratio)

    def _finish(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))

    def latents_to_elements(self, latents: torch.Tensor, elements: torch.Tensor, plan: VarlenPlan
                            ) -> torch.Tensor:
        """Encoder: shared ``latents`` (L, D) attend to packed ``elements`` (N, kv_dim) -> (B, L, D)."""
        n_lat, d = latents.shape
        q = self.q(self.q_norm(latents)).view(n_lat, self.heads, self.head_dim).transpose(0, 1)
        kv = self.kv(self.kv_norm(elements)).view(-1, 2, self.heads, self.head_dim)
        a = attend_packed_keys(q, kv, plan)  # (B, H, L, dh)
        a = a.transpose(1, 2).reshape(plan.n_records, n_lat, self.heads * self.head_dim)
        return self._finish(latents, a)

    def queries_to_latents(self, queries: torch.Tensor, latents: torch.Tensor, plan: VarlenPlan
                           ) -> torch.Tensor:
        """Decoder: packed ``queries`` (N, q_dim) attend to their record's ``latents`` (B, L, D) ->
        (N, q_dim)."""
        b, n_lat, _ = latents.shape
        q = self.q(self.q_norm(queries)).view(-1, self.heads, self.head_dim)
        kv = self.kv(self.kv_norm(latents)).view(b, n_lat, 2, self.heads, self.head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        a = attend_packed_queries(q, k, v, plan).reshape(-1, self.heads * self.head_dim)
        return self._finish(queries, a)
