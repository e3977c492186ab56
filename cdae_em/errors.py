"""Errors that reach the user as one line and a non-zero exit."""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class CdaeError(Exception):
    """Base class for errors the command line reports as a single line (no traceback)."""


class InputError(CdaeError):
    """Bad input: a file that is missing, malformed or inconsistent.

    The message always names the file (and the row, where one is at fault) and the problem.
    """

    def __init__(self, path: str | Path | None, problem: str, row: int | None = None):
        where = str(path) if path is not None else "input"
        if row is not None:
            where += f" (row {row})"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.row = row
        self.problem = problem


class OutputError(CdaeError):
    """The output location cannot be used (unwritable, or holds another job's results)."""


class ResourceError(CdaeError):
    """The machine ran out of something (GPU or CPU memory, disk space); the message says what to
    change."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CPU ``MemoryError`` and torch's CUDA out-of-memory error (without importing torch)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@contextmanager
def resource_errors(batch_size: int | None = None, out_dir: str | Path | None = None) -> Iterator[None]:
    """Turn running out of memory (GPU or CPU) or disk space inside the block into a one-line
    :class:`ResourceError` that names the fix (a smaller --batch-size, free space)."""
    try:
        yield
    except CdaeError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = exc.filename or out_dir or "the output directory"
        raise ResourceError(f"{where}: no space left on the device; free some space (or choose another "
                            "output directory) and rerun the same command to resume") from None
    except BaseException as exc:
        if isinstance(exc, RuntimeError) and "file write failed" in str(exc):  # torch.save on a full disk
            raise ResourceError(f"{out_dir or 'output'}: a file could not be written (is the disk full?); free some "
                                "space and rerun the same command to resume") from None
        if not is_out_of_memory(exc):
            raise
        what = "memory" if isinstance(exc, MemoryError) else "GPU memory"
        now = f" (now {batch_size})" if batch_size else ""
        raise ResourceError(f"out of {what}: use a smaller --batch-size{now}, or a smaller --box") from None


class JobAborted(CdaeError):
    """Raised (by a ``should_stop`` hook) to stop a job cleanly."""
