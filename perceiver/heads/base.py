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
    """Maps decoded query states (N, d_query) to a :class:`HeadOutput`, and scores it against the observed
    values. Subclasses take ``(config: HeadConfig, d_query: int)``."""

    def forward(self, h: torch.Tensor) -> HeadOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, output: HeadOutput, value: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """The scalar training loss over the queries: ``value`` the observed normalised values, ``error`` their
        normalised measurement errors (NaN = unknown)."""
        raise NotImplementedError  # pragma: no cover - interface
