"""Archive readers, registered by name: ``get_source("physionet2019")``."""

from __future__ import annotations

import importlib

from datasets.sources.base import Source, Unit

#: source name -> module defining ``SOURCE`` (imported on first use, so one broken optional
#: dependency cannot stop the others)
REGISTRY: dict[str, str] = {
    "physionet2019": "datasets.sources.physionet2019",
    "plasticc": "datasets.sources.plasticc",
    "ztf_bts": "datasets.sources.ztf_bts",
    "macho": "datasets.sources.macho",
    "desi": "datasets.sources.desi",
    "table": "datasets.sources.table",
}


def get_source_class(name: str) -> type[Source]:
    """The class of the source called ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name]).SOURCE


def get_source(name: str, **options) -> Source:
    """An instance of the source called ``name``; ``options`` go to its constructor."""
    return get_source_class(name)(**options)


__all__ = ["REGISTRY", "Source", "Unit", "get_source", "get_source_class"]
