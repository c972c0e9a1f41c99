"""Unit strings of the channel table, parsed with astropy.

Channel units are astropy unit strings. Clinical pressures use ``mmHg``, which astropy keeps in its
CDS namespace; :func:`parse_unit` enables it so every channel unit parses.
"""

from __future__ import annotations

import astropy.units as u
from astropy.units import cds


def parse_unit(text: str) -> u.UnitBase:
    """The astropy unit for a channel's unit string (``""`` is dimensionless)."""
    with u.add_enabled_units([cds.mmHg]):
        return u.Unit(text)
