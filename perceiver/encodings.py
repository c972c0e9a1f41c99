"""Element encodings: what the model knows about one element, as a vector of width ``d_input``.

An element is described by features, all projected by one linear map (one matmul per element, not five):

- Fourier features of its time: ``sin/cos(2 pi t / P_k)`` for periods log-spaced from the data's shortest to
  its longest time scale (config statistics), zeroed for static elements, plus a "static" indicator whose
  weight column is the learned **no-time encoding**;
- Fourier features of its ``coord`` (wavelength) and the centred, scaled coord itself, zeroed where there is
  no coord, plus a "no coord" indicator (learned no-coord encoding);
- for observed elements only, its *measurement*: the normalised value, the log of its normalised error and a
  flag saying whether the error is known (archives may not give one). Queries carry zeros here: a query never
  has a value;

to which learned **channel** and **modality** embeddings are added (one lookup: the modality of a channel is
fixed by the channel table). A residual MLP then mixes the token per element, so that a value can be read in
a channel-specific way before attention. The *position* of an element (everything but the measurement) is
the same function for encoder inputs and decoder queries.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from perceiver.config import ModelConfig

N_MEASUREMENT = 3


class FourierFeatures(nn.Module):
    """``[sin(2 pi x / P_k), cos(2 pi x / P_k)]``, ``n`` periods log-spaced in ``[min_period, max_period]``.

    The phase is reduced modulo one period in float64 (times in days times short periods need the precision),
    then sin/cos run in float32.
    """

    def __init__(self, n: int, min_period: float, max_period: float):
        super().__init__()
        periods = torch.logspace(math.log10(min_period), math.log10(max_period), n, dtype=torch.float64)
        self.register_buffer("inv_period", 1.0 / periods, persistent=False)

    @property
    def n_features(self) -> int:
        return 2 * len(self.inv_period)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cycles = x.to(torch.float64)[:, None] * self.inv_period
        phase = ((cycles - torch.floor(cycles)) * (2 * math.pi)).to(torch.float32)
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)


class ElementEncoding(nn.Module):
    """Tokens of packed elements (encoder inputs) and of queries (see the module docstring): the model's
    *input* slot."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, k = config.sizes.d_input, config.contract
        self.time_features = FourierFeatures(config.input.n_time_freqs, k.time_min_period, k.time_max_period)
        self.coord_features = FourierFeatures(config.input.n_coord_freqs, k.coord_min_period, k.coord_max_period)
        self.coord_center, self.coord_scale = k.coord_center, k.coord_scale
        n_feat = self.time_features.n_features + 1 + self.coord_features.n_features + 2 + N_MEASUREMENT
        #: one projection of [time features, static, coord features, coord, no-coord, value, log error, known]
        self.proj = nn.Linear(n_feat, d)
        self.channel = nn.Embedding(max(config.n_channels, 1), d)
        self.modality = nn.Embedding(max(config.n_modalities, 1), d)
        self.register_buffer("channel_modality",
                             torch.tensor(config.channel_modality or [0], dtype=torch.long), persistent=False)
        self.norm = nn.LayerNorm(d)
        hidden = max(1, int(round(d * config.input.mlp_ratio)))
        self.mlp = (nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                    if hidden > 1 else None)
        nn.init.normal_(self.channel.weight, std=0.5)
        nn.init.normal_(self.modality.weight, std=0.5)
        # per channel, which time frequencies its sampling supports (all where ungated or unknown)
        periods = 1.0 / self.time_features.inv_period.float()
        floor = torch.tensor([c.time_min_period if config.input.channel_time_gate else float("nan")
                              for c in config.contract.channels] or [float("nan")])
        gate = ~(periods[None, :] < torch.nan_to_num(floor, nan=0.0)[:, None])
        self.register_buffer("time_gate", gate.float().repeat(1, 2), persistent=False)  # sin and cos columns
        self.gated = bool(config.input.channel_time_gate)

    @property
    def no_time(self) -> torch.Tensor:
        """The learned encoding of a static element's (absent) time: a column of the projection."""
        return self.proj.weight[:, self.time_features.n_features]

    def position_features(self, time: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        """The (N, n_position) float32 features of where an element is (time, coord): the same for an
        observed element and for a query there, so the model computes them once per element."""
        static = torch.isnan(time)
        no_coord = torch.isnan(coord)
        tf = self.time_features(torch.nan_to_num(time, nan=0.0)) * (~static)[:, None]
        c = torch.nan_to_num(coord.float(), nan=self.coord_center)
        cf = self.coord_features(c) * (~no_coord)[:, None]
        c_lin = torch.where(no_coord, 0.0, (c - self.coord_center) / self.coord_scale)
        return torch.cat([tf, static[:, None].float(), cf, c_lin[:, None], no_coord[:, None].float()], dim=-1)

    @staticmethod
    def measurement_features(value: torch.Tensor | None, error: torch.Tensor | None,
                             like: torch.Tensor) -> torch.Tensor:
        """The (N, 3) measurement features (value, log error, error known); zeros for queries
        (``value=None``). ``like``: a float32 (N, ...) tensor."""
        if value is None:
            return like.new_zeros(len(like), N_MEASUREMENT)
        known = torch.isfinite(error)
        log_err = torch.where(known, torch.log(torch.nan_to_num(error, nan=1.0).clamp_min(1e-6)), 0.0)
        v = torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0).clamp(-50.0, 50.0)
        return torch.stack([v, log_err, known.float()], dim=-1)

    def forward(self, time: torch.Tensor, channel: torch.Tensor, coord: torch.Tensor,
                value: torch.Tensor | None = None, error: torch.Tensor | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (N, d_input): observed elements when ``value``/``error`` are given, else queries.
        ``position``: their :meth:`position_features`, when already computed."""
        if position is None:
            position = self.position_features(time, coord)
        if self.gated:
            nt = self.time_features.n_features
            position = torch.cat([position[:, :nt] * self.time_gate[channel], position[:, nt:]], dim=-1)
        features = torch.cat([position, self.measurement_features(value, error, position)], dim=-1)
        table = self.channel.weight + self.modality.weight[self.channel_modality]
        y = self.proj(features)
        x = y + table[channel].to(y.dtype)
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        return x
