"""MRC files: stacks opened as read-only memory maps (headers checked), streamed atomic writing of
stacks, maps read and written. Stacks are written in chunks under a hidden temporary name and
renamed when complete, so no partial stack ever appears under its final name. Reading particles
by STAR row is ``cdae_em.io.images``."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from cdae_em.io.atomic_write import atomic_path, partial_name
from cdae_em.errors import InputError
from cdae_em.io.memory import RELEASE_BYTES, release

log = logging.getLogger(__name__)

#: MRC data types we read (modes 0, 1, 2, 6, 12), either byte order: numpy dtype codes
SUPPORTED_DTYPES = {"i1", "u1", "i2", "u2", "f2", "f4"}

#: how many stacks are kept open (memory-mapped) at once
#: header faults RELION reads past (several tools write files without the 'MAP ' ID or a machine stamp)
TOLERATED = ("Map ID string not found", "Unrecognised machine stamp")
_warned: set[str] = set()  # files whose tolerated faults were logged (once per file and process)


def open_mrc(path: Path) -> mrcfile.mrcmemmap.MrcMemmap:
    """Memory-map an MRC file read-only. A file that lacks the 'MAP ' ID or a machine stamp is read
    as RELION reads it (native byte order), with one warning; a corrupt or truncated file is an
    InputError."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except ValueError as exc:
        if not str(exc).startswith(TOLERATED):
            raise InputError(path, f"not a readable MRC file ({exc})") from exc
        mrc, caught = _open_tolerant(path, exc)
    except (OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from exc
    for w in caught:
        if not str(w.message).startswith(TOLERATED):
            log.warning("%s: %s", path, w.message)
    return mrc


def _open_tolerant(path: Path, fault: ValueError) -> tuple[mrcfile.mrcmemmap.MrcMemmap, list]:
    """The file opened permissively, where its only faults are the tolerated ones and its data is
    all there (a whole, non-empty stack of the size the header says)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(path, f"not a readable MRC file ({exc})") from exc
    others = [str(w.message) for w in caught if not str(w.message).startswith(TOLERATED)]
    if mrc.data is None or mrc.data.size == 0 or others:
        mrc.close()
        raise InputError(path, f"not a readable MRC file ({'; '.join([str(fault), *others])})")
    if str(path) not in _warned:
        _warned.add(str(path))
        faults = sorted({str(w.message).split(" - ")[0].split(":")[0] for w in caught})
        log.warning("%s: %s; read in native byte order, as RELION does", path, ", ".join(faults).lower())
    return mrc, []


def as_stack(data: np.ndarray) -> np.ndarray:
    """View MRC data as a stack of sections: a 2D image is a stack of one."""
    return data[np.newaxis] if data.ndim == 2 else data


class StackWriter:
    """Writes an MRC stack in streamed chunks (mrcfile.new_mmap), voxel size set, under a temporary
    name renamed on success.

    Use as a context manager: on normal exit the header (voxel size, statistics) is completed and
    the file renamed into place; on an exception, or if some images were never written, the
    temporary file is removed and nothing is left.
    """

    def __init__(self, path: str | Path, n: int, box: int, pixel_size: float):
        self.path = Path(path)
        self.tmp = partial_name(self.path)
        self.n, self.box, self.pixel_size = int(n), int(box), float(pixel_size)
        self._written = np.zeros(self.n, dtype=bool)
        self._sum = self._sumsq = 0.0
        self._min, self._max = np.inf, -np.inf
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mrc = mrcfile.new_mmap(self.tmp, shape=(self.n, self.box, self.box), mrc_mode=2, overwrite=True)
        self._unreleased = 0

    def write(self, start: int, images: np.ndarray) -> None:
        """Write ``images`` (k, box, box) as images start .. start+k-1 (0-based)."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 2:
            images = images[np.newaxis]
        k = len(images)
        if images.shape[1:] != (self.box, self.box) or start < 0 or start + k > self.n:
            raise ValueError(
                f"cannot write {images.shape} at {start} into a stack of {self.n}x{self.box}x{self.box}"
            )
        self._mrc.data[start : start + k] = images
        self._written[start : start + k] = True
        self._unreleased += images.nbytes
        if self._unreleased >= RELEASE_BYTES:  # keep the resident set flat (cdae_em.io.memory)
            release(self._mrc.data)
            self._unreleased = 0
        if k:
            as64 = images.astype(np.float64)
            self._sum += as64.sum()
            self._sumsq += np.square(as64).sum()
            self._min = min(self._min, float(images.min()))
            self._max = max(self._max, float(images.max()))

    def finish(self) -> None:
        """Complete the header, close, and rename to the final name."""
        if not self._written.all():
            missing = int(np.flatnonzero(~self._written)[0])
            self.abort()
            raise ValueError(f"{self.path}: image {missing + 1} of {self.n} was never written")
        header = self._mrc.header
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.pixel_size
        count = self.n * self.box * self.box
        mean = self._sum / count if count else 0.0
        header.dmin, header.dmax, header.dmean = self._min, self._max, mean
        header.rms = np.sqrt(max(self._sumsq / count - mean**2, 0.0)) if count else 0.0
        self._mrc.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and remove the temporary file."""
        self._mrc.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def write_stack(path: str | Path, images: np.ndarray, pixel_size: float) -> None:
    """Write a small stack (all images in memory) atomically."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[np.newaxis]
    with StackWriter(path, len(images), images.shape[-1], pixel_size) as writer:
        writer.write(0, images)


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """A cubic 3D MRC volume (.mrc, or compressed .mrc.gz/.bz2) as float32, and its voxel size in A."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            volume = np.array(mrc.data, dtype=np.float32)
            voxel_size = float(mrc.voxel_size.x)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from exc
    if volume.ndim != 3 or volume.shape[0] == 1:
        raise InputError(path, f"expected a 3D map, found data of shape {volume.shape}")
    if len(set(volume.shape)) != 1:
        raise InputError(path, f"map is not cubic ({'x'.join(map(str, volume.shape[::-1]))})")
    if not np.isfinite(volume).all():
        raise InputError(path, "map has NaN or infinite values")
    return volume, voxel_size


def write_map(path: str | Path, volume: np.ndarray, voxel_size: float) -> None:
    """Write a 3D volume as float32 MRC (gzip-compressed if the name ends in .gz), atomically."""
    path = Path(path)
    compression = "gzip" if path.suffix == ".gz" else None
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, data=np.asarray(volume, dtype=np.float32), overwrite=True, compression=compression) as mrc:
            mrc.voxel_size = voxel_size
