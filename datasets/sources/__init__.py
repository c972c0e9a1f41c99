"""Archive readers, registered by name: ``get_source("physionet2019")``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

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


def get_source(name: str, storage_options: Mapping[str, object] | None = None, **options) -> Source:
    """An instance of the source called ``name``; ``options`` go to its constructor, ``storage_options``
    (fsspec: credentials, endpoint) are kept for reading archives that are URLs."""
    source = get_source_class(name)(**options)
    if storage_options:
        source.storage_options = dict(storage_options)
    return source


__all__ = ["REGISTRY", "Source", "Unit", "get_source", "get_source_class"]
