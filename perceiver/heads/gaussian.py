"""The Gaussian head: mean and sigma of the true normalised value, trained by heteroscedastic Gaussian NLL.

The observed value also carries the archive's measurement error ``e`` (normalised; NaN = unknown = 0), so the
likelihood of the observation uses the two added in quadrature:

    NLL = 0.5 * (log(2 pi) + log(sigma^2 + e^2) + (z - mu)^2 / (sigma^2 + e^2))

each element weighted by its (detached) predictive variance to the power ``nll_beta`` (beta-NLL, Seitzer et
al. 2022): with beta = 0 the model may shrug off hard elements by raising their sigma and so trade away MSE;
beta = 0.5 restores part of the squared error's weight on them while sigma stays a likelihood fit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from perceiver.heads.base import HeadOutput, OutputHead, predictive_variance

LOG_2PI = math.log(2 * math.pi)

__all__ = ["GaussianHead", "gaussian_nll", "predictive_variance"]


def gaussian_nll(mean: torch.Tensor, log_sigma: torch.Tensor, value: torch.Tensor, error: torch.Tensor
                 ) -> torch.Tensor:
    """Per-element heteroscedastic Gaussian NLL with the measurement error added in quadrature."""
    var = predictive_variance(log_sigma, error)
    return 0.5 * (LOG_2PI + torch.log(var) + (value.float() - mean.float()) ** 2 / var)


class GaussianHead(OutputHead):
    """LayerNorm + linear to (mean, raw scale); sigma = exp(raw) + min_sigma, smoothly (log-add-exp)."""

    def __init__(self, config, d_query: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_query)
        self.proj = nn.Linear(d_query, 2)
        self.log_min_sigma = math.log(config.min_sigma)
        self.beta = config.nll_beta

    def forward(self, h: torch.Tensor) -> HeadOutput:
        out = self.proj(self.norm(h)).float()
        log_sigma = torch.logaddexp(out[:, 1], torch.tensor(self.log_min_sigma, device=out.device))
        return HeadOutput(out[:, 0], log_sigma)

    def loss(self, output: HeadOutput, value: torch.Tensor, error: torch.Tensor, offsets: torch.Tensor | None = None
             ) -> torch.Tensor:
        nll = gaussian_nll(output.mean, output.log_sigma, value, error)
        if self.beta:
            nll = nll * predictive_variance(output.log_sigma, error).detach() ** self.beta
        return nll.mean()
