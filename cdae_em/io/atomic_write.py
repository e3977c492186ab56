"""Writing files so that a pipeline never sees half of one: write to a hidden temporary name beside
the target, rename onto it when complete, remove the temporary file on any failure."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def partial_name(path: str | Path) -> Path:
    """The temporary name used while ``path`` is written: ``.<name>.partial`` in the same folder
    (hidden, and not matching the ``*.star`` / ``*.mrcs`` globs pipelines use)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block completes."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy a file atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
