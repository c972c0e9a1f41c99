"""Percival's encoder-decoder against Hugging Face ``PerceiverModel`` and lucidrains ``perceiver-pytorch``.

    python bench/model_vs_peers.py            # everything (~10 min on 2 cores); last line is JSON
    python bench/model_vs_peers.py --quick    # one round, fewer repeats

Needs the ``bench`` extra (``pip install transformers perceiver-pytorch``). Sections:

1. **Peers** (``peers_models.py``, ``peers_timing.py``) -- forward+backward time and peak memory at one shared
   shape: batch 8, 2048 and 8192 input elements of 64 channels, 256 latents x 256, 8 self-attention heads, 1
   cross-attention, 6 latent self-attention layers, 512 output queries. Each (model, mode, size) runs in its
   own process; modes are fp32 and each model's best mode here (bf16 autocast). Time = the fastest of the
   timed steps, taken over ``--rounds`` interleaved rounds (the machine is shared: the minimum is the least
   disturbed estimate); memory = peak RSS growth during the steps over the RSS just before them (the step's
   working memory; the absolute peak RSS is printed too). HF runs with its shipped defaults (attention dropout
   0.1, train mode) and as ``hf-nodrop`` (dropout 0: the fair comparison, since Percival has no dropout).
   Percival runs twice: ``percival`` (the ``bench`` preset: a pure Perceiver IO decoder, as the peers have)
   and ``percival-default`` (the shipped decoder: neighbour and snapshot features and the bounded local
   attention, at the same sizes), whose ratios are reported against ``hf-nodrop``.
2. **FLOP/s** (``peers_flops.py``) -- FLOPs of one Percival training step (matmuls counted by
   ``FlopCounterMode``, attention counted from the SDPA shapes: 4*B*H*Lq*Lk*d forward, twice that backward)
   over its time, as a fraction of a 4096^3 matmul in the same dtype.
3. **bf16 vs fp32 training** (``peers_training.py``) -- the small default model trained for a fixed number
   of steps on synthetic data in each precision; final validation NLL (evaluated in fp32) compared.
4. **Throughput** (``peers_training.py``) -- training elements per second on heavy-tailed record lengths
   (log-normal, tens to thousands) with length-aware token-budget batches and grouped attention, against
   random batches of the same mean size padded to their longest record.
5. **Variable-length attention** (``peers_varlen.py``) -- the encoder cross-attention over 16 heavy-tailed
   records with the three strategies (and nested jagged tensors for reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the sections, beside this script
from peers_flops import flops  # noqa: E402
from peers_models import SIZES  # noqa: E402
from peers_timing import peers, print_table, ratios, run_case  # noqa: E402
from peers_training import bf16_vs_fp32, throughput  # noqa: E402
from peers_varlen import varlen_attention  # noqa: E402

SECTIONS = ("peers", "flops", "bf16", "throughput", "varlen")
MODELS = ["percival", "percival-default", "hf", "hf-nodrop", "lucidrains"]
TARGETS = {"fp32": {"2048": {"time_vs_hf": 0.45, "mem_vs_hf": 0.4},
                     "8192": {"time_vs_hf": 0.35, "mem_vs_hf": 0.25}},
           "best": {"2048": {"time_vs_hf": 0.5}, "8192": {"time_vs_hf": 0.5}},
           # the shipped decoder, against HF with dropout 0 (the fair comparison)
           "fp32_default_decoder": {"2048": {"time_vs_hf_nodrop": 0.60, "mem_vs_hf_nodrop": 0.40},
                                    "8192": {"time_vs_hf_nodrop": 0.45, "mem_vs_hf_nodrop": 0.40}}}


def targets_met(result: dict) -> dict[str, bool]:
    """Each target of the sections that ran: met or not."""
    met = {}
    for mode, sizes in TARGETS.items():
        for n, figs in sizes.items():
            for fig, limit in figs.items():
                if mode in result:
                    met[f"{mode}.{n}.{fig}<={limit}"] = bool(result[mode][n][fig] <= limit)
    if "flops" in result:
        met["flops.best.fraction>=0.30"] = bool(min(result["flops"][f"best_{n}"]["fraction_of_matmul"]
                                                    for n in SIZES) >= 0.30)
    if "bf16_training" in result:
        met["bf16_val_nll_within_2pct"] = bool(result["bf16_training"]["val_nll_rel_diff"] <= 0.02)
    if "throughput" in result:
        met["throughput_ratio>=1.8"] = bool(result["throughput"]["ratio"] >= 1.8)
    return met


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs=3, metavar=("MODEL", "MODE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one round, 3 repeats, short training runs")
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    args = p.parse_args()
    if args.case:
        name, mode, n = args.case
        print(json.dumps(run_case(name, mode, int(n), args.warmup, args.repeats)))
        return
    if args.quick:
        args.rounds, args.repeats, args.train_steps = 1, 3, 200

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 native: {torch.cpu._is_avx512_bf16_supported()}, AMX: {torch.cpu._is_amx_tile_supported()}",
          flush=True)
    result: dict = {}
    table = {}
    if "peers" not in args.skip:
        print("peers (fwd+bwd, batch 8, 64 channels, 256x256 latents, 6 layers, 512 queries):", flush=True)
        table = peers(args.rounds, args.repeats, MODELS)
        print_table(table)
        result.update(ratios(table))
    if "flops" not in args.skip:
        print("\nFLOP/s of a Percival training step vs a 4096^3 matmul:", flush=True)
        result["flops"] = flops(table, args.repeats)
    if "bf16" not in args.skip:
        print(f"\nbf16 vs fp32 training ({args.train_steps} steps, small model, synthetic data):", flush=True)
        result["bf16_training"] = bf16_vs_fp32(args.train_steps)
    if "throughput" not in args.skip:
        print("\ntraining throughput, heavy-tailed lengths:", flush=True)
        result["throughput"] = throughput(steps=12 if args.quick else 24, passes=2 if args.quick else 3)
    if "varlen" not in args.skip:
        print("\nencoder cross-attention over 16 heavy-tailed records "
              "(256 queries, 8x32 heads, fwd+bwd fp32):", flush=True)
        result["varlen"] = varlen_attention()
        print("  " + json.dumps(result["varlen"]), flush=True)

    result["targets_met"] = met = targets_met(result)
    print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in met.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
