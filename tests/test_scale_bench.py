"""bench/scale.py's measurements: a step's exact peak RSS, a grandchild's polled peak, the table and ratios."""

from __future__ import annotations

import sys

from bench.scale import measure, ratios, table

ALLOCATE = "import time; b = bytearray({mib} << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"


def test_measure_reports_the_peak_rss_of_a_child_and_of_a_grandchild(tmp_path):
    child = measure([sys.executable, "-c", ALLOCATE.format(mib=200)], tmp_path / "child.log")
    assert child["rc"] == 0 and 200 <= child["peak_rss_mib"] < 400
    outer = f"import subprocess, sys; subprocess.check_call([sys.executable, '-c', {ALLOCATE.format(mib=300)!r}])"
    grand = measure([sys.executable, "-c", outer], tmp_path / "grand.log")
    assert grand["rc"] == 0 and 300 <= grand["peak_rss_mib"] < 500  # exact: the largest descendant
    assert max(grand["polled_peak_rss_mib"].values()) >= 300  # polled: every process of the tree


def test_ratios_and_table_compare_each_size_with_the_smallest():
    def size(rows, ingest_mib, rows_per_s, train_mib):
        return {"rows": rows, "archive": {"mib": rows / 1e5},
                "ingest": {"rc": 0, "seconds": rows / rows_per_s, "rows_per_s": rows_per_s, "work_rows_per_s": None,
                           "peak_rss_mib": ingest_mib, "store_mib": 1.0},
                "train": {"rc": 0, "seconds": 10.0, "peak_rss_mib": train_mib, "elements_per_s": 1000}}

    sizes = {2_000_000: size(2_000_000, 500.0, 100_000, 1000.0), 20_000_000: size(20_000_000, 600.0, 90_000, 1100.0)}
    sizes[20_000_000]["train_ddp"] = {"rc": 0, "seconds": 12.0, "rank_peak_rss_mib": {"rank0": 900.0, "rank1": 880.0}}
    r = ratios(sizes)
    assert r["2e+07 vs 2e+06"] == {"rows": 10.0, "ingest_peak_rss": 1.2, "ingest_rows_per_s": 0.9,
                                   "ingest_work_rows_per_s": None, "train_peak_rss": 1.1}
    assert r["2e+07 2-process rank vs 1-process"] == {"max_rank_peak_rss": 0.82}
    text = table(sizes)
    assert text.count("\n") == 3 and "900 / 880" in text
