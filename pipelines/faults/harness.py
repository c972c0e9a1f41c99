"""What every fault step uses: the result row, the bundled samples, subprocesses killed with SIGKILL at a
chosen moment, and the check that a store is in a committed state."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def subprocess_env() -> dict:
    """The environment of a child Python: this checkout importable, one OpenMP thread."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run_and_kill(script: str, args: list[str], delay: float) -> tuple[bool, int]:
    """Start ``script``; ``delay`` s after it prints ``go`` (imports done, work starting), SIGKILL it.
    Returns (killed before it finished, return code)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=subprocess_env(), stdout=subprocess.PIPE,
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


def timed_run(script: str, args: list[str]) -> float:
    """Seconds from ``go`` to the end of an uninterrupted run of ``script``."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    t0 = time.perf_counter()
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{err[-3000:]}")
    return time.perf_counter() - t0


def consistent(store, ref_ids: list[str]) -> bool:
    """A committed state: counts agree with the arrays, and the records are a prefix of the reference's."""
    recs = store.records
    return (len(recs) == store.n_records and int(recs["row_size"].sum()) == store.n_elements
            and store.group["value"].shape[0] == store.n_elements and recs["record_id"].is_unique
            and recs["record_id"].tolist() == ref_ids[:store.n_records])
