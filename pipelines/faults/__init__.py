"""The reliability campaign: kill -9, bad input, untrusted files, I/O faults and the flows' retries.

Each step runs the real thing on the bundled samples -- Zarr stores on disk, subprocesses killed with
SIGKILL, Prefect flows, a size-limited tmpfs (where root may mount one), an fsspec filesystem that fails
writes -- and returns :class:`Row` s: what was tried, how many times, how many times everything held.
``bench/faults.py`` runs every step with many moments (plus concurrent load) and prints the table;
``tests/test_faults.py`` runs them with few.

- :mod:`~pipelines.faults.harness`: the row, the samples, kill-at-a-moment subprocesses, the consistency check;
- :mod:`~pipelines.faults.inject`: the faults (a failing filesystem, a small tmpfs, a pickle payload);
- :mod:`~pipelines.faults.kills`: kill -9 during ingest, reconstruct and training;
- :mod:`~pipelines.faults.inputs`: malformed, vanishing and hostile files;
- :mod:`~pipelines.faults.storage`: a full disk, write errors, retries in flows, concurrent writers to an
  object store.
"""

from pipelines.faults.harness import PHYSIONET, SAMPLES, Row, consistent, subprocess_env
from pipelines.faults.inject import FlakyFileSystem, flaky_url
from pipelines.faults.inputs import bad_input, untrusted_files, vanishing_file
from pipelines.faults.kills import INGEST_SCRIPT, kill_ingest, kill_reconstruct, kill_train, train_config
from pipelines.faults.storage import concurrent_writers, full_disk, retries, write_errors

__all__ = ["INGEST_SCRIPT", "PHYSIONET", "SAMPLES", "FlakyFileSystem", "Row", "bad_input", "concurrent_writers",
           "consistent", "flaky_url", "full_disk", "kill_ingest", "kill_reconstruct", "kill_train", "retries",
           "subprocess_env", "train_config", "untrusted_files", "vanishing_file", "write_errors"]
