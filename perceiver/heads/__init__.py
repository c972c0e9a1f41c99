"""Output heads: what a decoded query token becomes, and the loss that trains it.

A head is an ``nn.Module`` subclass of :class:`~perceiver.heads.base.OutputHead`, registered under a name;
``HeadConfig.name`` (``percival train --head NAME``) picks it. Adding a head is one new module plus one
:func:`register_head` call: the encoder, the decoder, the loader and the flows do not change.
"""

from __future__ import annotations

from perceiver.heads.base import HeadOutput, OutputHead
from perceiver.heads.flow import FlowMatchingHead
from perceiver.heads.gaussian import GaussianHead

#: name -> head class
HEADS: dict[str, type[OutputHead]] = {}


def register_head(name: str, cls: type[OutputHead]) -> type[OutputHead]:
    """Make ``cls`` available as ``HeadConfig(name=name)``; returns ``cls`` (usable as a decorator's body)."""
    if not (isinstance(cls, type) and issubclass(cls, OutputHead)):
        raise TypeError(f"head {name!r} must subclass perceiver.heads.OutputHead")
    HEADS[name] = cls
    return cls


def build_head(config, d_query: int) -> OutputHead:
    """The head named by ``config.name`` (a :class:`~perceiver.config.HeadConfig`), for queries of width
    ``d_query``."""
    if config.name not in HEADS:
        raise ValueError(f"unknown output head {config.name!r}; registered: {sorted(HEADS)}")
    return HEADS[config.name](config, d_query)


register_head("gaussian", GaussianHead)
register_head("diffusion", FlowMatchingHead)

__all__ = ["HEADS", "FlowMatchingHead", "GaussianHead", "HeadOutput", "OutputHead", "build_head", "register_head"]
