"""Step time and memory of every (model, mode, size) of bench/model_vs_peers.py, each in its own process, and
Percival's ratios against the peers.

Time = the fastest of the timed steps, taken over interleaved rounds (the machine is shared: the minimum is the
least disturbed estimate); memory = peak RSS growth during the steps over the RSS just before them.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peers_models import CASES, SIZES

SCRIPT = Path(__file__).with_name("model_vs_peers.py")  # runs one case with --case MODEL MODE N


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_case(name: str, mode: str, n: int, warmup: int, repeats: int) -> dict:
    """One (model, mode, size) in this process: parameters, step times, memory."""
    import torch

    model, step = CASES[name](n)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "best" else contextlib.nullcontext()
    for p in model.parameters():
        p.grad = None
    base = current_rss_gib()
    times = []
    for i in range(warmup + repeats):
        for p in model.parameters():
            p.grad = None
        t = time.perf_counter()
        step(autocast)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = peak_rss_gib()
    return {"model": name, "mode": mode, "n": n, "params": sum(p.numel() for p in model.parameters()),
            "time_min_s": min(times), "time_median_s": statistics.median(times), "peak_rss_gib": peak,
            "base_rss_gib": base, "step_mem_gib": peak - base, "threads": torch.get_num_threads()}


def spawn_case(name: str, mode: str, n: int, warmup: int, repeats: int) -> dict:
    """:func:`run_case` in a fresh process."""
    cmd = [sys.executable, str(SCRIPT), "--case", name, mode, str(n), "--warmup", str(warmup), "--repeats",
           str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=SCRIPT.parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} {mode} {n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peers(rounds: int, repeats: int, models: list[str]) -> dict:
    """Every case in its own process, ``rounds`` interleaved rounds; keep each case's best time."""
    best: dict[tuple, dict] = {}
    for r in range(rounds):
        for n in SIZES:
            for mode in ("fp32", "best"):
                for name in models:
                    res = spawn_case(name, mode, n, warmup=2 if n == 2048 else 1, repeats=repeats)
                    key = (name, mode, n)
                    prev = best.get(key)
                    if prev is None:
                        best[key] = res
                    else:  # keep the least disturbed time and the largest memory figure seen
                        prev["time_min_s"] = min(prev["time_min_s"], res["time_min_s"])
                        prev["time_median_s"] = min(prev["time_median_s"], res["time_median_s"])
                        prev["step_mem_gib"] = max(prev["step_mem_gib"], res["step_mem_gib"])
                        prev["peak_rss_gib"] = max(prev["peak_rss_gib"], res["peak_rss_gib"])
                    print(f"  round {r + 1}: {name:11s} {mode:4s} {n:5d}  {res['time_min_s'] * 1e3:8.0f} ms  "
                          f"step memory {res['step_mem_gib']:.2f} GiB  (peak RSS {res['peak_rss_gib']:.2f})",
                          flush=True)
    return best


def print_table(table: dict) -> None:
    print(f"\n{'model':11s} {'mode':4s} {'N':>5s} {'params':>7s} {'time ms':>8s} {'median':>7s} "
          f"{'step GiB':>8s} {'peak GiB':>8s}")
    for (name, mode, n), r in sorted(table.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        print(f"{name:11s} {mode:4s} {n:5d} {r['params'] / 1e6:6.2f}M {r['time_min_s'] * 1e3:8.0f} "
              f"{r['time_median_s'] * 1e3:7.0f} {r['step_mem_gib']:8.2f} {r['peak_rss_gib']:8.2f}")


def ratios(table: dict) -> dict:
    """Per mode and size: ``percival`` against ``hf``, ``hf-nodrop`` and ``lucidrains``; ``percival-default``
    (the shipped decoder) against ``hf`` and ``hf-nodrop``; and the parameter counts."""
    result: dict = {}
    for mode in ("fp32", "best"):
        result[mode], result[mode + "_default_decoder"] = {}, {}
        for n in SIZES:
            pc, hf = table[("percival", mode, n)], table[("hf", mode, n)]
            hf0 = table[("hf-nodrop", mode, n)]
            lr = table[("lucidrains", mode, n)]
            result[mode][str(n)] = {
                "time_vs_hf": pc["time_min_s"] / hf["time_min_s"],
                "mem_vs_hf": pc["step_mem_gib"] / hf["step_mem_gib"],
                "peak_rss_vs_hf": pc["peak_rss_gib"] / hf["peak_rss_gib"],
                "time_vs_hf_nodrop": pc["time_min_s"] / hf0["time_min_s"],
                "mem_vs_hf_nodrop": pc["step_mem_gib"] / hf0["step_mem_gib"],
                "time_vs_lucidrains": pc["time_min_s"] / lr["time_min_s"],
                "percival_ms": pc["time_min_s"] * 1e3, "hf_ms": hf["time_min_s"] * 1e3}
            dc = table[("percival-default", mode, n)]
            result[mode + "_default_decoder"][str(n)] = {
                "time_vs_hf_nodrop": dc["time_min_s"] / hf0["time_min_s"],
                "mem_vs_hf_nodrop": dc["step_mem_gib"] / hf0["step_mem_gib"],
                "time_vs_hf": dc["time_min_s"] / hf["time_min_s"],
                "mem_vs_hf": dc["step_mem_gib"] / hf["step_mem_gib"],
                "percival_default_ms": dc["time_min_s"] * 1e3, "hf_nodrop_ms": hf0["time_min_s"] * 1e3}
    result["params"] = {name: table[(name, "fp32", 2048)]["params"] for name in
                        ("percival", "percival-default", "hf", "lucidrains")}
    result["params_vs_hf"] = result["params"]["percival"] / result["params"]["hf"]
    return result
