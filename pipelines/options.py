"""The one option layer of the CLI, the flows and the benchmarks: ``KEY=VALUE`` pairs and config overrides.

Values are read as JSON where they parse (``3e-4``, ``true``, ``[1, 2]``) and as strings otherwise.
"""

from __future__ import annotations

import json


class OptionError(ValueError):
    """A malformed ``KEY=VALUE`` item; the message names the flag and the item."""


def parse_value(raw: str):
    """JSON where it parses, else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_pairs(pairs: list[str] | None, flag: str = "--option") -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``."""
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = parse_value(value)
    return out


def scoped(items: list[str] | None, scope: str, separator: str = ":") -> list[str]:
    """The items that apply to ``scope``: plain ones, and ``SCOPE:item`` ones with the scope stripped (e.g. a
    benchmark's ``--set physionet2019:masking.modality_dropout=0.4``)."""
    out = []
    for item in items or []:
        head, sep, rest = item.partition(separator)
        if not sep or "=" in head:
            out.append(item)
        elif head == scope:
            out.append(rest)
    return out


def default_threads(processes: int = 1) -> int:
    """Torch threads per process when none are asked for: ``OMP_NUM_THREADS`` where set (the usual way to share
    a machine), else the CPU count shared between ``processes``."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(processes, 1))
