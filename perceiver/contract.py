"""The data contract: everything a checkpoint needs to turn store values into model inputs and back.

It is fitted once, on the train split, when a model is trained (:func:`datasets.loader.fit_contract`), and is
written into the checkpoint's ``config.json``. Inference, evaluation and serving normalise and denormalise
with the checkpoint's copy, never with a store's current statistics: ingesting more files into a store changes
the store's statistics, not what an old model sees.

Per channel (:class:`ChannelSpec`): its name, modality and unit, its valid range, and its normalisation
``z = (T(v) - location) / scale`` with ``T`` the channel's bounded ``transform`` (``identity`` or
``asinh(v / softening)`` after the map of its valid range onto the real line; :mod:`datasets.normalise`).
For the record: the time and coord (wavelength) scales of the Fourier features, and the store format the
contract was fitted on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class ChannelSpec:
    """One channel of the vocabulary. ``location`` / ``scale`` are in the transformed unit; NaN = unknown
    (a checkpoint written before contracts existed: see :meth:`DataContract.complete`). ``valid_min`` /
    ``valid_max``: the channel's physical range in ``unit`` (NaN = unbounded). ``time_min_period``: the
    shortest period its sampling supports, twice its median gap between observations within a record in the
    train split (data time units; NaN = unknown). ``bound_width``: how close to a bound the normalising
    transform turns logarithmic (:mod:`datasets.normalise`; NaN = the bounds are not used, as in checkpoints
    written before they were)."""

    name: str
    modality: str
    unit: str = ""
    transform: str = "identity"
    softening: float = 1.0
    location: float = math.nan
    scale: float = math.nan
    valid_min: float = math.nan
    valid_max: float = math.nan
    time_min_period: float = math.nan
    bound_width: float = math.nan

    def __post_init__(self):
        # one NaN object for "unknown": dataclass equality compares fields as tuples (identity first), so two
        # contracts that agree compare equal however their NaNs were made (a JSON round trip, numpy)
        for f in ("softening", "location", "scale", "valid_min", "valid_max", "time_min_period", "bound_width"):
            value = float(getattr(self, f))
            setattr(self, f, math.nan if math.isnan(value) else value)


@dataclass
class DataContract:
    """The channel vocabulary with its normalisation, and the time / coord scales (data units: the
    dataset's time unit, e.g. hours or MJD days; coord in Angstrom)."""

    channels: list[ChannelSpec] = field(default_factory=list)
    #: modality names; a modality's index is its position here
    modalities: list[str] = field(default_factory=list)
    #: Fourier features: shortest / longest period of time and of coord, coord centre and half-range
    time_min_period: float = 1.0
    time_max_period: float = 100.0
    coord_min_period: float = 1.0
    coord_max_period: float = 10000.0
    coord_center: float = 0.0
    coord_scale: float = 1.0
    #: the store format (name and version) the contract was fitted on
    store_format: str = ""

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @property
    def channel_modality(self) -> list[int]:
        """Each channel's modality index."""
        lookup = {m: i for i, m in enumerate(self.modalities)}
        return [lookup[c.modality] for c in self.channels]

    @property
    def complete(self) -> bool:
        """Whether every channel's normalisation is known (false only for migrated old checkpoints)."""
        return all(math.isfinite(c.location) and math.isfinite(c.scale) for c in self.channels)

    def table(self) -> dict[str, np.ndarray]:
        """Per-channel arrays (``name``, ``modality``, ``unit``, ``transform``, ``softening``, ``location``,
        ``scale``, ``valid_min``, ``valid_max``, ``bound_width``) in channel order: what
        :func:`datasets.normalise.normalise` reads."""
        numeric = ("softening", "location", "scale", "valid_min", "valid_max", "bound_width")
        cols = ("name", "modality", "unit", "transform", *numeric)
        return {k: np.asarray([getattr(c, k) for c in self.channels], dtype=np.float64 if k in numeric else object)
                for k in cols}

    def to_dict(self) -> dict:
        data = asdict(self)
        for c in data["channels"]:  # JSON has no NaN: unknown statistics and absent bounds are null
            for k in ("location", "scale", "valid_min", "valid_max", "time_min_period", "bound_width"):
                c[k] = c[k] if math.isfinite(c[k]) else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DataContract:
        data = dict(data)
        channels = [ChannelSpec(**{k: (math.nan if v is None else v) for k, v in c.items()})
                    for c in data.pop("channels", [])]
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown DataContract fields: {sorted(unknown)}")
        contract = cls(channels=channels, **data)
        missing = {c.modality for c in channels} - set(contract.modalities)
        if missing:
            raise ValueError(f"channels of modalities {sorted(missing)} not in {contract.modalities}")
        return contract
