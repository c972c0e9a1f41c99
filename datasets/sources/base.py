"""The source interface: how an archive's native files become :class:`~datasets.format.RawElements`.

A source lists the *units* of an archive (one file, or one member of a zip file), each with a cheap
fingerprint, and reads a list of units at once (vectorised: one parse for many files where the format
allows it). Reading never raises on bad input: an unreadable unit becomes a quarantine row.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from datasets.format import Channel, RawElements


@dataclass(frozen=True)
class Unit:
    """One readable piece of an archive: a file, or a member of a zip file (``member`` set)."""

    path: str
    member: str | None = None
    fingerprint: str = ""

    @property
    def name(self) -> str:
        """How quarantine rows and reports name this unit: ``file`` or ``archive.zip:member``."""
        base = os.path.basename(self.path)
        return f"{base}:{self.member}" if self.member else base


#: the date-time Modified Julian Dates count from (UTC)
MJD_EPOCH = "1858-11-17 00:00:00"


class Source(ABC):
    """An archive format. Subclasses set ``name``, ``time_unit`` and implement the methods below."""

    name: ClassVar[str]
    #: astropy unit string of ``time`` ("h" for hours since admission, "d" for MJD days)
    time_unit: ClassVar[str]
    #: what ``time`` counts from, in words (stored in the store's attrs)
    time_reference: ClassVar[str] = ""
    #: the date-time ``time`` counts from (ISO, UTC), where it is one: MJD counts from 1858-11-17 00:00; None
    #: where time counts from an event of each record (ICU admission), so the store's CF units are a duration
    time_epoch: ClassVar[str | None] = None
    #: record attributes besides record_id/source_file (labels, t0, ...)
    label_columns: ClassVar[tuple[str, ...]] = ()
    #: default shard size in units; aim for ~0.5-2 M elements per shard (one store shard is 2 Mi)
    units_per_shard: ClassVar[int] = 200
    #: fsspec options (credentials, endpoint) for reading the archive; set by ``get_source(storage_options=...)``
    #: and passed on with every read (see :mod:`datasets.sources.files`)
    storage_options: Mapping[str, object] = MappingProxyType({})

    @abstractmethod
    def discover(self, path: str) -> list[Unit]:
        """List the units of the archive at ``path`` (a file or a directory: a local path or an fsspec URL,
        read with :attr:`storage_options`), in a stable order."""

    @abstractmethod
    def channels(self) -> list[Channel]:
        """The channel table (after :meth:`discover` for sources whose channels come from the data)."""

    @abstractmethod
    def read(self, units: list[Unit]) -> RawElements:
        """Read ``units`` into raw elements; unreadable units become quarantine rows, never exceptions."""

    def shard(self, units: list[Unit], size: int) -> list[list[Unit]]:
        """Group units into shards of about ``size`` units, in order. Sources whose records span several
        units (a star's B and R files) override this to keep a record's units together."""
        return [units[i:i + size] for i in range(0, len(units), size)]

    #: constructor option -> what it means (with its unit); the defaults come from the signature
    OPTION_HELP: ClassVar[dict[str, str]] = {}

    @classmethod
    def options_help(cls) -> str:
        """The source's options (``percival ingest SOURCE --option KEY=VALUE``): meaning, unit and default."""
        if not cls.OPTION_HELP:
            return f"source {cls.name!r} takes no options."
        params = inspect.signature(cls.__init__).parameters
        width = max(map(len, cls.OPTION_HELP))
        lines = [f"options of source {cls.name!r} (--option KEY=VALUE; values are JSON where they parse):"]
        for name, meaning in cls.OPTION_HELP.items():
            default = params[name].default if name in params else inspect.Parameter.empty
            shown = "required" if default is inspect.Parameter.empty else f"default {default!r}"
            lines.append(f"  {name:<{width}}  {meaning} ({shown})")
        return "\n".join(lines)

    def resolved_options(self) -> dict | None:
        """Constructor options that rebuild this source as :meth:`discover` left it, for readers in other
        processes (e.g. a channel table learnt from the data); None: the options given suffice."""
        return None


def file_fingerprint(path: str) -> str:
    """Size and modification time: changes when the file is rewritten, costs no read."""
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


def unreadable(unit: Unit, error: BaseException, row: int = -1) -> dict:
    """A quarantine row for a unit (or part of one) that could not be read."""
    return {"source_file": unit.name, "row": row, "record_id": "", "field": "file",
            "reason": f"unreadable: {type(error).__name__}: {error}", "elements": 0}
