"""Progress: a tqdm bar on a terminal (tested in a real pseudo-terminal), plain lines with the count, the time
left and the rate elsewhere."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios

from pipelines import progress as progress_module
from pipelines.progress import progress


def test_plain_lines_through_a_logger_say_count_time_left_and_rate(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="percival-test"):
        with progress(4, "record", "reconstruct", logging.getLogger("percival-test"), interactive=False) as bar:
            for _ in range(4):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("reconstruct: 4/4 record (100 %)") and "left" in lines[-1] and "record/s" in lines[-1]
    assert any(line.startswith("reconstruct: 2/4 record (50 %)") for line in lines)


def test_a_terminal_gets_a_bar_and_a_pipe_gets_lines(tmp_path, samples):
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", "macho", str(samples / "macho"), "--no-prefect",
           "--store"]
    # a pseudo-terminal: tqdm draws its bar ("100%|####|") on stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100 characters
    proc = subprocess.Popen([*cmd, str(tmp_path / "a.zarr")], stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait() == 0
    text = seen.decode(errors="replace")
    assert "ingest macho: 100%|" in text and ("shard/s" in text or "s/shard" in text)
    # a pipe: plain lines, no bar
    r = subprocess.run([*cmd, str(tmp_path / "b.zarr")], capture_output=True, text=True)
    assert r.returncode == 0 and "ingest macho: 1/1 shard (100 %)" in r.stderr and "|" not in r.stderr
