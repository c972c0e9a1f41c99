"""When a Prefect task is retried: transient I/O errors only (a bad input or a bug fails at once)."""

from __future__ import annotations

IO_ERRORS = (OSError, TimeoutError)


def retry_on_io(task, task_run, state) -> bool:
    """A ``retry_condition_fn``: retry when the attempt failed with an I/O error."""
    try:
        state.result()
    except IO_ERRORS:
        return True
    except Exception:
        return False
    return False
