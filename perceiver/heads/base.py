"""The output-head interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HeadOutput:
    """A head's prediction per query (packed order, float32, normalised units): every head gives a point
    prediction ``mean`` and a scale ``log_sigma`` (what reconstruct, evaluate and the metrics read); ``extra``
    holds whatever else the head's loss needs."""

    mean: torch.Tensor
    log_sigma: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class OutputHead(nn.Module):
    """Maps decoded query states (N, d_query) to a :class:`HeadOutput`, scores it against the observed values,
    and draws samples. Subclasses take ``(config: HeadConfig, d_query: int)``.

    ``offsets`` (B+1) group the packed queries by record, for heads whose prediction is joint over a record's
    queries. Per-query tensors a head puts in :attr:`HeadOutput.extra` are concatenated when queries are
    decoded in chunks."""

    def forward(self, h: torch.Tensor) -> HeadOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, output: HeadOutput, value: torch.Tensor, error: torch.Tensor, offsets: torch.Tensor
             ) -> torch.Tensor:
        """The scalar training loss over the queries: ``value`` the observed normalised values, ``error`` their
        normalised measurement errors (NaN = unknown)."""
        raise NotImplementedError  # pragma: no cover - interface

    @torch.no_grad()
    def sample(self, output: HeadOutput, offsets: torch.Tensor, n_samples: int,
               error: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n_samples`` draws (K, N; normalised units) of each query's observation, with measurement error
        ``error`` (normalised; NaN or None = unknown = 0). Here: independent Gaussian draws from ``mean`` and
        ``sqrt(sigma^2 + e^2)``; a head that models a record's queries jointly overrides this."""
        sd = predictive_variance(output.log_sigma, error).sqrt()
        noise = torch.randn((n_samples, len(sd)), generator=generator, device=sd.device)
        return output.mean.float() + sd * noise


def predictive_variance(log_sigma: torch.Tensor, error: torch.Tensor | None) -> torch.Tensor:
    """``sigma^2 + e^2`` with unknown (NaN, or None for all) measurement errors counted as 0."""
    var = torch.exp(2 * log_sigma.float())
    if error is not None:
        var = var + torch.nan_to_num(error.float(), nan=0.0) ** 2
    return var
