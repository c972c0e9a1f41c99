"""Scale: ingest and training cost against archive size (PLAsTiCC test layout, 2x10^6 .. 10^8 rows).

    .venv/bin/python bench/scale.py                                   # --rows 2e6 2e7 1e8 (hours, ~5 GB disk at 1e8)
    .venv/bin/python bench/scale.py --rows 2e5 4e5 --ddp-rows 4e5     # a few minutes: the harness end to end

For each size (light-curve rows): a seeded archive from :mod:`bench.plasticc_archive` (11 batch files, reused
from ``--work`` when one finished there), then, each in its own subprocess:

- ``ingest``: ``percival ingest plasticc ARCHIVE --store STORE --no-prefect --workers 1`` into a fresh store
  (one process, so its peak RSS is the ingest's; wall time includes interpreter start-up);
- ``train``: ``percival train STORE --steps 30 --preset small --no-prefect`` on one thread, evaluation and
  checkpoints only at the end (``--skip-train``: none);
- ``train_ddp`` (the ``--ddp-rows`` size only, default 2e7): the same with ``--nproc 2`` (torchrun, gloo).

Memory: every step runs under a small wrapper process that reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss``
at exit: the exact peak RSS of the largest process below it (MiB), with nothing measured before it mixed in.
The torchrun ranks are grandchildren, so their peaks are polled: ``VmHWM`` of ``/proc/PID/status`` (a process's
own peak RSS, monotone) every 0.1 s for every process of the tree, ranks told apart by their ``RANK``; growth in
a rank's last 0.1 s is missed, and the wrapper's exact maximum bounds the largest rank from above. The tree's
peak total RSS (sum of ``VmRSS`` over its processes, polled) is reported too.

Prints a Markdown table; writes JSON (CPU model, commit, command, per size the numbers, ratios of each size to
the smallest) to ``--results`` (default ``bench/results/scale-<date>.json``). Skips with a message where a
package it needs is absent. Units: seconds, rows/s, MiB (2^20 bytes).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model, git_commit  # noqa: E402

MIB = 2**20
#: the ingest memory target of issue 15 at 10^8 rows
INGEST_RSS_TARGET_MIB = 4096
TRAIN_STEPS = 30
POLL_S = 0.1
#: runs a command, then writes its exit code and the peak RSS (KiB, Linux) of its largest descendant
WRAPPER = ("import json, resource, subprocess, sys\n"
           "rc = subprocess.call(sys.argv[2:])\n"
           "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
           "json.dump({'rc': rc, 'maxrss_kib': peak}, open(sys.argv[1], 'w'))\n"
           "sys.exit(rc)\n")


def _status_kib(pid: int) -> dict[str, int]:
    """``VmHWM`` and ``VmRSS`` (KiB) of a live process; empty once it has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in lines) if k in ("VmHWM", "VmRSS")}


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under the wrapper; wall time (s), exact peak RSS of its largest process (MiB), polled peak
    RSS of each process in its tree (MiB; torchrun ranks keyed ``rank0``, ``rank1`` ...) and of the tree."""
    import psutil

    report = log.with_suffix(".rss.json")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, str(report), *cmd], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
        peaks: dict[int, int] = {}  # pid -> VmHWM KiB
        names: dict[int, str] = {}
        tree_peak = 0
        while wrapper.poll() is None:
            try:
                procs = psutil.Process(wrapper.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            tree = 0
            for p in procs:
                kib = _status_kib(p.pid)
                if not kib:
                    continue
                tree += kib.get("VmRSS", 0)
                peaks[p.pid] = max(peaks.get(p.pid, 0), kib.get("VmHWM", 0))
                if not names.get(p.pid, "").startswith("rank"):  # a worker is torchrun's fork until it execs
                    names[p.pid] = _process_name(p)
            tree_peak = max(tree_peak, tree)
            time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    done = json.loads(report.read_text()) if report.exists() else {"rc": wrapper.returncode, "maxrss_kib": 0}
    polled: dict[str, float] = {}
    for pid, kib in peaks.items():
        name = names.get(pid, "other")
        key = name if name.startswith("rank") else f"{name}-{pid}"
        polled[key] = round(kib / 1024, 1)
    return {"rc": done["rc"], "seconds": round(wall, 2), "peak_rss_mib": round(done["maxrss_kib"] / 1024, 1),
            "polled_peak_rss_mib": polled, "tree_peak_rss_mib": round(tree_peak / 1024, 1), "log": str(log)}


def _process_name(p) -> str:
    """``rankN`` for a torchrun worker (its ``RANK``), ``torchrun`` for the agent, else ``process``."""
    try:
        cmdline = " ".join(p.cmdline())
        if "torch.distributed.run" in cmdline:
            return "torchrun"
        if "pipelines.run.training" in cmdline:
            return f"rank{p.environ().get('RANK', '?')}"
    except Exception:  # the process went away while being looked at
        pass
    return "process"


def archive(work: Path, rows: int, seed: int) -> tuple[Path, dict]:
    """A seeded test-layout archive of ``rows`` rows under ``work`` (reused when a finished one is there)."""
    from bench.plasticc_archive import write_archive

    path = work / f"archive-{rows}-seed{seed}"
    marker = path / "written.json"
    if marker.exists():
        return path, {**json.loads(marker.read_text()), "reused": True}
    shutil.rmtree(path, ignore_errors=True)
    info = write_archive(path, rows, seed=seed)
    marker.write_text(json.dumps(info))
    return path, {**info, "reused": False}


def du_mib(path: Path) -> float:
    """Bytes under ``path`` in MiB."""
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB, 1)


def percival(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def train_cmd(store: Path, out: Path, nproc: int) -> list[str]:
    """``percival train`` for :data:`TRAIN_STEPS` steps of the ``small`` preset, one thread per process,
    validation and checkpoint at the last step only, without Prefect."""
    return percival("train", str(store), "--out", str(out), "--steps", str(TRAIN_STEPS), "--preset", "small",
                    "--nproc", str(nproc), "--no-resume", "--no-prefect", "--device", "cpu",
                    "--set", "train.threads=1", "--set", "train.eval_every=1000", "--set",
                    "train.checkpoint_every=1000", "--set", "train.eval_batches=2")


def elements_per_s(out: Path) -> float | None:
    """Training throughput of the last logged window (elements/s, all ranks), from ``metrics.jsonl``."""
    path = out / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    train = [r for r in rows if r.get("split") == "train"]
    return round(train[-1]["elements_per_s"]) if train else None


def ingest_report(log: Path) -> dict:
    """The ingest's own numbers from its report in ``log``: ``work_seconds`` (s, no interpreter start-up),
    ``elements_stored`` and ``work_rows_per_s`` (rows/s); None where the report is not found."""
    text = log.read_text() if log.exists() else ""
    seconds = re.search(r"\*\*(?:True|False)\*\*\. ([0-9.,]+) s", text)
    stored = re.search(r"\| elements stored \| ([0-9,]+) \|", text)
    return {"work_seconds": float(seconds.group(1).replace(",", "")) if seconds else None,
            "elements_stored": int(stored.group(1).replace(",", "")) if stored else None}


def run_size(work: Path, rows: int, seed: int, train: bool, ddp: bool) -> dict:
    """Archive, ingest, train (and the 2-process run) for one size; every step's numbers."""
    result: dict = {"rows": rows}
    path, info = archive(work, rows, seed)
    result["archive"] = {**info, "mib": du_mib(path)}
    store = work / f"store-{rows}-seed{seed}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    print(f"[{rows:.0e} rows] ingest ...", flush=True)
    ing = measure(percival("ingest", "plasticc", str(path), "--store", str(store), "--no-prefect",
                           "--workers", "1"), work / f"ingest-{rows}.log")
    ing["rows_per_s"] = round(rows / ing["seconds"])
    ing.update(ingest_report(Path(ing["log"])))
    ing["store_mib"] = du_mib(store) if store.exists() else None
    ing["work_rows_per_s"] = round(rows / ing["work_seconds"]) if ing["work_seconds"] else None
    ing["within_target"] = ing["peak_rss_mib"] <= INGEST_RSS_TARGET_MIB
    result["ingest"] = ing
    if ing["rc"] != 0:
        print(f"  ingest failed (exit {ing['rc']}); see {ing['log']}")
        return result
    for name, nproc, wanted in (("train", 1, train), ("train_ddp", 2, train and ddp)):
        if not wanted:
            continue
        out = work / f"{name}-{rows}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[{rows:.0e} rows] {name} ({nproc} process{'es' if nproc > 1 else ''}) ...", flush=True)
        step = measure(train_cmd(store, out, nproc), work / f"{name}-{rows}.log")
        step["elements_per_s"] = elements_per_s(out)
        if nproc > 1:
            step["rank_peak_rss_mib"] = {k: v for k, v in sorted(step["polled_peak_rss_mib"].items())
                                         if k.startswith("rank")}
        result[name] = step
        if step["rc"] != 0:
            print(f"  {name} failed (exit {step['rc']}); see {step['log']}")
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(sizes: dict[int, dict]) -> dict:
    """Each size against the smallest: ingest peak RSS, ingest rows/s, train peak RSS; and per-rank peak RSS
    of the 2-process run against the 1-process run of the same size."""
    base_rows = min(sizes)
    base = sizes[base_rows]
    out: dict = {}
    for rows, r in sorted(sizes.items()):
        if rows != base_rows:
            key = f"{rows:.0e} vs {base_rows:.0e}"
            out[key] = {"rows": round(rows / base_rows, 2),
                        "ingest_peak_rss": _ratio(r["ingest"]["peak_rss_mib"], base["ingest"]["peak_rss_mib"]),
                        "ingest_rows_per_s": _ratio(r["ingest"]["rows_per_s"], base["ingest"]["rows_per_s"]),
                        "ingest_work_rows_per_s": _ratio(r["ingest"]["work_rows_per_s"],
                                                         base["ingest"]["work_rows_per_s"]),
                        "train_peak_rss": _ratio(r.get("train", {}).get("peak_rss_mib"),
                                                 base.get("train", {}).get("peak_rss_mib"))}
        if "train_ddp" in r and "train" in r:
            ranks = r["train_ddp"]["rank_peak_rss_mib"].values()
            out[f"{rows:.0e} 2-process rank vs 1-process"] = {
                "max_rank_peak_rss": _ratio(max(ranks, default=None), r["train"]["peak_rss_mib"])}
    return out


def table(sizes: dict[int, dict]) -> str:
    """The Markdown table of the run."""
    head = ("| rows | archive MiB | ingest s | ingest rows/s (own work) | ingest peak RSS MiB | store MiB "
            "| train 30 steps s | train peak RSS MiB | train elements/s | 2-proc s | 2-proc rank peak RSS MiB |")
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for rows, r in sorted(sizes.items()):
        i, t, d = r["ingest"], r.get("train", {}), r.get("train_ddp", {})
        ranks = " / ".join(f"{v:,.0f}" for v in d.get("rank_peak_rss_mib", {}).values()) or "-"
        cells = [f"{rows:,}", f"{r['archive']['mib']:,.0f}", f"{i['seconds']:.1f}",
                 f"{i['rows_per_s']:,} ({i['work_rows_per_s'] or 0:,})",
                 f"{i['peak_rss_mib']:,.0f}", f"{i['store_mib'] or 0:,.1f}",
                 f"{t['seconds']:.1f}" if t else "-", f"{t['peak_rss_mib']:,.0f}" if t else "-",
                 f"{t['elements_per_s'] or 0:,}" if t else "-", f"{d['seconds']:.1f}" if d else "-", ranks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing() -> list[str]:
    """Packages or facilities this benchmark needs that are absent here."""
    absent = [m for m in ("pyarrow", "psutil", "zarr", "torch", "prefect") if importlib.util.find_spec(m) is None]
    return absent + ([] if Path("/proc/self/status").exists() else ["/proc (Linux)"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=["2e6", "2e7", "1e8"], help="archive sizes in rows (2e6 2e7 1e8)")
    ap.add_argument("--work", default=None, help="directory for archives, stores and logs (default: a temp dir, "
                                                 "removed at the end); archives found there are reused")
    ap.add_argument("--results", default=None, help="JSON output (default bench/results/scale-<date>.json)")
    ap.add_argument("--skip-train", action="store_true", help="ingest only")
    ap.add_argument("--ddp-rows", default="2e7", help="the size that also trains with 2 processes (default 2e7)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if absent := missing():
        print(f"SKIP: bench/scale.py needs {', '.join(absent)}")
        return 0
    sizes_wanted = sorted({int(float(r)) for r in args.rows})
    ddp_rows = int(float(args.ddp_rows))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="percival-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    results_path = Path(args.results or ROOT / "bench" / "results" / f"scale-{date}.json")
    sizes: dict[int, dict] = {}
    try:
        for rows in sizes_wanted:
            sizes[rows] = run_size(work, rows, args.seed, not args.skip_train, rows == ddp_rows)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "scale", "date": date, "cpu": cpu_model(), "cores": os.cpu_count(), "commit": git_commit(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "seed": args.seed,
           "train_steps": TRAIN_STEPS, "ingest_rss_target_mib": INGEST_RSS_TARGET_MIB,
           "units": {"seconds": "s wall, interpreter start-up included", "rows_per_s": "archive rows / ingest s",
                     "rss": "MiB", "elements_per_s": "training elements/s of the last logged window"},
           "sizes": {str(k): v for k, v in sizes.items()}, "ratios": ratios(sizes) if sizes else {}}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nCPU: {doc['cpu']} ({doc['cores']} cores), commit {doc['commit']}\n")
    print(table(sizes))
    print("\nratios: " + json.dumps(doc["ratios"], indent=1))
    print(f"\nwrote {results_path}")
    return 0 if all(s["ingest"]["rc"] == 0 and all(s.get(k, {"rc": 0})["rc"] == 0 for k in ("train", "train_ddp"))
                    for s in sizes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
