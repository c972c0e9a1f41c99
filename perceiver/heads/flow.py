"""The generative head (``--head diffusion``): a conditional flow-matching decoder of a record's queried values.

A Gaussian head gives each query a mean and a sigma; a draw of a whole record from it is independent noise
around the means. This head keeps that Gaussian (same layers, same beta-NLL: its ``mean`` / ``sigma`` are what
reconstruct, evaluate and the metrics read) and adds a generative model of the *standardised residuals*
``x = (y - mean) / sqrt(sigma^2 + e^2)`` of all the queries of a record jointly: a rectified flow (conditional
flow matching, Lipman et al. 2023; Liu et al. 2023) from ``x0 ~ N(0, I)`` to ``x1 = x``, with the velocity of
query ``i`` a small MLP of

- its own noisy value ``x_t,i`` and the flow time ``t`` (Fourier features),
- its decoded query state (a projection of what the decoder read from the latents and its neighbourhood),
- the mean over its record's queries of an embedding of their (state, ``x_t``): the record's current draw as a
  whole, so that a draw of one query moves with the draws of the others (a shared offset of a lab panel, a
  light curve's correlated residuals).

Cost per flow step is linear in the number of queries (one MLP per query plus one segment mean per record: no
queries x queries attention). Training draws one flow time per record and regresses the velocity onto
``x1 - x0`` (mean squared error, weight ``flow_weight`` beside the Gaussian loss; standardised residuals are
limited to +-:data:`RESIDUAL_LIMIT` in that loss only, so that a few absurd values cannot dominate it).
Sampling integrates the flow with Heun's method in ``sample_steps`` steps (2 velocity evaluations each), one
draw at a time, then maps back: ``y = mean + sqrt(sigma^2 + e^2) * x``.

Options (``HeadConfig.options``, e.g. ``--set model.head.options.sample_steps=8``): ``width`` (64),
``sample_steps`` (4), ``flow_weight`` (1.0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from perceiver.heads.base import HeadOutput, predictive_variance
from perceiver.heads.gaussian import GaussianHead
from perceiver.packing import segment_ids_tensor

#: standardised residuals beyond this are limited in the flow's training loss
RESIDUAL_LIMIT = 8.0
#: Fourier frequencies of the flow time
N_TIME_FREQS = 6


class FlowMatchingHead(GaussianHead):
    """The Gaussian head plus a record-joint rectified flow of its standardised residuals (module docstring)."""

    def __init__(self, config, d_query: int):
        super().__init__(config, d_query)
        options = dict(config.options)
        unknown = set(options) - {"width", "sample_steps", "flow_weight"}
        if unknown:
            raise ValueError(f"unknown options of the diffusion head: {sorted(unknown)} "
                             "(it takes width, sample_steps, flow_weight)")
        width = int(options.get("width", 64))
        self.sample_steps = int(options.get("sample_steps", 4))
        self.flow_weight = float(options.get("flow_weight", 1.0))
        if width < 1 or self.sample_steps < 1 or self.flow_weight < 0:
            raise ValueError("diffusion head: width and sample_steps must be >= 1 and flow_weight >= 0")
        self.condition = nn.Sequential(nn.LayerNorm(d_query), nn.Linear(d_query, width))
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(N_TIME_FREQS, dtype=torch.float32),
                             persistent=False)
        self.embed = nn.Linear(1 + 2 * N_TIME_FREQS, width)
        self.record_embed = nn.Sequential(nn.GELU(), nn.Linear(width, width))
        self.velocity_net = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.GELU(), nn.Linear(2 * width, width),
                                          nn.GELU(), nn.Linear(width, 1))

    def forward(self, h: torch.Tensor) -> HeadOutput:
        out = super().forward(h)
        out.extra["state"] = self.condition(h).float()
        return out

    def velocity(self, x: torch.Tensor, t: torch.Tensor, state: torch.Tensor, seg: torch.Tensor, n_records: int
                 ) -> torch.Tensor:
        """The flow's velocity per query: noisy standardised residual ``x`` (N,) at flow time ``t`` (N,), query
        ``state`` (N, width), ``seg`` the record of each query."""
        phase = t[:, None] * self.freqs
        a = state + self.embed(torch.cat([x[:, None], torch.sin(phase), torch.cos(phase)], 1))
        e = self.record_embed(a)
        total = torch.zeros(n_records, e.shape[1], device=e.device, dtype=e.dtype).index_add_(0, seg, e)
        count = torch.bincount(seg, minlength=n_records).clamp_min(1).to(e.dtype)
        return self.velocity_net(torch.cat([a, (total / count[:, None])[seg]], 1)).squeeze(1).float()

    def loss(self, output: HeadOutput, value: torch.Tensor, error: torch.Tensor, offsets: torch.Tensor
             ) -> torch.Tensor:
        gaussian = super().loss(output, value, error, offsets)
        if not self.flow_weight:
            return gaussian
        sd = predictive_variance(output.log_sigma, error).sqrt().detach()
        x1 = ((value.float() - output.mean.detach()) / sd).clamp(-RESIDUAL_LIMIT, RESIDUAL_LIMIT)
        seg = segment_ids_tensor(offsets, value.device)
        n_records = len(offsets) - 1
        t = torch.rand(n_records, device=value.device)[seg]  # one flow time per record: its queries move together
        x0 = torch.randn_like(x1)
        v = self.velocity((1 - t) * x0 + t * x1, t, output.extra["state"], seg, n_records)
        return gaussian + self.flow_weight * ((v - (x1 - x0)) ** 2).mean()

    @torch.no_grad()
    def sample(self, output: HeadOutput, offsets: torch.Tensor, n_samples: int,
               error: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        sd = predictive_variance(output.log_sigma, error).sqrt()
        state = output.extra["state"]
        seg = segment_ids_tensor(offsets, state.device)
        n_records, dt = len(offsets) - 1, 1.0 / self.sample_steps
        draws = []
        for _ in range(n_samples):  # one draw at a time: memory stays N x width
            x = torch.randn(len(sd), generator=generator, device=sd.device)
            for k in range(self.sample_steps):  # Heun: an Euler step, corrected by the velocity at its end
                t0 = torch.full_like(x, k * dt)
                v0 = self.velocity(x, t0, state, seg, n_records)
                v1 = self.velocity(x + dt * v0, t0 + dt, state, seg, n_records)
                x = x + 0.5 * dt * (v0 + v1)
            draws.append(output.mean.float() + sd * x)
        return torch.stack(draws)
