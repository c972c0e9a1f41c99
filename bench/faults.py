"""Reliability campaign: kill -9, bad input, untrusted files, I/O faults, retries and concurrent load.

    OMP_NUM_THREADS=1 .venv/bin/python bench/faults.py [--moments 20] [--seed 0] [--out faults.json]

Everything runs on the bundled samples (no ../shared/data needed), with real Zarr stores on disk, real
subprocesses killed with SIGKILL, a real Prefect API server, a real size-limited tmpfs (where this machine
lets root mount one) and an fsspec filesystem that fails writes. Prints a Markdown table (what was tried,
how many times, how many held) and writes the rows as JSON. ``tests/test_faults.py`` runs the same
functions with fewer moments.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

SAMPLES = ROOT / "datasets" / "samples"
PHYSIONET = str(SAMPLES / "physionet2019")


@dataclass
class Row:
    """One line of the table: what was tried, how often, how often everything asserted held."""

    what: str
    tried: int = 0
    held: int = 0
    note: str = ""
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, why: str) -> None:
        self.tried += 1
        self.held += int(ok)
        if not ok:
            self.failures.append(why)


# -- fault injection: an fsspec filesystem whose writes fail -------------------------------------------
class FlakyFileSystem(LocalFileSystem):
    """The local filesystem under ``flaky://``; after ``ok_writes`` successful file writes, the next ``fail``
    writes raise ``OSError(errno_)`` (``fail=-1``: all of them). Settings are class-wide (one test at a time)."""

    protocol = "flaky"
    ok_writes, fail, errno_, writes, failed = 0, 0, errno.EIO, 0, 0
    _guard = threading.Lock()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"auto_mkdir": True, **kwargs})

    @classmethod
    def arm(cls, ok_writes: int, fail: int, errno_: int = errno.EIO) -> None:
        cls.ok_writes, cls.fail, cls.errno_, cls.writes, cls.failed = ok_writes, fail, errno_, 0, 0

    def _open(self, path, mode="rb", **kwargs):
        if any(c in mode for c in "wa"):
            cls = type(self)
            with cls._guard:
                cls.writes += 1
                if cls.writes > cls.ok_writes and (cls.fail < 0 or cls.failed < cls.fail):
                    cls.failed += 1
                    raise OSError(cls.errno_, f"injected {errno.errorcode[cls.errno_]} writing", path)
        return super()._open(path, mode=mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def flaky_url(path: str | Path) -> str:
    return f"flaky://{os.path.abspath(path)}"


# -- helpers -------------------------------------------------------------------------------------------
def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _run_and_kill(script: str, args: list[str], delay: float) -> tuple[bool, int]:
    """Start ``script``; ``delay`` s after it prints ``go`` (imports done, work starting), SIGKILL it.
    Returns (killed before it finished, return code)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if line.strip() == "go":
        time.sleep(delay)
    killed = proc.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # with any temporary Prefect server it started, as a crash would
    proc.wait()
    proc.stdout.close()
    return killed, proc.returncode


def _timed(script: str, args: list[str]) -> float:
    """Seconds from ``go`` to the end of an uninterrupted run of ``script``."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    t0 = time.perf_counter()
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{err[-3000:]}")
    return time.perf_counter() - t0


def _consistent(store, ref_ids: list[str]) -> bool:
    """A committed state: counts agree with the arrays, and the records are a prefix of the reference's."""
    recs = store.records
    return (len(recs) == store.n_records and int(recs["row_size"].sum()) == store.n_elements
            and store.group["value"].shape[0] == store.n_elements and recs["record_id"].is_unique
            and recs["record_id"].tolist() == ref_ids[:store.n_records])


# -- kill -9 during ingest -----------------------------------------------------------------------------
INGEST_SCRIPT = """
import sys
from datasets.ingest import ingest
print("go", flush=True)
ingest("physionet2019", sys.argv[1], sys.argv[2], shard_size=10)
"""


def kill_ingest(work: Path, moments: int, seed: int) -> list[Row]:
    """SIGKILL a plain ingest (30 commits + statistics) at ``moments`` random moments; a reader thread opens
    the store throughout; re-run; compare with an uninterrupted run."""
    from datasets.ingest import ingest
    from datasets.store import StoreError, open_store

    ref = str(work / "ingest-ref.zarr")
    ingest("physionet2019", PHYSIONET, ref, shard_size=10)
    ref_store = open_store(ref)
    ref_ids, ref_hash = ref_store.records["record_id"].tolist(), ref_store.content_hash()
    span = _timed(INGEST_SCRIPT, [PHYSIONET, str(work / "ingest-timed.zarr")])
    rng = np.random.default_rng(seed)
    row = Row("kill -9 during ingest, then re-run", note=f"work phase ≈{span:.1f} s; 30 commits + statistics")
    readers = Row("reader opening the store while an ingest writes (and is killed)")
    for i in range(moments):
        path = str(work / f"ingest-kill-{i}.zarr")
        stop = threading.Event()

        def read_loop(path: str = path, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    s = open_store(path)
                except StoreError:  # before its first commit there is no store yet
                    time.sleep(0.005)
                    continue
                readers.check(_consistent(s, ref_ids), f"{path}: reader saw an inconsistent state")

        t = threading.Thread(target=read_loop, daemon=True)
        t.start()
        killed, _ = _run_and_kill(INGEST_SCRIPT, [PHYSIONET, path], float(rng.uniform(0, span * 1.05)))
        stop.set()
        t.join()
        try:
            partial = open_store(path)
            opens = _consistent(partial, ref_ids)
        except StoreError as e:  # killed before the first commit finished: nothing committed, no store yet
            opens = "no zarr.json" in str(e) or "first commit never finished" in str(e)
        report = ingest("physionet2019", PHYSIONET, path, shard_size=10)
        final = open_store(path)
        ok = (opens and report.reconciles and final.n_records == 300 and final.records["record_id"].is_unique
              and final.content_hash() == ref_hash)
        row.check(ok, f"moment {i} (killed={killed}): opens={opens} hash_equal={final.content_hash() == ref_hash}")
    return [row, readers]


# -- kill -9 during reconstruct ------------------------------------------------------------------------
RECONSTRUCT_SCRIPT = """
import sys
if __name__ == "__main__":
    from pipelines.reconstruct import reconstruct_flow
    print("go", flush=True)
    reconstruct_flow(sys.argv[1], sys.argv[2], sys.argv[3], records_per_shard=20, grid_times=3)
"""


def kill_reconstruct(work: Path, store: str, checkpoint: str, moments: int, seed: int) -> Row:
    """SIGKILL the reconstruct flow (15 shards) at random moments, re-run it, compare with an uninterrupted run."""
    from datasets.store.reconstruction import open_reconstruction
    from pipelines.reconstruct import STAGING_PREFIX, reconstruct_flow

    ref = str(work / "rec-ref.zarr")
    reconstruct_flow(store, checkpoint, ref, records_per_shard=20, grid_times=3)
    ref_hash = open_reconstruction(ref)["content_hash"]
    span = _timed(RECONSTRUCT_SCRIPT, [store, checkpoint, str(work / "rec-timed.zarr")])
    rng = np.random.default_rng(seed + 1)
    row = Row("kill -9 during reconstruct (Prefect flow), then re-run", note=f"work phase ≈{span:.1f} s; 15 shards")
    for i in range(moments):
        out = work / f"rec-kill-{i}"
        out.mkdir()
        path = str(out / "rec.zarr")
        killed, _ = _run_and_kill(RECONSTRUCT_SCRIPT, [store, checkpoint, path], float(rng.uniform(0, span * 1.05)))
        try:
            n = len(open_reconstruction(path)["records"])
            opens = True
        except Exception as e:  # noqa: BLE001 - killed before the first commit: no store yet
            n, opens = 0, "zarr.json" in str(e) or isinstance(e, FileNotFoundError)
        summary = reconstruct_flow(store, checkpoint, path, records_per_shard=20, grid_times=3)
        final = open_reconstruction(path)
        leftovers = [e for e in os.listdir(out) if e.startswith(STAGING_PREFIX)]
        ok = (opens and summary["records"] == 300 - n and final["records"]["record_id"].is_unique
              and final["content_hash"] == ref_hash and not leftovers)
        row.check(ok, f"moment {i} (killed={killed}): opens={opens} n={n} summary={summary} leftovers={leftovers}")
    return row


# -- kill -9 during training ---------------------------------------------------------------------------
TRAIN_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from datasets.store import open_store
from perceiver.config import RunConfig
from perceiver.train import train
config = RunConfig.from_json(sys.argv[3])
s = open_store(sys.argv[1])
elements, channels = s.read(), s.channels
print("go", flush=True)
train(config, elements, channels, sys.argv[2])
"""


def train_config(steps: int = 24):
    from perceiver.config import ModelConfig, RunConfig, TrainConfig

    return RunConfig(model=ModelConfig.preset("tiny"),
                     train=TrainConfig(steps=steps, warmup_steps=2, log_every=1, eval_every=8, eval_batches=1,
                                       checkpoint_every=3, batch_tokens=2048, precision="fp32", threads=1))


def kill_train(work: Path, store: str, moments: int, seed: int) -> Row:
    """SIGKILL training at random moments, resume, compare losses and final weights with an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from datasets.store import open_store
    from perceiver import checkpoint
    from perceiver.train import train

    torch.set_num_threads(1)
    cfg = work / "train-config.json"
    config = train_config()
    config.to_json(cfg)
    s = open_store(store)
    ref = train(config, s.read(), s.channels, work / "train-ref")

    def losses(out: Path) -> dict:
        return {r["step"]: r["loss"] for r in checkpoint.read_metrics(out) if r["split"] == "train"}

    ref_losses, ref_w = losses(ref), load_file(ref / "model.safetensors")
    span = _timed(TRAIN_SCRIPT, [store, str(work / "train-timed"), str(cfg)])
    rng = np.random.default_rng(seed + 2)
    row = Row("kill -9 during training, then resume", note=f"work phase ≈{span:.1f} s; 24 steps, checkpoint every 3")
    for i in range(moments):
        out = work / f"train-kill-{i}"
        killed, _ = _run_and_kill(TRAIN_SCRIPT, [store, str(out), str(cfg)], float(rng.uniform(0, span * 1.05)))
        resumed = train(config, s.read(), s.channels, out, resume=True)
        w = load_file(resumed / "model.safetensors")
        ok = losses(resumed) == ref_losses and w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k])
                                                                               for k in w)
        row.check(ok, f"moment {i} (killed={killed}): losses equal={losses(resumed) == ref_losses}")
    return row


# -- bad input ------------------------------------------------------------------------------------------
def bad_input(work: Path) -> list[Row]:
    """Every corpus kind gives its quarantine row; totals reconcile; the good files' records are unchanged."""
    from corpus import build_corpus

    from datasets.ingest import ingest
    from datasets.store import open_store

    c = build_corpus(work / "corpus")
    kinds = Row("bad-input kinds: each gives its quarantine row", note="")
    totals = Row("ingest runs over the corpus: read = stored + quarantined, good records unchanged")
    read = stored = quarantined = 0
    for src, folder in c.folders.items():
        path = str(work / f"corpus-{src}.zarr")
        report = ingest(src, str(folder), path, options=c.options.get(src))
        s = open_store(path)
        q = s.quarantine
        for case in (x for x in c.cases if x.source == src):
            hit = q["source_file"].str.endswith(case.file) & q["reason"].str.contains(case.reason, regex=False)
            kinds.check(bool(hit.any()), f"{case.kind}: no quarantine row for {case.file} with {case.reason!r}")
        read, stored = read + report.elements_read, stored + report.elements_stored
        quarantined += report.elements_quarantined
        same = True
        if c.good_records[src]:  # the good files alone give the same records, element for element
            alone = work / f"corpus-{src}-good"
            alone.mkdir()
            for f in folder.iterdir():
                if f.name.startswith(("a_good", "ZTFgood", "lc_2.", "b.csv")):
                    shutil.copy(f, alone)
            clean = open_store(str(ingest(src, str(alone), str(alone) + ".zarr", options=c.options.get(src)).store))
            a, b = clean.select(c.good_records[src]), s.select(c.good_records[src])
            same = all(np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True)
                       for k in ("time", "value", "error", "coord", "row_size"))
            same &= list(clean.channels["name"]) == list(s.channels["name"])[:len(clean.channels)]
        totals.check(report.reconciles and s.n_elements == report.elements_stored and same,
                     f"{src}: reconciles={report.reconciles} good records unchanged={same}")
    kinds.note = f"{len(c.cases)} kinds in 6 sources"
    totals.note = f"{read:,} elements read = {stored:,} stored + {quarantined:,} quarantined"
    return [kinds, totals]


def vanishing_file(work: Path) -> Row:
    """A file deleted after discovery, while earlier shards are being committed: quarantined, rest stored."""
    from corpus import stay, stay_row

    from datasets.ingest import ingest
    from datasets.store import open_store

    row = Row("a file that vanishes mid-ingest")
    d = work / "vanish"
    d.mkdir()
    for i in range(4):
        (d / f"p{i}.psv").write_bytes(stay([stay_row(1), stay_row(2)]))

    def progress(index: int, report) -> None:
        if index == 0:
            (d / "p2.psv").unlink()

    report = ingest("physionet2019", str(d), str(work / "vanish.zarr"), shard_size=1, progress=progress)
    s = open_store(str(work / "vanish.zarr"))
    q = s.quarantine
    row.check(report.reconciles and s.n_records == 3 and (q["source_file"] == "p2.psv").any()
              and "FileNotFoundError" in " ".join(q["reason"]), f"records={s.n_records}")
    return row


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A size-limited tmpfs at ``path`` (root only); yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    try:
        yield r.returncode == 0
    finally:
        if r.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def full_disk(work: Path) -> Row:
    """Ingest onto a 192 KiB tmpfs (ENOSPC part-way), then grow it and re-run: equals an uninterrupted ingest."""
    from datasets.ingest import ingest
    from datasets.store import open_store

    row = Row("full disk (size-limited tmpfs) during ingest, then re-run with space")
    ref = str(work / "disk-ref.zarr")
    ingest("physionet2019", PHYSIONET, ref, shard_size=10)
    mnt = work / "smalldisk"
    with tmpfs(mnt, "192k") as mounted:
        if not mounted:
            row.note = "skipped: cannot mount a tmpfs here"
            return row
        path = str(mnt / "pn.zarr")
        try:
            ingest("physionet2019", PHYSIONET, path, shard_size=10)
            failed, msg = False, ""
        except OSError as e:
            failed, msg = True, str(e)
        partial = open_store(path)
        opens = _consistent(partial, open_store(ref).records["record_id"].tolist())
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        ingest("physionet2019", PHYSIONET, path, shard_size=10)
        same = open_store(path).content_hash() == open_store(ref).content_hash()
        ok = failed and "No space left" in msg and opens and same
        row.check(ok, f"failed={failed} msg={msg[:80]} opens={opens}")
        row.note = f"failed after {partial.n_records} of 300 records committed: {msg[:60]}"
    return row


def write_errors(work: Path, moments: int, seed: int) -> Row:
    """EIO injected at a random file write of a plain ingest (fsspec wrapper): a clear OSError, the store at its
    last commit; the re-run equals an uninterrupted ingest."""
    from datasets.ingest import ingest
    from datasets.store import open_store

    if not (work / "ingest-ref.zarr").exists():
        ingest("physionet2019", PHYSIONET, str(work / "ingest-ref.zarr"), shard_size=10)
    ref = open_store(str(work / "ingest-ref.zarr"))
    ref_ids, ref_hash = ref.records["record_id"].tolist(), ref.content_hash()
    row = Row("write error (EIO) injected at a random storage write during ingest, then re-run")
    rng = np.random.default_rng(seed + 3)
    for i in range(moments):
        path = work / f"eio-{i}.zarr"
        FlakyFileSystem.arm(ok_writes=int(rng.integers(0, 400)), fail=1)
        try:
            ingest("physionet2019", PHYSIONET, flaky_url(path), shard_size=10)
            raised = FlakyFileSystem.failed == 0
        except OSError as e:
            raised = "injected EIO" in str(e)
        try:
            opens = _consistent(open_store(str(path)), ref_ids)
        except Exception as e:  # noqa: BLE001 - a fault before the first commit leaves no store, clearly said
            opens = "no zarr.json" in str(e) or "first commit never finished" in str(e)
        ingest("physionet2019", PHYSIONET, flaky_url(path), shard_size=10)  # the fault was used up
        row.check(raised and opens and open_store(str(path)).content_hash() == ref_hash,
                  f"moment {i}: raised={raised} opens={opens}")
    return row


# -- untrusted files -------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``exec``: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def untrusted_files(work: Path, checkpoint_dir: str) -> Row:
    """Malicious pickles where a checkpoint's weights / training state and a staged shard would be, and a
    config with code in it: each is refused, and the payload never runs."""
    import torch

    from perceiver import checkpoint
    from perceiver.config import RunConfig

    row = Row("untrusted files: pickle payloads as weights / training state / staged shard, code in config",
              note="payload never ran; pickles refused; code in a numeric config field refused (wrong type)")
    marker = work / "PAYLOAD_RAN"
    evil = pickle.dumps(_Payload(str(marker)))
    trials = []
    d = work / "evil-ckpt"
    shutil.copytree(checkpoint_dir, d)
    torch.save({"model": _Payload(str(marker))}, d / checkpoint.STATE)  # a real torch zip holding the payload
    trials.append(("training_state.pt (torch.save of a payload)", lambda: checkpoint.load_training_state(d)))
    d2 = work / "evil-ckpt2"
    shutil.copytree(checkpoint_dir, d2)
    (d2 / checkpoint.STATE).write_bytes(evil)
    trials.append(("training_state.pt (raw pickle)", lambda: checkpoint.load_training_state(d2)))
    d3 = work / "evil-ckpt3"
    shutil.copytree(checkpoint_dir, d3)
    (d3 / checkpoint.WEIGHTS).write_bytes(evil)
    trials.append(("model.safetensors (raw pickle)", lambda: checkpoint.load(d3)))
    npz = work / "shard-evil.npz"
    np.savez(npz, record_id=np.array([_Payload(str(marker))], dtype=object))
    trials.append(("staged shard .npz with an object array", lambda: _load_npz(npz)))
    cfg = json.loads((Path(checkpoint_dir) / checkpoint.CONFIG).read_text())
    cfg["train"]["steps"] = f"__import__('os').system('touch {marker}')"
    trials.append(("config.json with code in a field", lambda: RunConfig.from_json(json.dumps(cfg))))
    cfg2 = dict(cfg, __reduce__="exec")
    trials.append(("config.json with an unknown key", lambda: RunConfig.from_json(json.dumps(cfg2))))
    for what, fn in trials:
        try:
            fn()
            refused = False
        except Exception:  # noqa: BLE001 - any clear refusal counts; the marker says whether code ran
            refused = True
        # a config field holding code is refused (wrong type) or inert text (JSON is never evaluated)
        row.check((refused or what.startswith("config.json with code")) and not marker.exists(),
                  f"{what}: refused={refused} payload ran={marker.exists()}")
    return row


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:  # as the reconstruct flow's commit task loads staged shards
        return {k: z[k] for k in z.files}


# -- retries in flows -------------------------------------------------------------------------------------
def retries(work: Path, store: str, checkpoint: str,
            parts: tuple[str, ...] = ("ingest", "ingest-permanent", "reconstruct", "reconstruct-permanent")
            ) -> list[Row]:
    """Transient EIO in the ingest and reconstruct flows' tasks is retried and the run succeeds (equal to an
    uninterrupted run); a permanent one fails the run with the error, the store stays at its last commit."""
    from datasets.ingest import ingest
    from datasets.store import open_store
    from datasets.store.reconstruction import open_reconstruction
    from pipelines.reconstruct import reconstruct_flow

    ref = str(work / "retry-ref.zarr")
    ingest("physionet2019", PHYSIONET, ref, shard_size=64)
    ref_hash = open_store(ref).content_hash()
    ids = open_store(ref).records["record_id"].tolist()
    transient, permanent = Row("transient EIO in a flow task: retried, run succeeds, equal result"), \
        Row("permanent EIO in a flow task: run fails with the error, store consistent, re-run completes")

    if "ingest" in parts:
        _retry_ingest(work, ref_hash, transient)
    if "ingest-permanent" in parts:
        _retry_ingest_permanent(work, ref_hash, ids, permanent)
    if "reconstruct" in parts or "reconstruct-permanent" in parts:
        rec_ref = str(work / "retry-rec-ref.zarr")
        reconstruct_flow(store, checkpoint, rec_ref, records_per_shard=100, grid_times=3)
        rec_hash = open_reconstruction(rec_ref)["content_hash"]
    if "reconstruct" in parts:
        _retry_reconstruct(work, store, checkpoint, rec_hash, transient)
    if "reconstruct-permanent" in parts:
        _retry_reconstruct_permanent(work, store, checkpoint, rec_hash, permanent)
    return [r for r in (transient, permanent) if r.tried]


def _retry_ingest(work: Path, ref_hash: str, transient: Row) -> None:
    from datasets.store import open_store
    from pipelines.ingest import ingest_flow

    path = work / "retry-ingest.zarr"
    FlakyFileSystem.arm(ok_writes=60, fail=2)  # attempts 1 and 2 fail part-way, attempt 3 resumes and finishes
    summary = ingest_flow("physionet2019", PHYSIONET, flaky_url(path), shard_size=64, workers=1)
    transient.check(FlakyFileSystem.failed == 2 and summary["reconciles"]
                    and open_store(str(path)).content_hash() == ref_hash, f"ingest flow: {summary}")


def _retry_ingest_permanent(work: Path, ref_hash: str, ids: list[str], permanent: Row) -> None:
    from datasets.store import open_store
    from pipelines.ingest import ingest_flow

    path = work / "retry-ingest-perm.zarr"
    FlakyFileSystem.arm(ok_writes=60, fail=-1)
    state = ingest_flow("physionet2019", PHYSIONET, flaky_url(path), shard_size=64, workers=1, return_state=True)
    msg = str(state.message) + "".join(str(e) for e in [_exception(state)])
    consistent = _consistent(open_store(str(path)), ids)
    FlakyFileSystem.arm(0, 0)
    ingest_flow("physionet2019", PHYSIONET, str(path), shard_size=64, workers=1)
    permanent.check(state.is_failed() and "injected EIO" in msg and consistent
                    and open_store(str(path)).content_hash() == ref_hash, f"ingest flow: {msg[:200]}")


def _retry_reconstruct(work: Path, store: str, checkpoint: str, rec_hash: str, transient: Row) -> None:
    from datasets.store.reconstruction import open_reconstruction
    from pipelines.reconstruct import reconstruct_flow

    out = work / "retry-rec.zarr"
    FlakyFileSystem.arm(ok_writes=40, fail=2)
    summary = reconstruct_flow(store, checkpoint, flaky_url(out), records_per_shard=100, grid_times=3)
    transient.check(FlakyFileSystem.failed == 2 and summary["records"] == 300
                    and open_reconstruction(str(out))["content_hash"] == rec_hash, f"reconstruct flow: {summary}")


def _retry_reconstruct_permanent(work: Path, store: str, checkpoint: str, rec_hash: str, permanent: Row) -> None:
    from datasets.store.reconstruction import open_reconstruction
    from pipelines.reconstruct import reconstruct_flow

    out = work / "retry-rec-perm.zarr"
    FlakyFileSystem.arm(ok_writes=40, fail=-1)
    state = reconstruct_flow(store, checkpoint, flaky_url(out), records_per_shard=100, grid_times=3,
                             return_state=True)
    msg = str(state.message) + str(_exception(state))
    try:
        n = len(open_reconstruction(str(out))["records"])
        opens = n in (0, 100, 200)
    except Exception:  # noqa: BLE001 - failed before its first commit
        opens = True
    FlakyFileSystem.arm(0, 0)
    reconstruct_flow(store, checkpoint, str(out), records_per_shard=100, grid_times=3)
    permanent.check(state.is_failed() and "injected EIO" in msg and opens
                    and open_reconstruction(str(out))["content_hash"] == rec_hash, f"reconstruct flow: {msg[:200]}")


def _exception(state) -> str:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the run's own error, to check its message
        return f"{type(e).__name__}: {e}"
    return ""


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
    env = _env() | ({"PREFECT_API_URL": api_url} if api_url else {})

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
    holder = subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT + "\nimport time; time.sleep(0)\n",
                               PHYSIONET, path], env=_env(), stdout=subprocess.PIPE, text=True)
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
    from perceiver.train import train

    torch.set_num_threads(1)
    s = open_store(store)
    return str(train(train_config(12), s.read(), s.channels, work / "tiny-checkpoint"))


def table(rows: list[Row]) -> str:
    lines = ["| what was tried | tried | held | note |", "|---|---:|---:|---|"]
    lines += [f"| {r.what} | {r.tried} | {r.held} | {r.note} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moments", type=int, default=20, help="kill -9 moments per phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps (e.g. 'load' 'retries')")
    args = ap.parse_args()
    import torch

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
        steps = [("kill ingest", lambda: kill_ingest(work, args.moments, args.seed)),
                 ("kill reconstruct", lambda: [kill_reconstruct(work, store, ckpt, args.moments, args.seed)]),
                 ("kill train", lambda: [kill_train(work, store, args.moments, args.seed)]),
                 ("bad input", lambda: bad_input(work)),
                 ("vanishing file", lambda: [vanishing_file(work)]),
                 ("full disk", lambda: [full_disk(work)]),
                 ("write errors", lambda: [write_errors(work, args.moments, args.seed)]),
                 ("untrusted", lambda: [untrusted_files(work, ckpt)]),
                 ("retries", lambda: retries(work, store, ckpt)),
                 ("lock wait", lambda: [lock_wait(work)]),
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
