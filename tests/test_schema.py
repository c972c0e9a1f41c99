"""Validation and quarantine on hand-made raw elements: every reason, sorting, reconciliation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datasets.format import Channel, RawElements
from datasets.schema import drop_known_records, validate


def raw(rows: list[tuple], records=("a", "b")) -> RawElements:
    """rows: (record index, time, channel, value, error, coord)."""
    a = np.array(rows, dtype=np.float64).reshape(-1, 6)
    recs = pd.DataFrame({"record_id": list(records), "source_file": [f"{r}.csv" for r in records]})
    return RawElements(recs, a[:, 0].astype(np.int64), a[:, 1], a[:, 2].astype(np.int16),
                       a[:, 3].astype(np.float32), a[:, 4].astype(np.float32), a[:, 5].astype(np.float32),
                       np.arange(2, len(a) + 2))


def reasons(v) -> dict[str, int]:
    return v.quarantine.groupby("reason")["elements"].sum().to_dict()


def test_clean_input_is_stored_sorted_with_static_first():
    r = raw([(0, 2.0, 1, 5, 1, np.nan), (0, np.nan, 0, 7, np.nan, np.nan), (0, 1.0, 1, 3, 1, np.nan),
             (1, 0.5, 0, 1, 1, np.nan)])
    v = validate(r, 2)
    assert v.quarantine.empty
    assert list(v.elements.row_size) == [3, 1]
    assert np.isnan(v.elements.time[0]) and list(v.elements.time[1:3]) == [1.0, 2.0]
    assert v.records_resorted == 1
    assert (v.counts["read"] == v.counts["stored"] + v.counts["quarantined"]).all()


def test_every_element_level_reason_is_counted():
    r = raw([(0, 1.0, 0, np.nan, 1, np.nan),      # value not finite
             (0, 2.0, 0, np.inf, 1, np.nan),      # value not finite
             (0, 3.0, 0, 1.0, 0.0, np.nan),       # zero error
             (0, 4.0, 0, 1.0, -1.0, np.nan),      # negative error
             (0, 5.0, 0, 1.0, np.inf, np.nan),    # infinite error
             (0, 6.0, 7, 1.0, 1.0, np.nan),       # unknown channel
             (0, np.inf, 0, 1.0, 1.0, np.nan),    # infinite time
             (0, 7.0, 0, 1.0, 1.0, np.nan),       # kept
             (0, 7.0, 0, 2.0, 1.0, np.nan),       # duplicate (time, channel)
             (1, 1.0, 0, 1.0, np.nan, np.nan)])   # kept, NaN error = unknown
    v = validate(r, 2)
    assert reasons(v) == {"value is not finite": 2, "error is infinite, zero or negative": 3,
                          "unknown channel": 1, "duplicate (time, channel, coord)": 1, "time is infinite": 1}
    assert list(v.elements.row_size) == [1, 1]
    assert v.elements.value[0] == 1.0  # the first of the duplicates is kept
    c = v.counts.set_index("source_file")
    assert c.loc["a.csv"].tolist() == [9, 1, 8] and c.loc["b.csv"].tolist() == [1, 1, 0]


def test_same_time_and_channel_at_other_wavelengths_are_not_duplicates():
    r = raw([(0, 1.0, 0, 1, 1, 5000.0), (0, 1.0, 0, 1, 1, 5001.0)], records=("a",))
    assert validate(r, 1).elements.n_elements == 2


def test_record_level_reasons():
    r = raw([(0, 1.0, 0, 1, 1, np.nan), (0, 2.0, 0, 1, 1, np.nan), (0, 3.0, 0, 1, 1, np.nan),
             (1, 1.0, 0, np.nan, 1, np.nan), (2, 1.0, 0, 1, 1, np.nan)], records=("big", "empty", "big"))
    v = validate(r, 1, max_record_elements=2)
    got = v.quarantine.set_index("reason")
    assert got.loc["record has more than 2 elements", "elements"] == 3
    assert got.loc["empty record (no valid elements)", "record_id"] == "empty"
    assert got.loc["duplicate record id", "elements"] == 1
    assert v.elements.n_records == 0


def test_records_already_in_the_store_move_to_quarantine():
    v = validate(raw([(0, 1.0, 0, 1, 1, np.nan), (1, 1.0, 0, 1, 1, np.nan)]), 1)
    w = drop_known_records(v, {"a"})
    assert list(w.elements.records["record_id"]) == ["b"]
    assert w.quarantine["reason"].tolist() == ["duplicate record id (already in the store)"]
    c = w.counts.set_index("source_file")
    assert c.loc["a.csv"].tolist() == [1, 0, 1]


def test_values_outside_a_channels_valid_range_are_quarantined_with_the_value_and_the_range():
    channels = [Channel("Lactate", "labs", "mmol / L", valid_min=0.0),
                Channel("SaO2", "labs", "%", valid_min=0.0, valid_max=100.0), Channel("BaseExcess", "labs", "")]
    r = raw([(0, 1.0, 0, -1.0, 1, np.nan),        # below valid_min
             (0, 2.0, 0, -1.0, 1, np.nan),        # the same sentinel again: one row, 2 elements
             (0, 3.0, 0, 0.0, 1, np.nan),         # on the bound: kept
             (0, 1.0, 1, 100.5, 1, np.nan),       # above valid_max
             (0, 2.0, 1, 100.0, 1, np.nan),       # kept
             (1, 1.0, 2, -12.0, 1, np.nan),       # unbounded channel: kept
             (1, 2.0, 0, np.inf, 1, np.nan)])     # not finite: its own reason, not counted twice
    v = validate(r, channels)
    q = v.quarantine
    rows = q[q["reason"].str.startswith("value outside")].set_index("reason")["elements"].to_dict()
    assert rows == {"value outside the channel's valid range 'Lactate=-1 not in [0, nan]'": 2,
                    "value outside the channel's valid range 'SaO2=100.5 not in [0, 100]'": 1}
    assert reasons(v)["value is not finite"] == 1
    assert list(v.elements.row_size) == [2, 1] and sorted(v.elements.value.tolist()) == [-12.0, 0.0, 100.0]
    assert (v.counts["read"] == v.counts["stored"] + v.counts["quarantined"]).all()


def test_a_range_upside_down_is_an_error_naming_the_channel():
    with pytest.raises(ValueError, match="channel 'FiO2': valid_min 1 is above valid_max 0"):
        Channel("FiO2", "labs", "", valid_min=1.0, valid_max=0.0)
