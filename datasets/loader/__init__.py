"""From an :class:`~datasets.format.ElementSet` to model batches: packing, length-aware batching, masking.

- :class:`ElementDataset`: one split of an ElementSet with its channel table, normalised, ready to pack;
- :func:`token_batches`: length-aware batches of records under a token budget (and :func:`shard` for DDP);
- :class:`Batch`: packed element tensors + ``offsets`` + ``visible``/``target`` flags (the model's input);
- :class:`MaskingConfig` / :func:`plan_masks`: the seeded masking plan (hold-out, modality dropout, forecast,
  auto-encoding).
"""

from datasets.loader.batches import Batch, ElementDataset, modality_names, shard, token_batches
from datasets.loader.masking import MaskingConfig, MaskPlan, full_plan, plan_masks

__all__ = ["Batch", "ElementDataset", "MaskPlan", "MaskingConfig", "full_plan", "modality_names",
           "plan_masks", "shard", "token_batches"]
