"""Keeping the resident memory of streamed passes flat: pages of memory-mapped files that a pass
has read or written are dropped from the process's resident set (``madvise(MADV_DONTNEED)``);
they stay in the kernel's page cache, written-to pages reach the file as usual.

Without this, reading or writing a whole work array or MRC stack through its map counts all of it
in the process's RSS (file-backed pages, reclaimed only under memory pressure), so that RSS grows
with the number of particles although the program holds only a batch.

Random reads map far more than they ask for: a page fault on a file mapping may map a whole large
folio of the page cache (recent Linux kernels with ext4, xfs; up to 2 MiB), so reads count
``FAULT_BYTES`` per run of consecutive rows towards ``RELEASE_BYTES`` (``mapped_bytes``), and
random rows are read a group at a time (measurements: docs/notes.md).
"""

from __future__ import annotations

import mmap
import time

import numpy as np

RELEASE_BYTES = 32 * 2**20  # streamed passes release every this many bytes (why 32 MB: docs/notes.md)
FAULT_BYTES = 2 * 2**20  # the most one fault may map: a large folio (2 MiB, a PMD)


def mapped_bytes(nbytes: int, runs: int = 1) -> int:
    """Upper bound of what reading ``nbytes`` in ``runs`` separate runs of a map makes resident."""
    return nbytes + runs * FAULT_BYTES


def runs_of(rows) -> int:
    """Runs of consecutive indices in ``rows`` (a slice, an integer or an index array)."""
    if isinstance(rows, (slice, int, np.integer)):
        return 1
    r = np.asarray(rows).ravel()
    if r.dtype == bool:
        r = np.flatnonzero(r)
    return 1 + int(np.count_nonzero(np.diff(r) != 1)) if len(r) else 0


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
        if isinstance(rows, (slice, int, np.integer)):
            out = np.array(self.array[rows])
            self._releaser.step(mapped_bytes(out.nbytes))
            return out
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        index_shape, rows = rows.shape, rows.ravel()
        out = np.empty((len(rows),) + tuple(self.shape[1:]), dtype=self.dtype)
        group = RELEASE_BYTES // FAULT_BYTES  # random rows read between two releases: what they map stays bounded
        for start in range(0, len(rows), group):
            part = rows[start:start + group]
            piece = out[start:start + len(part)]
            piece[...] = self.array[part]
            self._releaser.step(mapped_bytes(piece.nbytes, runs_of(part)))
        return out.reshape(index_shape + tuple(self.shape[1:]))
