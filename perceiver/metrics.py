"""Evaluation metrics of a point prediction with a scale: per channel, per modality and overall.

MSE and MAE of the mean, the NLL of the predictive distribution ``N(mu, sigma^2 + e^2)`` (``e`` the normalised
measurement error, unknown = 0; :func:`perceiver.heads.gaussian.gaussian_nll`), and the coverage of its
68.27 % (one sigma) and 95 % central intervals (a calibrated model covers 0.683 and 0.95 of the targets). The
95 % interval is the one a reconstruction store's ``lower95`` / ``upper95`` hold (made in normalised space and
mapped back through the channel's monotone transform, so a value is inside one exactly when it is inside the
other). Every head
gives a mean and a sigma, so every head -- and every baseline -- is scored by these formulas.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch

from perceiver.heads.gaussian import gaussian_nll, predictive_variance

#: half-width, in sigmas, of the central 95 % interval
Z95 = NormalDist().inv_cdf(0.975)


class Metrics:
    """Accumulates per-channel sums over batches; :meth:`summary` turns them into per-channel, per-modality
    and overall metrics. Sums are float64 tensors, so ranks can ``all_reduce`` :attr:`sums` before summary."""

    FIELDS = ("n", "se", "ae", "nll", "in68", "in95")

    def __init__(self, channel_names: list[str], channel_modality: list[int], modalities: list[str]):
        self.channel_names, self.channel_modality = channel_names, channel_modality
        self.modalities = modalities
        self.sums = torch.zeros(len(self.FIELDS), len(channel_names), dtype=torch.float64)

    @torch.no_grad()
    def update(self, mean: torch.Tensor, log_sigma: torch.Tensor, value: torch.Tensor, error: torch.Tensor,
               channel: torch.Tensor) -> None:
        """Add predictions (``mean``, ``log_sigma``) of targets with normalised ``value``, ``error`` and
        ``channel`` (all packed, same length)."""
        mean, log_sigma = mean.float(), log_sigma.float()
        var = predictive_variance(log_sigma, error)
        r = value.float() - mean
        z = r.abs() / var.sqrt()
        nll = gaussian_nll(mean, log_sigma, value, error)
        per = torch.stack([torch.ones_like(r), r * r, r.abs(), nll, (z <= 1.0).float(), (z <= Z95).float()])
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
