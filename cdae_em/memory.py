"""Keeping the resident memory of streamed passes flat: pages of memory-mapped files that a pass
has read or written are dropped from the process's resident set (``madvise(MADV_DONTNEED)``);
they stay in the kernel's page cache, written-to pages reach the file as usual.

Without this, reading or writing a whole work array or MRC stack through its map counts all of it
in the process's RSS (file-backed pages, reclaimed only under memory pressure), so that RSS grows
with the number of particles although the program holds only a batch.
"""

from __future__ import annotations

import mmap
import time

import numpy as np

RELEASE_BYTES = 32 * 2**20  # streamed passes release every this many bytes (why 32 MB: docs/notes.md)


def release(*arrays) -> None:
    """Drop the resident pages of memory-mapped arrays (np.memmap and views of one, shared file
    mappings only; anything else is left alone). Writable maps are flushed first."""
    for a in arrays:
        m = getattr(a, "_mmap", None)
        if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            continue
        try:
            if isinstance(a, np.memmap) and a.flags.writeable:
                a.flush()
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed meanwhile, or a platform without it
            pass


class Releaser:
    """``step(nbytes)`` after each batch of a streamed pass: calls ``release`` on the arrays (or
    on what ``arrays()`` returns) once every ``RELEASE_BYTES``."""

    def __init__(self, *arrays, source=None):
        self.arrays, self.source, self.done, self.t = arrays, source, 0, time.monotonic()

    def step(self, nbytes: int) -> None:
        self.done += nbytes
        if self.done >= RELEASE_BYTES:
            self.now()

    def now(self) -> None:
        self.done = 0
        release(*self.arrays, *(self.source() if self.source is not None else ()))


class Streamed:
    """An array-like view of a memory-mapped array (``len``, ``shape``, ``dtype``, ``[rows]``) that
    releases the map's resident pages after every ``RELEASE_BYTES`` read through it."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype
        self._releaser = Releaser(array)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, rows):
        out = np.array(self.array[rows])
        self._releaser.step(out.nbytes)
        return out
