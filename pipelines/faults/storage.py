"""Storage faults: a full disk, an I/O error at a random write, and the flows' retries of transient and
permanent I/O errors. After each, the store is at its last commit and a re-run equals an uninterrupted run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from pipelines.faults.harness import PHYSIONET, Row, consistent
from pipelines.faults.inject import FlakyFileSystem, flaky_url, tmpfs


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
        opens = consistent(partial, open_store(ref).records["record_id"].tolist())
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
            opens = consistent(open_store(str(path)), ref_ids)
        except Exception as e:  # noqa: BLE001 - a fault before the first commit leaves no store, clearly said
            opens = "no zarr.json" in str(e) or "first commit never finished" in str(e)
        ingest("physionet2019", PHYSIONET, flaky_url(path), shard_size=10)  # the fault was used up
        row.check(raised and opens and open_store(str(path)).content_hash() == ref_hash,
                  f"moment {i}: raised={raised} opens={opens}")
    return row


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
    is_consistent = consistent(open_store(str(path)), ids)
    FlakyFileSystem.arm(0, 0)
    ingest_flow("physionet2019", PHYSIONET, str(path), shard_size=64, workers=1)
    permanent.check(state.is_failed() and "injected EIO" in msg and is_consistent
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


def concurrent_writers(work: Path, store_root: str, trials: int = 1) -> Row:
    """Two processes ingest the same archive into one object-store store at once (no lock exists there):
    both finish, and the store equals an uninterrupted local ingest (the later commit of each race fails as
    an Icechunk conflict, and its writer continues from the winner's commit)."""
    import sys

    from datasets.ingest import ingest
    from datasets.store import open_store
    from pipelines.faults.harness import subprocess_env
    from pipelines.faults.kills import INGEST_SCRIPT

    ref = str(work / "concurrent-ref.zarr")
    ingest("physionet2019", PHYSIONET, ref, shard_size=10)
    ref_hash = open_store(ref).content_hash()
    row = Row(f"two concurrent ingests into one {store_root.split('://')[0]}:// store (Icechunk)",
              note="both exit 0; the store equals one local ingest")
    for i in range(trials):
        url = f"{store_root.rstrip('/')}/concurrent-{i}.zarr"
        procs = [subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT, PHYSIONET, url], env=subprocess_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        errors = [p.communicate()[1] for p in procs]
        codes = [p.returncode for p in procs]
        final = open_store(url)
        ok = codes == [0, 0] and final.content_hash() == ref_hash and final.records["record_id"].is_unique
        row.check(ok, f"trial {i}: exit codes {codes}, hash equal {final.content_hash() == ref_hash}; "
                      f"{[e[-400:] for e in errors if e]}")
    return row
