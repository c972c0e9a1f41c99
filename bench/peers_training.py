"""Training in bench/model_vs_peers.py: bf16 against fp32 (same steps, same final validation NLL?), and the
throughput of length-aware token-budget batches against random batches padded to their longest record."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path


def bf16_vs_fp32(steps: int) -> dict:
    """The default model trained ``steps`` steps on synthetic data in each precision; both evaluated in fp32."""
    from datasets.loader.synthetic import synthetic_elements
    from pipelines.run.config import RunConfig, TrainConfig
    from pipelines.run.training import Trainer, train

    elements, channels = synthetic_elements(n_records=600, seed=11)
    out = {}
    for precision in ("fp32", "bf16"):
        config = RunConfig(train=TrainConfig(steps=steps, warmup_steps=50, batch_tokens=4096, log_every=50,
                                             eval_every=10**9, checkpoint_every=10**9, precision=precision))
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            train(config, elements, channels, d)
            seconds = time.perf_counter() - t
            config.train.precision = "fp32"  # evaluate both runs the same way
            trainer = Trainer(config, elements, channels, d, resume=True)
            metrics = trainer.evaluate(max_batches=10**6)["overall"]
            lines = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
            final_train = statistics.mean(r["loss"] for r in lines if r["split"] == "train"
                                          and r["step"] > steps - 100)
        out[precision] = {"val_nll": metrics["nll"], "val_mse": metrics["mse"],
                          "train_loss_last100": final_train, "seconds": seconds}
        print(f"  {precision}: val NLL {metrics['nll']:.4f}  val MSE {metrics['mse']:.4f}  "
              f"train loss (last 100) {final_train:.4f}  {seconds:.0f} s", flush=True)
    # "reach the fp32 loss within 2 %": bf16 may not be worse by more than 2 % (lower is fine)
    out["val_nll_rel_diff"] = (out["bf16"]["val_nll"] - out["fp32"]["val_nll"]) / abs(out["fp32"]["val_nll"])
    return out


def padded_forward(model, batch):
    """Naive pad-to-max: every record's inputs and queries padded to the batch's longest, all computed.

    Same modules and maths as ``Percival.forward`` with a latents-only decoder; the element encodings, K/V
    projections, attention (with a key mask) and decoder queries all run over the padded (B, max_len) layout,
    as a dense implementation (like the peers, which take (B, N, C) inputs plus a mask) would.
    """
    import numpy as np
    import torch

    from perceiver.attention import Group, VarlenPlan
    from perceiver.model import ModelOutput
    from perceiver.packing import subset_offsets

    b = batch.n_records
    sizes = model.config.sizes

    def dense(mask):
        off = subset_offsets(batch.offsets, mask)
        rows = torch.nonzero(mask).squeeze(1)
        lengths = off[1:] - off[:-1]
        n = int(lengths.max())
        pos = torch.arange(n)
        real = pos[None, :] < lengths[:, None]
        gather = rows[torch.where(real, off[:-1, None] + pos[None, :], 0).reshape(-1)]
        plan = VarlenPlan(b, b * n, [Group(torch.arange(b), n, None, real, 0, np.arange(b))], None,
                          torch.arange(b), torch.zeros(b, dtype=torch.bool))
        return gather, real, plan, off

    gv, _, plan_v, _ = dense(batch.visible)
    tokens = model.encoding(batch.time[gv], batch.channel[gv], batch.coord[gv], batch.value[gv],
                            batch.error[gv])
    x = model.encoder.latents_to_elements(model.latents, tokens, plan_v)
    for i in range(sizes.n_layers):
        x = model.blocks[0 if sizes.share_weights else i](x)
    gt, real_t, plan_t, toff = dense(batch.target)
    plan_t.groups[0].mask = None  # padded queries are computed and dropped
    q = model.query_proj(model.encoding(batch.time[gt], batch.channel[gt], batch.coord[gt]))
    h = model.decoder.queries_to_latents(q, x, plan_t)[real_t.reshape(-1)]
    return ModelOutput(model.head(h), x, toff)


def throughput(steps: int, passes: int = 3) -> dict:
    """Training elements per second on heavy-tailed record lengths: length-aware token-budget batches against
    random batches of the same mean size padded to their longest record (:func:`padded_forward`)."""
    import numpy as np
    import torch

    from datasets.loader import token_batches
    from datasets.loader.synthetic import lognormal_lengths, synthetic_elements
    from perceiver.config import ModelConfig
    from pipelines.run.config import RunConfig, TrainConfig
    from pipelines.run.devices import autocast
    from pipelines.run.training import Trainer

    lengths = lognormal_lengths(1500, np.random.default_rng(5), median=150, sigma=1.1, low=10, high=5000)
    elements, channels = synthetic_elements(seed=5, lengths=lengths)
    tc = TrainConfig(steps=10**6, batch_tokens=16384, max_records=256, record_cost=32,
                     max_record_elements=8192, log_every=10**9, eval_every=10**9, checkpoint_every=10**9)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        # latents-only decoder: padded_forward above re-implements that path for the pad-to-max arm
        model = ModelConfig.preset("small", decoder_local_heads=0, decoder_neighbours=False,
                                   decoder_snapshot=False)
        trainer = Trainer(RunConfig(model=model, train=tc), elements, channels, d, resume=False)
        ds = trainer.train_ds
        budget = token_batches(ds.lengths, tc.batch_tokens, tc.max_records, seed=0, epoch=0,
                               record_cost=tc.record_cost, max_elements=tc.max_record_elements)
        mean_records = int(round(np.mean([len(b) for b in budget])))
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(ds))
        naive = [perm[i:i + mean_records] for i in range(0, len(perm) - mean_records + 1, mean_records)]
        with torch.no_grad():  # the naive baseline computes the same function
            check = ds.collate(naive[0], trainer.config.masking, np.random.default_rng(0),
                               tc.max_record_elements)
            a, b = trainer.model(check), padded_forward(trainer.model, check)
            assert torch.allclose(a.mean, b.mean, atol=1e-4)
            assert torch.allclose(a.latents, b.latents, atol=1e-4)
        arms = {"length-aware": budget, "pad-to-max": naive}
        # Each arm trains on `steps` fixed batches, `passes` times, the arms alternating step by step; a
        # batch's time is its fastest pass (the machine is shared: load hits both arms, the minimum is the
        # least disturbed estimate). Masks are fixed per batch, so every pass does the same work.
        best = {k: [float("inf")] * steps for k in arms}
        sizes = {k: [0] * steps for k in arms}
        padded_sizes = {k: [0] * steps for k in arms}
        for p in range(passes + 1):  # pass 0 warms up
            for i in range(steps):
                for label, batches in arms.items():
                    items = batches[i % len(batches)]
                    batch = ds.collate(items, trainer.config.masking, np.random.default_rng([0, i]),
                                       tc.max_record_elements)
                    t = time.perf_counter()
                    if label == "length-aware":
                        trainer.train_step(batch)
                    else:
                        with autocast(trainer.dist.device, trainer.dtype):
                            output = padded_forward(trainer.model, batch)
                        value = trainer.model.loss(batch, output)
                        trainer.optimizer.zero_grad(set_to_none=True)
                        value.backward()
                        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), tc.grad_clip)
                        trainer.optimizer.step()
                    if p > 0:
                        best[label][i] = min(best[label][i], time.perf_counter() - t)
                    sizes[label][i] = batch.n_elements
                    padded_sizes[label][i] = len(items) * int(batch.lengths.max())
        seen = {k: [sum(sizes[k]), sum(best[k]), sum(padded_sizes[k])] for k in arms}
        for label, batches in arms.items():
            n, seconds, padded = seen[label]
            results[label] = {"elements_per_s": n / seconds, "padding_factor": padded / n,
                              "records_per_batch": float(np.mean([len(b) for b in batches[:steps]]))}
            print(f"  {label:12s}: {results[label]['elements_per_s']:9.0f} elements/s  "
                  f"({results[label]['records_per_batch']:.0f} records/batch, padded/real "
                  f"{results[label]['padding_factor']:.2f})", flush=True)
    results["ratio"] = results["length-aware"]["elements_per_s"] / results["pad-to-max"]["elements_per_s"]
    results["lengths"] = {"median": float(np.median(lengths)), "p99": float(np.percentile(lengths, 99)),
                          "min": int(lengths.min()), "max": int(lengths.max())}
    return results
