"""Cost of one record against its length: is the model linear in elements and queries?

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py            # 10^3 .. 6.4x10^4 elements (~5 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py --quick    # 10^3 .. 8x10^3

For each length N (one synthetic record, :func:`datasets.loader.synthetic.synthetic_elements`: 5 timed channels
and a static one), two configurations of the default ``small`` preset:

- ``default``: the shipped decoder (neighbour and snapshot features, bounded local attention);
- ``latents_only``: the same model with every decoder addition off (queries read the latents only), the
  Perceiver IO reference;
- ``diffusion`` (with ``--configs``): the default model with the generative head.

and up to three jobs (``--jobs``; default the first two), each in its own process on one thread (peak memory =
that process's peak RSS growth over its RSS before the job):

- ``inference``: :func:`perceiver.queries.predict` of every element with every element visible (what
  ``percival reconstruct`` asks per record): N encoder inputs, N queries;
- ``training``: one forward + backward step with 30 % of the elements hidden (0.7 N inputs, 0.3 N queries);
- ``sampling``: ``inference`` plus :data:`N_SAMPLES` draws of every element (``reconstruct --samples 16``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py --configs diffusion --jobs inference sampling

Time is the fastest of ``--repeats`` runs after a warm-up. The exponent is the least-squares slope of
log(time) and log(memory) against log(N): 1 is linear, 2 quadratic. Prints a table and a final JSON line; with
``--out FILE`` writes the JSON there too (with the CPU model and the commit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model, git_commit  # noqa: E402  (bench/machine.py, beside this script)

LENGTHS = (1000, 2000, 4000, 8000, 16000, 32000, 64000)
CONFIGS = {"default": {}, "latents_only": {"decoder_local_heads": 0, "decoder_neighbours": False,
                                           "decoder_snapshot": False},
           "diffusion": {"head": {"name": "diffusion"}}}
JOBS = ("inference", "training", "sampling")
N_SAMPLES = 16


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_case(config_name: str, job: str, n: int, repeats: int) -> dict:
    """One (configuration, job, length) in this process."""
    import numpy as np
    import torch

    from datasets.loader import ElementDataset, MaskingConfig, fit_contract
    from datasets.loader.synthetic import synthetic_elements
    from perceiver.config import ModelConfig
    from perceiver.model import Percival
    from perceiver.queries import predict

    torch.set_num_threads(1)
    elements, channels = synthetic_elements(seed=0, lengths=np.array([n - 1]), split=(1.0, 0.0, 0.0))
    contract = fit_contract(elements, channels)
    ds = ElementDataset(elements, channels, contract)
    config = ModelConfig.preset("small", contract=contract, **CONFIGS[config_name])
    torch.manual_seed(0)
    model = Percival(config)
    if job in ("inference", "sampling"):
        batch = ds.collate([0])
        k = N_SAMPLES if job == "sampling" else 0

        def run() -> None:
            predict(model, batch, n_samples=k)
    else:
        masking = MaskingConfig(holdout=0.3, modality_dropout=0.0, forecast=0.0, autoencode=0.0)
        batch = ds.collate([0], masking, np.random.default_rng(0))
        model.train()

        def run() -> None:
            for p in model.parameters():
                p.grad = None
            model.loss(batch, model(batch)).backward()

    base = rss_gib()
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        run()
        if i:
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"config": config_name, "job": job, "n": int(batch.n_elements), "time_s": min(times),
            "peak_gib": peak, "base_gib": base, "mem_gib": max(peak - base, 0.0)}


def spawn(config_name: str, job: str, n: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--case", config_name, job, str(n), "--repeats", str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"config": config_name, "job": job, "n": n, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exponent(ns: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(n)."""
    import numpy as np

    ok = [(x, y) for x, y in zip(ns, ys, strict=True) if y and y > 0]
    if len(ok) < 2:
        return None
    x, y = np.log([o[0] for o in ok]), np.log([o[1] for o in ok])
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs=3, metavar=("CONFIG", "JOB", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="lengths 10^3 .. 8x10^3, 2 repeats")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["default", "latents_only"])
    ap.add_argument("--jobs", nargs="+", choices=list(JOBS), default=["inference", "training"])
    args = ap.parse_args()
    if args.case:
        name, job, n = args.case
        print(json.dumps(run_case(name, job, int(n), args.repeats)))
        return
    lengths = LENGTHS[:4] if args.quick else LENGTHS
    repeats = 2 if args.quick else args.repeats
    print(f"CPU: {cpu_model()}; 1 thread; commit {git_commit()}", flush=True)
    rows = []
    for n in lengths:
        for job in args.jobs:
            for name in args.configs:
                r = spawn(name, job, n, repeats)
                rows.append(r)
                if "error" in r:
                    print(f"  {name:12s} {job:9s} N={n:6d}  FAILED: {r['error'].splitlines()[-1]}", flush=True)
                else:
                    print(f"  {name:12s} {job:9s} N={r['n']:6d}  {r['time_s'] * 1e3:9.1f} ms  "
                          f"{r['time_s'] / r['n'] * 1e6:7.2f} us/element  {r['mem_gib'] * 1024:8.1f} MiB",
                          flush=True)
    summary = {}
    for job in args.jobs:
        for name in args.configs:
            ok = [r for r in rows if r["config"] == name and r["job"] == job and "error" not in r]
            ns = [r["n"] for r in ok]
            summary[f"{name}.{job}"] = {"time_exponent": exponent(ns, [r["time_s"] for r in ok]),
                                        "memory_exponent": exponent(ns, [r["mem_gib"] for r in ok]),
                                        "largest_n": max(ns, default=None),
                                        "time_at_largest_s": ok[-1]["time_s"] if ok else None,
                                        "mem_at_largest_gib": ok[-1]["mem_gib"] if ok else None}
        d, lo = summary.get(f"default.{job}"), summary.get(f"latents_only.{job}")
        if d and lo and d["time_at_largest_s"] and lo["time_at_largest_s"]:
            d["time_vs_latents_only_at_largest"] = d["time_at_largest_s"] / lo["time_at_largest_s"]
    for name in args.configs:  # K draws against one pass of the same model, per length
        pairs = [(a["n"], b["time_s"] / a["time_s"]) for a in rows for b in rows
                 if a["config"] == b["config"] == name and a["job"] == "inference" and b["job"] == "sampling"
                 and a["n"] == b["n"] and "error" not in a and "error" not in b]
        if pairs:
            summary[f"{name}.sampling"]["time_vs_inference"] = dict(pairs)
    print("\nconfiguration.job          time exponent  memory exponent  at largest N")
    for key, s in summary.items():
        te, me = s["time_exponent"], s["memory_exponent"]
        print(f"  {key:24s} {te if te is None else round(te, 2)!s:>13s}  {me if me is None else round(me, 2)!s:>15s}"
              f"  {s['time_at_largest_s'] or 0:.3f} s, {(s['mem_at_largest_gib'] or 0) * 1024:.0f} MiB")
    result = {"cpu": cpu_model(), "threads": 1, "commit": git_commit(), "rows": rows, "summary": summary}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
