"""Work arrays: the job's intermediate image arrays (``OUT/.cdae_work/*.npy``), memory-mapped, with
their disk space reserved up front, shared between the processes of a distributed run, measured
and removed when the job no longer needs them."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from cdae_em.runtime import distributed

log = logging.getLogger(__name__)


WORK_DIR = ".cdae_work"


def open_work_array(path: Path, n: int, box: int, mode: str = "w+", shape: tuple | None = None) -> np.memmap:
    """A float32 (n, box, box) ``.npy`` work array (or of ``shape``), memory-mapped. A new one has
    its disk space reserved at once, so that a full disk is an ``OSError`` (ENOSPC) here rather
    than a SIGBUS halfway through writing into the map."""
    array = np.lib.format.open_memmap(path, mode=mode, dtype=np.float32, shape=shape or (n, box, box))
    if mode == "w+" and hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate
                del array
                Path(path).unlink(missing_ok=True)
                raise OSError(exc.errno, exc.strerror, str(path)) from None
        finally:
            os.close(fd)
    return array


def shared_work_array(path: Path, n: int, box: int, shape: tuple | None = None) -> np.memmap:
    """A new work array that every rank of a distributed run writes its rows into: rank 0 creates
    it (``open_work_array``), the others open it once it exists. One process: ``open_work_array``."""
    if not distributed.active():
        return open_work_array(path, n, box, shape=shape)
    if distributed.world().main:
        array = open_work_array(path, n, box, shape=shape)
        distributed.barrier()
        return array
    distributed.barrier()
    return open_work_array(path, n, box, mode="r+", shape=shape)


def work_size(out: Path) -> int:
    """Bytes on disk under ``OUT/.cdae_work`` (allocated blocks, so sparse or reserved arrays count
    as what they occupy); 0 if there is none."""
    work = out / WORK_DIR
    if not work.exists():
        return 0
    total = 0
    for path in work.rglob("*"):
        try:
            st = path.stat()
        except OSError:  # removed meanwhile
            continue
        if path.is_file():
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def remove_work(out: Path) -> None:
    """Remove ``OUT/.cdae_work`` (its size logged): renamed first, so that a kill halfway never
    leaves a work directory with some of its files gone."""
    work = out / WORK_DIR
    if work.exists():
        log.info("removing %s (%.2f GB)", work, work_size(out) / 1e9)
        trash = out / f"{WORK_DIR}.removing"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(work, trash)
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(out / f"{WORK_DIR}.removing", ignore_errors=True)
