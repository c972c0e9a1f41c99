"""Checkpoint selection on the validation split, robust to a handful of extreme values.

The validation MSE is dominated by its largest residuals: on a hospital archive, four elements of one patient
(z = 55 to 151) made up 98.6 % of it, and it stayed flat while the model improved. The selection score is
therefore the **median absolute error per channel** (normalised units) of the held-out validation targets,
averaged over the channels (each channel counts once, however often it is measured), and the same per
modality for the training log. One absurd value moves its channel's median by at most one rank.

:class:`Selection` keeps the best score, its step, and how many evaluations have passed without improving
on it (for early stopping, ``train.early_stop_patience``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class RobustScore:
    """Accumulates absolute errors per channel; :meth:`summary` gives the selection score."""

    def __init__(self, channel_modality: list[int], modalities: list[str]):
        self.channel_modality = np.asarray(channel_modality, np.int64)
        self.modalities = modalities
        self.errors: list[np.ndarray] = []
        self.channels: list[np.ndarray] = []

    @torch.no_grad()
    def update(self, mean: torch.Tensor, value: torch.Tensor, channel: torch.Tensor) -> None:
        self.errors.append((value.float() - mean.float()).abs().cpu().numpy())
        self.channels.append(channel.cpu().numpy())

    def summary(self) -> dict:
        """``{"overall": score, "modality": {name: score}}`` (channels without targets left out; NaN where
        nothing was scored)."""
        if not self.errors:
            return {"overall": float("nan"), "modality": {}}
        err, ch = np.concatenate(self.errors), np.concatenate(self.channels)
        order = np.argsort(ch, kind="stable")
        err, ch = err[order], ch[order]
        present, starts = np.unique(ch, return_index=True)
        medians = np.array([np.median(part) for part in np.split(err, starts[1:])])  # one per channel
        modality = self.channel_modality[present]
        return {"overall": float(medians.mean()),
                "modality": {self.modalities[m]: float(medians[modality == m].mean()) for m in np.unique(modality)}}


@dataclass
class Selection:
    """The best validation score so far (lower is better), its step, and evaluations since it."""

    best: float = float("inf")
    best_step: int = 0
    since_best: int = 0

    def update(self, score: float, step: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        if score < self.best:
            self.best, self.best_step, self.since_best = score, step, 0
            return True
        self.since_best += 1
        return False

    def state(self) -> torch.Tensor:
        return torch.tensor([self.best, float(self.best_step), float(self.since_best)], dtype=torch.float64)

    @classmethod
    def from_state(cls, t: torch.Tensor) -> Selection:
        return cls(float(t[0]), int(t[1]), int(t[2]))
