"""FLOP/s of a Percival training step at the peer shape, as a fraction of a large matmul's in the same dtype."""

from __future__ import annotations

import contextlib
import time

from peers_models import SIZES, percival_case
from peers_timing import spawn_case


def matmul_rate(dtype_name: str) -> float:
    """FLOP/s of a 4096^3 matmul ("fp32" or "bf16"), the fastest of 6 after 2 warm-ups."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 4096
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / min(ts)


def step_flops(n: int, mode: str) -> float:
    """FLOPs of one Percival fwd+bwd: matmuls from FlopCounterMode, attention from the SDPA shapes
    (4*B*H*Lq*Lk*d forward, twice that backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import perceiver.attention as attention

    model, step = percival_case(n)
    attn = [0.0]
    original = attention.sdpa

    def counting(q, k, v, attn_mask=None):
        b, h, lq, d = q.shape
        attn[0] += 3 * 4 * b * h * lq * k.shape[-2] * d  # forward + backward (2x)
        return original(q, k, v, attn_mask)

    attention.sdpa = counting
    try:
        counter = FlopCounterMode(display=False)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "best" else contextlib.nullcontext()
        with counter:
            step(autocast)
    finally:
        attention.sdpa = original
    counts = counter.get_flop_counts().get("Global", {})
    matmul = sum(v for k, v in counts.items() if "attention" not in str(k))
    return float(matmul + attn[0])


def flops(table: dict, repeats: int) -> dict:
    """Per mode and size: GFLOP of a step, GFLOP/s at the step's time (from the peers ``table``, or measured
    now where it is empty) and the fraction of a matmul's rate in the same dtype."""
    rates = {m: matmul_rate(m) for m in ("fp32", "bf16")}
    result = {"matmul_gflops": {m: r / 1e9 for m, r in rates.items()}}
    for mode, dtype in (("fp32", "fp32"), ("best", "bf16")):
        for n in SIZES:
            count = step_flops(n, mode)
            secs = (table[("percival", mode, n)]["time_min_s"] if table else
                    spawn_case("percival", mode, n, 2, repeats)["time_min_s"])
            frac = count / secs / rates[dtype]
            result[f"{mode}_{n}"] = {"gflop": count / 1e9, "gflops": count / secs / 1e9, "fraction_of_matmul": frac}
            print(f"  {mode} {n}: {count / 1e9:.1f} GFLOP in {secs * 1e3:.0f} ms = "
                  f"{count / secs / 1e9:.0f} GFLOP/s = {frac:.0%} of a {dtype} matmul "
                  f"({rates[dtype] / 1e9:.0f} GFLOP/s)", flush=True)
    return result
