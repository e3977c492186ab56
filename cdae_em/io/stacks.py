"""Particle images: lazy, batched reading from MRC stacks, and streamed, atomic writing.

Images are read through memory maps (``mrcfile.mmap``), so a data set of any size costs only two
small integers per particle in memory (which stack, which section). Stacks are written in chunks
under a hidden temporary name and renamed when complete, so no partial stack ever appears under
its final name.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import mrcfile
import numpy as np
import pandas as pd
from tqdm import tqdm

from cdae_em.io.atomic_write import atomic_path, partial_name
from cdae_em.errors import InputError
from cdae_em.io.memory import RELEASE_BYTES, mapped_bytes, release
from cdae_em.io.star import ParticleTable

log = logging.getLogger(__name__)

#: MRC data types we read (modes 0, 1, 2, 6, 12), either byte order: numpy dtype codes
SUPPORTED_DTYPES = {"i1", "u1", "i2", "u2", "f2", "f4"}

#: how many stacks are kept open (memory-mapped) at once
MAX_OPEN_STACKS = 64


def split_image_names(names: pd.Series) -> tuple[np.ndarray, pd.Series, np.ndarray]:
    """RELION image names ``"12@path.mrcs"`` -> 0-based indices (11), stack names (``"path.mrcs"``)
    and which names are bad (no N >= 1 before the ``@``, or no stack); a name without ``@`` is a
    single image, index 0. The one parser of image names (vectorised: millions of rows)."""
    parts = names.astype(str).str.strip().str.partition("@")
    has_at = parts[1] == "@"
    paths = parts[2].where(has_at, parts[0])
    numbers = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce")
    bad = (numbers.isna() | (numbers < 1) | (numbers != numbers.round()) | (paths == "")).to_numpy()
    return numbers.fillna(1).to_numpy(np.int64) - 1, paths, bad


def parse_image_name(name: str) -> tuple[int, str]:
    """Split one RELION image name ``"12@path.mrcs"`` into (0-based index 11, ``"path.mrcs"``).

    A name without ``@`` is a single image: index 0. Raises ValueError for a bad index.
    """
    index, paths, bad = split_image_names(pd.Series([name]))
    if bad[0]:
        raise ValueError(f"bad image name {str(name).strip()!r}: expected N@stack with N >= 1")
    return int(index[0]), str(paths.iloc[0])


def _open_mrc(path: Path) -> mrcfile.mrcmemmap.MrcMemmap:
    """Memory-map an MRC file read-only; a corrupt or truncated file is an InputError."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from exc
    for w in caught:
        log.warning("%s: %s", path, w.message)
    return mrc


def _as_stack(data: np.ndarray) -> np.ndarray:
    """View MRC data as a stack of sections: a 2D image is a stack of one."""
    return data[np.newaxis] if data.ndim == 2 else data


class ImageSource:
    """Images of a ParticleTable in STAR order, read lazily from any number of stacks.

    Relative image paths are resolved against ``project_dir`` (default: the working directory,
    where RELION runs its jobs) and, failing that, against the STAR file's directory. All stacks
    are checked up front from their headers: present, valid, a supported mode, square images of
    one box size, and every requested image within its stack.
    """

    def __init__(
        self,
        table: ParticleTable,
        project_dir: str | Path | None = None,
        column: str = "rlnImageName",
    ):
        self.table = table
        self.project_dir = Path(project_dir if project_dir is not None else os.getcwd()).absolute()
        self._open: OrderedDict[int, mrcfile.mrcmemmap.MrcMemmap] = OrderedDict()
        self._unreleased = 0  # bytes read (and possibly mapped) since the maps were last released
        if column not in table.particles.columns:
            raise InputError(table.path, f"no {column} column in the particle table")
        names = table.particles[column]
        self._index, self._stack_id, stack_names = self._parse_names(names)
        first_rows = np.unique(self._stack_id, return_index=True)[1]  # ids are in order of appearance
        self.stacks: list[Path] = [
            self._resolve(name, int(row)) for name, row in zip(stack_names, first_rows)
        ]
        self.n = len(names)
        try:
            self.box, self.voxel_size = self._validate()
        except BaseException:
            self.close()
            raise

    def _parse_names(self, names: pd.Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per-row 0-based section index and stack number, and the distinct stack names."""
        index, paths, bad = split_image_names(names)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(
                self.table.path,
                f"bad image name {names.iloc[row]!r}: expected N@stack with N >= 1",
                row=row + 1,
            )
        stack_id, uniques = pd.factorize(paths, sort=False)
        return index, stack_id.astype(np.int32), [str(u) for u in uniques]

    def _resolve(self, name: str, first_row: int) -> Path:
        """The file a stack name refers to (absolute, or relative to project dir or STAR dir)."""
        p = Path(name)
        if p.is_absolute():
            candidates = [p]
        else:
            candidates = [self.project_dir / p]
            if self.table.path is not None:
                star_dir = self.table.path.parent.absolute()
                if star_dir != self.project_dir:
                    candidates.append(star_dir / p)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        where = " or ".join(str(c.parent) for c in candidates)
        raise InputError(
            self.table.path, f"image stack {name} not found (looked in {where})", row=first_row + 1
        )

    def _validate(self) -> tuple[int, float]:
        """Check every stack's header; return the common box size and the first voxel size."""
        box: int | None = None
        voxel_size = 0.0
        max_index = np.full(len(self.stacks), -1, dtype=np.int64)
        np.maximum.at(max_index, self._stack_id, self._index)
        iterator = enumerate(self.stacks)
        if len(self.stacks) > 100:
            iterator = tqdm(iterator, total=len(self.stacks), desc="checking stacks", unit="stack", disable=None)
        for i, path in iterator:
            data = self._data(i)
            if data.dtype.str[1:] not in SUPPORTED_DTYPES:
                mode = int(self._open[i].header.mode)
                raise InputError(path, f"unsupported MRC mode {mode} (data type {data.dtype})")
            if data.ndim != 3:
                raise InputError(path, f"expected 2D images or a stack, found {data.ndim}D data")
            n, ny, nx = data.shape
            if ny != nx:
                raise InputError(path, f"images are not square ({nx}x{ny}); square images are required")
            if box is None:
                box, first, voxel_size = nx, path, float(self._open[i].voxel_size.x)
            elif nx != box:
                raise InputError(
                    self.table.path,
                    f"mixed box sizes: {first} is {box}x{box} but {path} is {nx}x{nx}",
                )
            if max_index[i] >= n:
                row = int(np.flatnonzero((self._stack_id == i) & (self._index >= n))[0])
                raise InputError(
                    self.table.path,
                    f"image {self._index[row] + 1} of {path} requested but the stack holds {n}",
                    row=row + 1,
                )
        assert box is not None
        log.debug("%d images in %d stacks, box %d", self.n, len(self.stacks), box)
        return box, voxel_size

    def _data(self, stack: int) -> np.ndarray:
        """The memory-mapped sections of a stack, keeping at most MAX_OPEN_STACKS files open."""
        mrc = self._open.get(stack)
        if mrc is None:
            mrc = _open_mrc(self.stacks[stack])
            self._open[stack] = mrc
            if len(self._open) > MAX_OPEN_STACKS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(stack)
        return _as_stack(mrc.data)

    def __len__(self) -> int:
        return self.n

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images for the given 0-based particle rows as float32 ``(len(rows), box, box)``.

        Rows are read grouped by stack, runs of consecutive sections as one slice.
        Non-finite pixel values raise InputError naming the stack and the particle row.
        """
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"particle rows must be in [0, {self.n})")
        out = np.empty((len(rows), self.box, self.box), dtype=np.float32)
        if not len(rows):
            return out
        stack, index = self._stack_id[rows], self._index[rows]
        order = np.lexsort((index, stack))
        in_order = bool(np.all(order == np.arange(len(rows))))
        stack, index = stack[order], index[order]
        breaks = np.flatnonzero((np.diff(stack) != 0) | (np.diff(index) != 1)) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            sections = self._data(int(stack[a]))[index[a] : index[a] + (b - a)]
            if in_order:
                out[a:b] = sections
            else:
                out[order[a:b]] = sections
            self._unreleased += mapped_bytes(sections.nbytes)  # what this run may have mapped
            if self._unreleased >= RELEASE_BYTES:  # keep the resident set flat (cdae_em.io.memory)
                release(*self.mapped())
                self._unreleased = 0
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            k = int(np.flatnonzero(~finite)[0])
            row = int(rows[k])
            raise InputError(
                self.stacks[self._stack_id[row]],
                f"image {self._index[row] + 1} has NaN or infinite pixel values",
                row=row + 1,
            )
        return out

    def batches(self, batch_size: int = 256, progress: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, images) for consecutive batches of particles in STAR order."""
        with tqdm(total=self.n, desc="reading images", unit="img", disable=None if progress else True) as bar:
            for start in range(0, self.n, batch_size):
                stop = min(start + batch_size, self.n)
                yield start, self.read(np.arange(start, stop))
                bar.update(stop - start)

    def mapped(self) -> list:
        """The memory maps of the open stacks (for ``cdae_em.io.memory.release``)."""
        return [mrc.data for mrc in self._open.values()]

    def close(self) -> None:
        """Close every open stack."""
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
