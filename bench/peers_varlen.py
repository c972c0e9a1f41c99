"""Variable-length attention in bench/model_vs_peers.py: the encoder cross-attention over 16 heavy-tailed
records with each strategy of :func:`perceiver.attention.plan_varlen`, and nested jagged tensors for reference."""

from __future__ import annotations

import time


def varlen_attention() -> dict:
    """Milliseconds (fastest of 5) of one forward + backward per strategy, and its number of SDPA calls."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from perceiver.attention import attend_packed_keys, plan_varlen

    rng = np.random.default_rng(0)
    lengths = np.sort(np.clip(np.rint(120 * np.exp(1.0 * rng.standard_normal(16))), 10, 901)).astype(int)
    lengths[-1] = 901
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    h, d, nq = 8, 32, 256
    q = torch.randn(h, nq, d, requires_grad=True)
    kv = torch.randn(int(offsets[-1]), 2, h, d, requires_grad=True)

    def timed(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e3

    out = {"real_keys": int(lengths.sum()), "padded_keys": int(len(lengths) * lengths.max())}
    for mode in ("padded", "loop", "auto"):
        plan = plan_varlen(offsets, mode)
        out[mode + "_ms"] = timed(lambda plan=plan: attend_packed_keys(q, kv, plan).sum().backward())
        out[mode + "_calls"] = len(plan.groups)

    def nested():
        k = torch.nested.nested_tensor_from_jagged(kv[:, 0], offsets).transpose(1, 2)
        v = torch.nested.nested_tensor_from_jagged(kv[:, 1], offsets).transpose(1, 2)
        qq = torch.nested.nested_tensor_from_jagged(q.transpose(0, 1).repeat(len(lengths), 1, 1),
                                                    torch.arange(len(lengths) + 1) * nq).transpose(1, 2)
        o = F.scaled_dot_product_attention(qq, k, v)
        o.values().sum().backward()

    try:
        out["nested_jagged_ms"] = timed(nested, reps=1)
    except Exception as exc:  # nested SDPA support varies by build
        out["nested_jagged_ms"] = None
        out["nested_error"] = str(exc)[:200]
    return out
