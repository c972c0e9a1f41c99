"""The training objective and the evaluation metrics.

The model predicts, for each target element, a Gaussian over the *true* normalised value: mean ``mu`` and
scale ``sigma``. The observed value also carries the archive's measurement error ``e`` (normalised; NaN =
unknown = 0), so the likelihood of the observation uses the two added in quadrature:

    NLL = 0.5 * (log(2 pi) + log(sigma^2 + e^2) + (z - mu)^2 / (sigma^2 + e^2))

Metrics (per channel, per modality and overall): MSE and MAE of the mean, the NLL, and the coverage of the
68.27 % and 95.45 % central intervals of the predictive distribution ``N(mu, sigma^2 + e^2)`` (a calibrated
model covers 0.683 and 0.954 of the targets).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from datasets.loader.batches import Batch
from perceiver.model import ModelOutput

LOG_2PI = math.log(2 * math.pi)


def predictive_variance(log_sigma: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """``sigma^2 + e^2`` with unknown (NaN) measurement errors counted as 0."""
    e = torch.nan_to_num(error.float(), nan=0.0)
    return torch.exp(2 * log_sigma.float()) + e * e


def gaussian_nll(mean: torch.Tensor, log_sigma: torch.Tensor, value: torch.Tensor, error: torch.Tensor
                 ) -> torch.Tensor:
    """Per-element heteroscedastic Gaussian NLL with the measurement error added in quadrature."""
    var = predictive_variance(log_sigma, error)
    return 0.5 * (LOG_2PI + torch.log(var) + (value.float() - mean.float()) ** 2 / var)


def targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observed normalised value, error and channel of the target elements (packed order)."""
    t = batch.target
    return batch.value[t], batch.error[t], batch.channel[t]


def loss(output: ModelOutput, batch: Batch, beta: float = 0.0) -> torch.Tensor:
    """Mean NLL over the target elements of the batch, each weighted by its predictive variance to the power
    ``beta`` (not differentiated through): beta-NLL, Seitzer et al. 2022. With beta = 0 this is the plain NLL,
    which lets the model shrug off hard elements by raising their sigma and so trades away MSE; beta = 0.5
    restores part of the squared error's weight on them while sigma stays a calibrated likelihood fit."""
    value, error, _ = targets(batch)
    nll = gaussian_nll(output.mean, output.log_sigma, value, error)
    if beta:
        nll = nll * predictive_variance(output.log_sigma, error).detach() ** beta
    return nll.mean()


class Metrics:
    """Accumulates per-channel sums over batches; :meth:`summary` turns them into per-channel, per-modality
    and overall metrics. Sums are float64 tensors, so ranks can ``all_reduce`` :attr:`sums` before summary."""

    FIELDS = ("n", "se", "ae", "nll", "in68", "in95")

    def __init__(self, channel_names: list[str], channel_modality: list[int], modalities: list[str]):
        self.channel_names, self.channel_modality = channel_names, channel_modality
        self.modalities = modalities
        self.sums = torch.zeros(len(self.FIELDS), len(channel_names), dtype=torch.float64)

    @torch.no_grad()
    def update(self, output: ModelOutput, batch: Batch) -> None:
        value, error, channel = targets(batch)
        mean, log_sigma = output.mean.float(), output.log_sigma.float()
        var = predictive_variance(log_sigma, error)
        r = value.float() - mean
        z = r.abs() / var.sqrt()
        nll = gaussian_nll(mean, log_sigma, value, error)
        per = torch.stack([torch.ones_like(r), r * r, r.abs(), nll, (z <= 1.0).float(), (z <= 2.0).float()])
        self.sums.index_add_(1, channel.cpu(), per.double().cpu())

    @staticmethod
    def _finish(s: np.ndarray) -> dict[str, float]:
        n = s[0]
        if n == 0:
            return {"n": 0}
        return {"n": int(n), "mse": s[1] / n, "mae": s[2] / n, "nll": s[3] / n, "coverage68": s[4] / n,
                "coverage95": s[5] / n}

    def summary(self) -> dict:
        s = self.sums.numpy()
        mods = np.asarray(self.channel_modality)
        out = {"overall": self._finish(s.sum(1)),
               "modality": {m: self._finish(s[:, mods == i].sum(1)) for i, m in enumerate(self.modalities)},
               "channel": {c: self._finish(s[:, i]) for i, c in enumerate(self.channel_names)}}
        out["modality"] = {k: v for k, v in out["modality"].items() if v["n"]}
        out["channel"] = {k: v for k, v in out["channel"].items() if v["n"]}
        return out
