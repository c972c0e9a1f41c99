"""The faults themselves: an fsspec filesystem whose writes fail, a size-limited tmpfs, a pickle payload."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


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


class Payload:
    """Unpickling this runs ``exec``: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))
