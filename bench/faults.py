"""Reliability campaign: kill -9, bad input, untrusted files, I/O faults, retries and concurrent load.

    OMP_NUM_THREADS=1 .venv/bin/python bench/faults.py [--moments 20] [--seed 0] [--out faults.json]

Everything runs on the bundled samples (no ../shared/data needed), with real Zarr stores on disk, real
subprocesses killed with SIGKILL, a real Prefect API server, a real size-limited tmpfs (where this machine
lets root mount one) and an fsspec filesystem that fails writes. Prints a Markdown table (what was tried,
how many times, how many held) and writes the rows as JSON. The steps are :mod:`pipelines.faults` (which
``tests/test_faults.py`` runs with fewer moments) plus, here, concurrent flows against one Prefect API and a
second writer waiting for a store's lock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):  # tests/corpus.py builds the bad-input corpus
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipelines import faults  # noqa: E402
from pipelines.faults import PHYSIONET, SAMPLES, Row  # noqa: E402

# -- concurrent load --------------------------------------------------------------------------------------
LOAD_SCRIPT = """
import json, sys
if __name__ == "__main__":
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    if kind == "ingest":
        from pipelines.ingest import ingest_flow
        out = ingest_flow(**args)
    else:
        from pipelines.reconstruct import reconstruct_flow
        out = reconstruct_flow(**args)
    print(json.dumps(out, default=str))
"""


def load_jobs(work: Path, store: str, checkpoint: str, tag: str) -> list[tuple[str, dict]]:
    """Five ingest runs (four sources; PhysioNet twice into one store) and two reconstruct runs into one output
    (same shard size: other shard sizes batch records differently, which changes float rounding)."""
    def s(name: str) -> str:
        return str(work / f"load-{tag}-{name}.zarr")

    jobs = [("ingest", {"source": src, "path": str(SAMPLES / src), "store": s(src), "workers": 1})
            for src in ("plasticc", "macho", "ztf_bts", "physionet2019")]
    jobs.append(("ingest", {"source": "physionet2019", "path": PHYSIONET, "store": s("physionet2019"),
                            "workers": 1}))
    jobs += [("reconstruct", {"store": store, "checkpoint": checkpoint, "out": s("rec"), "records_per_shard": rps,
                              "grid_times": 3}) for rps in (50, 50)]
    return jobs


def load(work: Path, store: str, checkpoint: str, api_url: str | None) -> Row:
    """The jobs all at once (processes against one Prefect API) vs one after another: same stores."""
    from datasets.store import open_store
    from datasets.store.reconstruction import open_reconstruction

    row = Row("concurrent flows against one Prefect API: 5 ingest + 2 reconstruct at once vs sequential")
    env = faults.subprocess_env() | ({"PREFECT_API_URL": api_url} if api_url else {})

    def start(kind: str, args: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, kind, json.dumps(args)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def hashes(tag: str) -> dict:
        out = {}
        for kind, args in load_jobs(work, store, checkpoint, tag):
            key = args.get("store") if kind == "ingest" else args["out"]
            name = Path(key).name.removeprefix(f"load-{tag}-")
            out[name] = open_store(key).content_hash() if kind == "ingest" else open_reconstruction(key)["content_hash"]
        return out

    t0 = time.perf_counter()
    for kind, args in load_jobs(work, store, checkpoint, "seq"):
        p = start(kind, args)
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(err[-3000:])
    seq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [start(kind, args) for kind, args in load_jobs(work, store, checkpoint, "par")]
    results = [p.communicate() for p in procs]
    par_s = time.perf_counter() - t0
    codes = [p.returncode for p in procs]
    lock_errors = sum("being written by another process" in err for _, err in results)
    same = hashes("seq") == hashes("par")
    row.check(all(c == 0 for c in codes) and same and lock_errors == 0,
              f"codes={codes} same={same} lock errors={lock_errors}")
    row.note = (f"7 runs; all completed: {all(c == 0 for c in codes)}; lock errors: {lock_errors}; "
                f"sequential {seq_s:.0f} s, concurrent {par_s:.0f} s")
    return row


def lock_wait(work: Path) -> Row:
    """A second writer waits for the first (another process) and then continues from its commit."""
    from datasets.ingest import ingest
    from datasets.store import open_store

    row = Row("second writer on a locked store waits (not fails), then skips what the first stored")
    path = str(work / "lockwait.zarr")
    holder = subprocess.Popen([sys.executable, "-c", faults.INGEST_SCRIPT + "\nimport time; time.sleep(0)\n",
                               PHYSIONET, path], env=faults.subprocess_env(), stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    time.sleep(0.3)
    report = ingest("physionet2019", PHYSIONET, path, shard_size=10)
    holder.wait()
    holder.stdout.close()
    s = open_store(path)
    row.check(holder.returncode == 0 and s.n_records == 300 and s.records["record_id"].is_unique
              and report.records_stored + report.units_skipped >= 0 and s.quarantine.empty,
              f"holder rc={holder.returncode} records={s.n_records}")
    return row


# -- main -----------------------------------------------------------------------------------------------
def tiny_checkpoint(work: Path, store: str) -> str:
    import torch

    from datasets.store import open_store
    from pipelines.run.training import train

    torch.set_num_threads(1)
    s = open_store(store)
    return str(train(faults.train_config(12), s.read(), s.channels, work / "tiny-checkpoint"))


def table(rows: list[Row]) -> str:
    lines = ["| what was tried | tried | held | note |", "|---|---:|---:|---|"]
    lines += [f"| {r.what} | {r.tried} | {r.held} | {r.note} |" for r in rows]
    return "\n".join(lines)


def object_store(work: Path, moments: int, seed: int) -> list[Row]:
    """kill -9 during ingests into a bucket of an S3-compatible server (moto, server mode, started here), and two
    concurrent ingests into one bucket store: the Icechunk rows of the table."""
    from object_store import running_server

    with running_server() as s3:
        (work / "s3").mkdir(exist_ok=True)
        rows = faults.kill_ingest(work / "s3", moments, seed, store_root=f"s3://{s3.new_bucket()}/kills")
        return [*rows, faults.concurrent_writers(work / "s3", f"s3://{s3.new_bucket()}/race", trials=3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moments", type=int, default=20, help="kill -9 moments per phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps (e.g. 'load' 'retries')")
    args = ap.parse_args()
    import torch
    from corpus import build_corpus, stay, stay_row

    torch.set_num_threads(1)
    from pipelines import prefect_env

    prefect_env.configure()
    work = Path(tempfile.mkdtemp(prefix="percival-faults-"))
    server = None
    if not os.environ.get("PREFECT_API_URL"):  # one API for this process, its subprocesses and the load test
        server = prefect_env._TemporaryServer()
        server.wait(120)
        os.environ["PREFECT_API_URL"] = server.api_url
    t0 = time.perf_counter()
    rows: list[Row] = []
    try:
        from datasets.ingest import ingest

        store = str(work / "physionet.zarr")
        ingest("physionet2019", PHYSIONET, store)
        ckpt = tiny_checkpoint(work, store)
        steps = [("kill ingest", lambda: faults.kill_ingest(work, args.moments, args.seed)),
                 ("kill reconstruct", lambda: [faults.kill_reconstruct(work, store, ckpt, args.moments, args.seed)]),
                 ("kill train", lambda: [faults.kill_train(work, store, args.moments, args.seed)]),
                 ("bad input", lambda: faults.bad_input(work, build_corpus(work / "corpus"))),
                 ("vanishing file", lambda: [faults.vanishing_file(work, stay([stay_row(1), stay_row(2)]))]),
                 ("full disk", lambda: [faults.full_disk(work)]),
                 ("write errors", lambda: [faults.write_errors(work, args.moments, args.seed)]),
                 ("untrusted", lambda: [faults.untrusted_files(work, ckpt)]),
                 ("retries", lambda: faults.retries(work, store, ckpt)),
                 ("lock wait", lambda: [lock_wait(work)]),
                 ("object store", lambda: object_store(work, args.moments, args.seed)),
                 ("load", lambda: [load(work, store, ckpt, os.environ.get("PREFECT_API_URL"))])]
        for name, fn in steps:
            if args.only and name not in args.only:
                continue
            t = time.perf_counter()
            got = fn()
            rows += got
            print(f"{name}: {[(r.tried, r.held) for r in got]} in {time.perf_counter() - t:.0f} s", flush=True)
            for r in got:
                for f in r.failures[:5]:
                    print("   FAILED:", f, flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0 if all(r.held == r.tried for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
