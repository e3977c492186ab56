"""Errors that reach the user as one line and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


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
