"""Neighbours along time (or wavelength) within a record: the keys nearest a query on either side.

One implementation, :func:`key_windows`, serves the interpolation baselines (:mod:`pipelines.run.baselines`),
the decoder's neighbour features (:class:`NeighbourFeatures`: what the baselines see, given to the model's
queries) and the decoder's bounded local attention (:mod:`perceiver.local_attention`: a fixed number of
nearby visible elements per query).

Keys and queries are packed records with their own offsets. Both are merged and sorted once,
lexicographically on (record, group, axes...), keys before queries on ties; a query's window is read off
its insertion point among the sorted keys. No per-record loop and no host round trip: it runs where its
tensors are, in O((keys + queries) log(keys + queries)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from perceiver.packing import segment_ids_tensor

#: channel indices are below this (a (record, channel) group is one int64)
CHANNEL_SPAN = 1 << 24


def key_windows(key_offsets: torch.Tensor, key_group: torch.Tensor, key_axes: list[torch.Tensor],
                query_offsets: torch.Tensor, query_group: torch.Tensor, query_axes: list[torch.Tensor],
                before: int, after: int) -> torch.Tensor:
    """(n_queries, before + after) indices into the keys: each query's ``before`` keys at or before it and
    ``after`` keys strictly after it, in the order of (record, group, axes...), nearest first on each side
    (columns ``before - 1 .. 0`` going back, ``before .. before + after - 1`` going forward); -1 where the
    record and group have fewer keys on that side.

    ``*_group`` is an integer per element below :data:`CHANNEL_SPAN` (its channel, or 0 for "any channel");
    ``*_axes`` are sort keys, most significant first (e.g. ``[time, coord]``: along time, and along
    wavelength among elements of one time); NaN sorts last. Keys and queries are packed records with their own
    offsets (B+1, CPU). One merged sort of keys and queries (O((n+m) log(n+m))), then each query's insertion
    point among the sorted keys gives its window by arithmetic: no per-record loop, no host round trip.
    """
    device = key_group.device
    nk, nq = len(key_group), len(query_group)
    record = torch.cat([segment_ids_tensor(key_offsets, device), segment_ids_tensor(query_offsets, device)])
    group = record * CHANNEL_SPAN + torch.cat([key_group, query_group]).to(torch.int64)
    # Stable sorts from the least significant key up; keys precede queries in the concatenation, so they
    # stay first among equals (an equal key counts as "at or before").
    order = torch.arange(nk + nq, device=device)
    for k, q in reversed(list(zip(key_axes, query_axes, strict=True))):
        axis = torch.cat([k.to(torch.float64), q.to(torch.float64)])
        axis = torch.nan_to_num(axis, nan=math.inf)
        order = order[torch.sort(axis[order], stable=True).indices]
    order = order[torch.sort(group[order], stable=True).indices]
    is_key = order < nk
    split = torch.sort((~is_key).to(torch.int8), stable=True).indices  # keys then queries, merged order kept
    sorted_keys, qpos = order[split[:nk]], split[nk:]  # no data-dependent size: no GPU sync
    insertion = torch.cumsum(is_key.to(torch.int64), 0)[qpos]  # keys at or before each query
    steps = torch.arange(-before, after, device=device)
    pos = insertion[:, None] + steps[None, :]
    inside = (pos >= 0) & (pos < nk)
    pc = pos.clamp(0, max(nk - 1, 0))
    if nk:
        inside &= group[sorted_keys[pc]] == group[order[qpos]][:, None]
        window = torch.where(inside, sorted_keys[pc], -1)
    else:
        window = torch.full(pos.shape, -1, dtype=torch.int64, device=device)
    out = torch.empty_like(window)
    out[order[qpos] - nk] = window
    return out


def same_channel_neighbours(key_offsets: torch.Tensor, key_channel: torch.Tensor, key_axes: list[torch.Tensor],
                            query_offsets: torch.Tensor, query_channel: torch.Tensor,
                            query_axes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (into the keys) of each query's previous and next key of the same record and channel, -1 if
    none (:func:`key_windows` of one key on each side). The previous key is at or before the query (an equal
    key counts as previous), the next key strictly after. A query whose first axis is not finite (a static
    element) has no neighbours."""
    window = key_windows(key_offsets, key_channel, key_axes, query_offsets, query_channel, query_axes, 1, 1)
    static = ~torch.isfinite(query_axes[0])[:, None]
    window = window.masked_fill(static, -1)
    return window[:, 0], window[:, 1]


class NeighbourFeatures(nn.Module):
    """What the interpolation baselines know about a query, as a vector of width ``d_out``: its channel's
    previous and next visible values in the record, their linear interpolation, whether each exists, and the
    distances to them in time (log, in units of the shortest Fourier period) and in coord. With ``snapshot``
    the same nine numbers are added for *every* channel of the table, not only the query's: the record's
    state around the query's time (the same hour's blood pressures for a hidden mean arterial pressure).

    Added to the decoder queries, this gives the model the baselines' evidence directly, on a linear path
    (a same-channel neighbour an hour away is the strongest single clue in an ICU record); the latents and
    the element attention add the record as a whole. It uses only visible elements, as the baselines do.
    """

    N_FEATURES = 9

    def __init__(self, d_out: int, time_scale: float, coord_scale: float, snapshot_channels: int = 0):
        super().__init__()
        self.time_scale, self.coord_scale = float(time_scale), float(coord_scale)
        self.snapshot_channels = snapshot_channels
        self.proj = nn.Linear(self.N_FEATURES * (1 + snapshot_channels), d_out)

    def forward(self, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor, offsets: torch.Tensor,
                key_time: torch.Tensor, key_channel: torch.Tensor, key_coord: torch.Tensor,
                key_value: torch.Tensor, key_offsets: torch.Tensor) -> torch.Tensor:
        """Projected features of packed queries (``offsets`` B+1, CPU) among packed visible keys."""
        keys = (key_time, key_channel, key_coord, key_value, key_offsets)
        c = self.snapshot_channels
        if c:  # every query asked once per channel of the table, its copies adjacent (records stay packed)
            every = torch.arange(c, device=channel.device).repeat(len(channel))
            snap = self._features(time.repeat_interleave(c), every, coord.repeat_interleave(c), offsets * c, keys)
            snap = snap.reshape(len(channel), c, self.N_FEATURES)
            own = snap[torch.arange(len(channel), device=channel.device), channel]  # the query's channel's copy
            features = torch.cat([own, snap.flatten(1)], dim=1)
        else:
            features = self._features(time, channel, coord, offsets, keys)
        return self.proj(features.to(self.proj.weight.dtype))

    def _features(self, time, channel, coord, offsets, keys) -> torch.Tensor:
        """(N, 9) float32: the neighbour features of queries (time, channel, coord) among ``keys``."""
        key_time, key_channel, key_coord, key_value, key_offsets = keys
        if len(key_value) == 0:  # nothing visible: no query has a neighbour
            return torch.zeros(len(time), self.N_FEATURES, device=time.device)
        prev, nxt = same_channel_neighbours(key_offsets, key_channel, [key_time, key_coord], offsets, channel,
                                            [time, coord])
        has_p, has_n = prev >= 0, nxt >= 0
        p, n = prev.clamp(min=0), nxt.clamp(min=0)
        zero = torch.zeros((), device=time.device)
        value = torch.nan_to_num(key_value.float())
        v_p, v_n = torch.where(has_p, value[p], zero), torch.where(has_n, value[n], zero)

        def gap(query: torch.Tensor, key: torch.Tensor, i: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
            return torch.where(has, torch.nan_to_num((query.float() - key.float()[i]).abs()), zero)

        dt_p, dt_n = gap(time, key_time, p, has_p), gap(time, key_time, n, has_n)
        dc_p, dc_n = gap(coord, key_coord, p, has_p), gap(coord, key_coord, n, has_n)
        # interpolation weight along time, or along wavelength between pixels of one time (a spectrum)
        span_t, span_c = dt_p + dt_n, dc_p + dc_n
        w = torch.where(span_t > 0, dt_p / span_t.clamp(min=1e-12),
                        torch.where(span_c > 0, dc_p / span_c.clamp(min=1e-12), torch.full_like(span_t, 0.5)))
        interp = torch.where(has_p & has_n, v_p + w * (v_n - v_p), torch.where(has_p, v_p, v_n))
        return torch.stack([
            v_p, v_n, interp, has_p.float(), has_n.float(),
            torch.log1p(dt_p / self.time_scale), torch.log1p(dt_n / self.time_scale),
            torch.log1p(dc_p / self.coord_scale), torch.log1p(dc_n / self.coord_scale)], dim=1)
