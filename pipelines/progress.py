"""Progress of long work (ingest, training, reconstruction, evaluation), through tqdm.

On an interactive terminal: tqdm's bar, with the count, the rate and the time left. Elsewhere (CI, a Prefect
worker, a pipe, a log file): the same facts as a plain line every :data:`LOG_SECONDS`, through the run's logger
where there is one, else on stderr, and once more at the end.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from tqdm import tqdm

#: seconds between two progress lines when not on a terminal
LOG_SECONDS = 30.0
#: the plain line: "train: 2040/6000 step (34 %), 07:02 elapsed, 13:40 left, 4.83 step/s, loss=1.2"
PLAIN = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %), {elapsed} elapsed, {remaining} left, "
         "{rate_fmt}{postfix}")


class _Lines(io.TextIOBase):
    """A stream that turns what tqdm writes ("\\r" + a line) into one log record (or stderr line) per refresh."""

    def __init__(self, logger: Any = None) -> None:
        self.logger = logger

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            if self.logger is not None:
                self.logger.info(line)
            else:
                print(line, file=sys.stderr, flush=True)
        return len(text)

    def flush(self) -> None:
        pass


def progress(total: int, unit: str, desc: str, logger: Any = None, initial: int = 0,
             interactive: bool | None = None) -> tqdm:
    """A progress counter of ``total`` ``unit`` (e.g. "step", "record") named ``desc``: call ``.update(n)`` as
    work is done, ``.set_postfix(...)`` for a figure such as the loss, and ``.close()`` (or use ``with``).
    ``interactive``: a bar (True) or plain lines (False); default: a bar where stderr is a terminal."""
    if interactive is None:
        interactive = sys.stderr.isatty()
    if interactive:
        return tqdm(total=total, unit=unit, desc=desc, initial=initial, dynamic_ncols=True, file=sys.stderr)
    return tqdm(total=total, unit=unit, desc=desc, initial=initial, file=_Lines(logger), mininterval=LOG_SECONDS,
                maxinterval=LOG_SECONDS * 4, bar_format=PLAIN, ascii=True)
