"""From an :class:`~datasets.format.ElementSet` to model batches: the data contract, packing, length-aware
batching, masking.

- :func:`fit_contract` / :func:`match_channels`: a model's data contract, fitted on the train split, and the one
  check that a store matches it;
- :class:`ElementDataset`: one split of an ElementSet normalised with a contract, ready to pack into
  :class:`perceiver.PackedBatch` es (the model's input type);
- :func:`token_batches`: length-aware batches of records under a token budget (and :func:`shard` for DDP);
- :class:`MaskingConfig` / :func:`plan_masks`: the seeded masking plan (hold-out, modality dropout, forecast,
  auto-encoding).
"""

from datasets.loader.batches import ElementDataset, shard, token_batches
from datasets.loader.contract import ContractError, fit_contract, match_channels, modality_names
from datasets.loader.masking import MaskingConfig, MaskPlan, full_plan, plan_masks

__all__ = ["ContractError", "ElementDataset", "MaskPlan", "MaskingConfig", "fit_contract", "full_plan",
           "match_channels", "modality_names", "plan_masks", "shard", "token_batches"]
