"""The model's configuration, in sections: sizes / input / decoder / head / data contract.

:class:`ModelConfig` is the ``model`` section of the ``config.json`` written beside every checkpoint.
``ModelConfig.from_dict`` reads it back: unknown keys are an error, missing keys take their defaults (so old
configs stay readable when a field is added), and the flat layout of checkpoints written before the sections
existed (``{"d_latent": 128, "decoder_local_heads": 4, "channel_names": [...], ...}``) is migrated on read
(:data:`FLAT_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from perceiver.contract import ChannelSpec, DataContract


@dataclass
class Sizes:
    """Widths and depths of the encoder and the latent stack."""

    #: width of an element token (encoder input and decoder query encodings)
    d_input: int = 64
    #: latent array: n_latents x d_latent
    n_latents: int = 64
    d_latent: int = 128
    #: latent self-attention blocks, their heads and MLP widening; share_weights reuses one block
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    share_weights: bool = False
    #: encoder cross-attention (latents -> elements): heads and per-head width (0 = d_input), MLP widening
    cross_heads: int = 1
    cross_head_dim: int = 0
    cross_mlp_ratio: float = 4.0


@dataclass
class InputConfig:
    """How an element becomes a token (:mod:`perceiver.encodings`): Fourier features of time and coord (their
    periods are data statistics, in the contract) and the per-element MLP's widening."""

    n_time_freqs: int = 16
    n_coord_freqs: int = 16
    mlp_ratio: float = 1.0
    #: zero a channel's time Fourier features at periods shorter than its own sampling supports
    #: (``ChannelSpec.time_min_period``): no structure at periods a lab drawn daily cannot show
    channel_time_gate: bool = False


@dataclass
class DecoderConfig:
    """How a query reads the encoded record (:mod:`perceiver.model`)."""

    #: query width, cross-attention heads (to the latents) and per-head width (0 = d_query / heads), MLP widening
    d_query: int = 128
    heads: int = 1
    head_dim: int = 0
    mlp_ratio: float = 4.0
    #: queries also attend to a bounded neighbourhood of their record's visible element tokens
    #: (:mod:`perceiver.local_attention`): heads (0 = latents only), visible elements read on each side of the
    #: query in time (any channel), and of the query's own channel on each side. Cost per query is fixed.
    local_heads: int = 4
    local_time: int = 8
    local_channel: int = 4
    #: queries carry their channel's previous / next visible values and the gaps to them
    #: (:mod:`perceiver.neighbours`) ...
    neighbours: bool = True
    #: ... and the same for every channel of the table: the record's state around the query's time
    snapshot: bool = True


@dataclass
class HeadConfig:
    """The output head (:mod:`perceiver.heads`): which one (a name in :data:`perceiver.heads.HEADS`) and its
    settings. ``min_sigma``: floor on a predicted sigma (normalised units); ``nll_beta``: beta-NLL exponent of
    the Gaussian head's loss (0 = plain NLL); ``options``: settings of other heads."""

    name: str = "gaussian"
    min_sigma: float = 1e-3
    nll_beta: float = 0.5
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model: its sections and its data contract."""

    sizes: Sizes = field(default_factory=Sizes)
    input: InputConfig = field(default_factory=InputConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    contract: DataContract = field(default_factory=DataContract)
    #: variable-length attention: "auto" (length-grouped padded SDPA), "padded" (pad to max), "loop"
    varlen: str = "auto"

    # the contract's vocabulary, for the many places that need only that
    @property
    def n_channels(self) -> int:
        return self.contract.n_channels

    @property
    def n_modalities(self) -> int:
        return self.contract.n_modalities

    @property
    def channel_names(self) -> list[str]:
        return self.contract.channel_names

    @property
    def modalities(self) -> list[str]:
        return self.contract.modalities

    @property
    def channel_modality(self) -> list[int]:
        return self.contract.channel_modality

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """Named sizes: ``tiny`` (tests, ~30 k parameters), ``small`` (the default, ~1.2 M, trains on a CPU in
        minutes), ``bench`` (the peer-comparison shape: 256 x 256 latents, 6 layers of 8 heads, ~5.1 M; a pure
        Perceiver IO decoder, as the peers have). ``overrides``: fields by their flat names (:data:`FLAT_FIELDS`,
        e.g. ``d_latent=32``) or whole sections."""
        presets = {
            "tiny": dict(d_input=16, n_latents=8, d_latent=32, n_layers=2, n_heads=2, mlp_ratio=2.0,
                         cross_mlp_ratio=2.0, d_query=32, decoder_mlp_ratio=2.0, n_time_freqs=8,
                         n_coord_freqs=4),
            "small": {},
            "bench": dict(d_input=64, n_latents=256, d_latent=256, n_layers=6, n_heads=8, mlp_ratio=4.0,
                          cross_heads=1, cross_head_dim=64, cross_mlp_ratio=1.0, d_query=128, decoder_heads=1,
                          decoder_head_dim=64, decoder_mlp_ratio=2.0, decoder_local_heads=0,
                          decoder_neighbours=False),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["contract"] = self.contract.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """A config from its ``model`` section; flat (pre-section) layouts are migrated."""
        return build_dataclass(cls, migrate_flat(data))


#: the flat field names of configs written before the sections (and accepted by ``preset`` and ``--set``):
#: name -> (section, field)
FLAT_FIELDS = {
    **{k: ("sizes", k) for k in ("d_input", "n_latents", "d_latent", "n_layers", "n_heads", "mlp_ratio",
                                 "share_weights", "cross_heads", "cross_head_dim", "cross_mlp_ratio")},
    "input_mlp_ratio": ("input", "mlp_ratio"), "n_time_freqs": ("input", "n_time_freqs"),
    "n_coord_freqs": ("input", "n_coord_freqs"),
    "d_query": ("decoder", "d_query"), "decoder_heads": ("decoder", "heads"),
    "decoder_head_dim": ("decoder", "head_dim"), "decoder_mlp_ratio": ("decoder", "mlp_ratio"),
    "decoder_local_heads": ("decoder", "local_heads"), "decoder_local_time": ("decoder", "local_time"),
    "decoder_local_channel": ("decoder", "local_channel"), "decoder_neighbours": ("decoder", "neighbours"),
    "decoder_snapshot": ("decoder", "snapshot"),
    "min_sigma": ("head", "min_sigma"),
    **{k: ("contract", k) for k in ("time_min_period", "time_max_period", "coord_min_period", "coord_max_period",
                                    "coord_center", "coord_scale")},
}
SECTIONS = ("sizes", "input", "decoder", "head", "contract")


def migrate_flat(data: dict) -> dict:
    """The sectioned form of a ``model`` dict that may use flat (pre-section) names. The old channel
    vocabulary (``channel_names``, ``modalities``, ``channel_modality``) becomes a contract whose normalisation
    statistics are unknown (:attr:`DataContract.complete` is false)."""
    data = dict(data)
    if data.pop("decoder_element_heads", 0):
        # the decoder's attention to *every* visible element of a record (O(queries x elements)) is retired
        raise ValueError("this checkpoint's decoder attends to every element of a record (the retired O(N^2) "
                         "decoder_element_heads); retrain it with the bounded local decoder")
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()
           if k in SECTIONS or k == "varlen"}
    names, mods, ch_mod = (data.pop(k, None) for k in ("channel_names", "modalities", "channel_modality"))
    if names is not None:
        contract = out.setdefault("contract", {})
        contract["modalities"] = list(mods or [])
        contract["channels"] = [{"name": n, "modality": contract["modalities"][m]}
                                for n, m in zip(names, ch_mod or [], strict=True)]
    for key, value in data.items():
        if key in SECTIONS or key == "varlen":
            continue
        if key not in FLAT_FIELDS:
            raise ValueError(f"unknown ModelConfig field {key!r}")
        section, name = FLAT_FIELDS[key]
        out.setdefault(section, {})[name] = value
    return out


def build_dataclass(cls: type, data: dict):
    """A dataclass from a dict, recursing into dataclass-typed fields (or their ``from_dict``); unknown keys
    raise, scalar types are checked."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for k, v in data.items():
        hint = hints[k]
        if hasattr(hint, "from_dict") and isinstance(v, dict):
            v = hint.from_dict(v)
        elif dataclasses.is_dataclass(hint) and isinstance(v, dict):
            v = build_dataclass(hint, v)
        elif typing.get_origin(hint) is tuple and isinstance(v, list):
            v = tuple(v)
        elif hint in (int, float, str, bool) and not _fits(v, hint):
            raise ValueError(f"{cls.__name__}.{k} must be {hint.__name__}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def _fits(value, kind: type) -> bool:
    """JSON's view of a scalar field: an int is a float too; a bool is not a number."""
    if kind is bool or isinstance(value, bool):
        return isinstance(value, bool) and kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


__all__ = ["ChannelSpec", "DataContract", "DecoderConfig", "HeadConfig", "InputConfig", "ModelConfig", "Sizes",
           "build_dataclass"]
