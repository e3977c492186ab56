"""Resident memory of reads through memory maps stays bounded, random reads included (cdae_em.io.memory)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cdae_em.io.memory import FAULT_BYTES, RELEASE_BYTES, Streamed, mapped_bytes, runs_of
from cdae_em.io.images import ImageSource

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

N, BOX = 8192, 64  # a 128 MiB float32 array


def status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def peak_growth(read_batches) -> float:
    """How far this process's resident set rose above where it was (MiB), transients within a read
    included: the high-water mark is reset first (/proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("cannot reset the resident high-water mark here")
    before = status_mib("VmRSS")
    read_batches()
    return status_mib("VmHWM") - before


def test_runs_of_and_mapped_bytes():
    assert runs_of(slice(0, 10)) == 1 and runs_of(7) == 1
    assert runs_of(np.array([3, 4, 5, 9, 10, 20])) == 3
    assert runs_of(np.array([], dtype=int)) == 0
    assert runs_of(np.array([True, True, False, True])) == 2
    assert mapped_bytes(100, 3) == 100 + 3 * FAULT_BYTES


def random_batches(seed: int = 0, batches: int = 8, size: int = 128) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(N, size, replace=False)) for _ in range(batches)]


def test_random_rows_through_streamed_stay_flat(tmp_path):
    # 8 x 128 random 16 KB rows ask for 16 MiB; on kernels that map whole large folios per fault
    # they would make most of the 128 MiB file resident unless each read is counted by its runs
    path = tmp_path / "work.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, BOX, BOX))
    for start in range(0, N, 1024):
        array[start:start + 1024] = np.arange(start, start + 1024, dtype=np.float32)[:, None, None]
    array.flush()
    del array
    streamed = Streamed(np.load(path, mmap_mode="r"))

    def read() -> None:
        for rows in random_batches():
            batch = streamed[rows]
            assert np.array_equal(batch[:, 0, 0], rows.astype(np.float32))

    assert peak_growth(read) < 1.5 * RELEASE_BYTES / 2**20


def test_random_rows_of_a_stack_stay_flat(particle_project):
    import mrcfile

    path = particle_project.root / "Extract" / "big.mrcs"
    path.parent.mkdir(parents=True)
    with mrcfile.new_mmap(path, shape=(N, BOX, BOX), mrc_mode=2, overwrite=True) as mrc:
        for start in range(0, N, 1024):
            mrc.data[start:start + 1024] = np.arange(start, start + 1024, dtype=np.float32)[:, None, None]
        mrc.voxel_size = 1.77
    star = particle_project.write_star("particles.star", [f"{i + 1:06d}@Extract/big.mrcs" for i in range(N)])
    with ImageSource(star, project_dir=particle_project.root) as source:

        def read() -> None:
            for rows in random_batches(seed=1):
                batch = source.read(rows)
                assert np.array_equal(batch[:, 0, 0], rows.astype(np.float32))

        assert peak_growth(read) < 1.5 * RELEASE_BYTES / 2**20


def test_streamed_indexes_like_the_array():
    a = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    streamed = Streamed(a)
    for index in (np.array([[1, 2], [50, 3]]), np.array([5, 6, 90]), a[:, 0] > 250, slice(3, 7), 4,
                  np.array([], dtype=int), np.arange(40)):
        got = streamed[index]
        assert got.shape == a[index].shape and np.array_equal(got, a[index])
