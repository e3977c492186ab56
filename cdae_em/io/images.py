"""The one image source: particle images addressed by STAR rows (a STAR file, a particle table, or
a bare MRC stack), read lazily in chunks, with the table's pixel size and CTF values attached.

Images are read through memory maps (``mrcfile.mmap``), so a data set of any size costs only two
small integers per particle in memory (which stack, which section). A ``transform`` turns what is
read into what a stage works on (e.g. ``core.prepare.prepared_images``: phase flip, working box,
equalisation); ``source[rows]`` applies it, ``source.read(rows)`` gives the images as stored.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mrcfile
import numpy as np
import pandas as pd
from tqdm import tqdm

from cdae_em.errors import InputError
from cdae_em.io.memory import RELEASE_BYTES, mapped_bytes, release
from cdae_em.io.stacks import SUPPORTED_DTYPES, as_stack, open_mrc
from cdae_em.io.star import CTF_COLUMNS, ParticleTable, new_particle_table, read_particles

log = logging.getLogger(__name__)

#: how many stacks are kept open (memory-mapped) at once
MAX_OPEN_STACKS = 64

#: (images, rows) -> images; may carry ``box`` (the box it returns) and ``ctf`` (|CTF| of its output)
Transform = Callable[[np.ndarray, np.ndarray], np.ndarray]




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


class ImageSource:
    """Particle images in STAR order, read lazily from any number of stacks; an array-like
    (``len``, ``shape``, ``source[rows]``) of what ``transform`` makes of them.

    ``source`` is a ParticleTable, a STAR file, or an MRC stack (then every section is a particle,
    at the header's voxel size). Relative image paths are resolved against ``project_dir``
    (default: the working directory, where RELION runs its jobs) and, failing that, against the
    STAR file's directory. All stacks are checked up front from their headers: present, valid, a
    supported mode, square images of one box size, and every requested image within its stack.
    """

    def __init__(
        self,
        source: ParticleTable | str | Path,
        project_dir: str | Path | None = None,
        column: str = "rlnImageName",
        transform: Transform | None = None,
    ):
        table = source if isinstance(source, ParticleTable) else particle_table(source)
        self.table = table
        self.transform = transform
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
            mrc = open_mrc(self.stacks[stack])
            self._open[stack] = mrc
            if len(self._open) > MAX_OPEN_STACKS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(stack)
        return as_stack(mrc.data)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int, int]:
        """(particles, box, box) of ``source[rows]``: the transform's box where it has one."""
        box = getattr(self.transform, "box", None) or self.box
        return (self.n, box, box)

    @property
    def ctf(self):
        """|CTF| of ``source[rows]`` where the transform phase-flipped them (else None)."""
        return getattr(self.transform, "ctf", None)

    @property
    def pixel_size(self) -> float:
        """Pixel size of the stored images, Angstrom (from the table; refused if missing or mixed)."""
        return self.table.pixel_size()

    def ctf_values(self) -> pd.DataFrame | None:
        """The CTF parameters of every particle (RELION labels), or None where any is missing."""
        per = self.table.per_particle()
        values = per[CTF_COLUMNS]
        return None if values.isna().any().any() else values

    def __getitem__(self, rows) -> np.ndarray:
        """The images of ``rows`` (0-based; an index, array or slice) as the transform makes them."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.n))
        rows = np.atleast_1d(np.asarray(rows))
        images = self.read(rows)
        return images if self.transform is None else self.transform(images, rows)

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


def particle_table(path: str | Path) -> ParticleTable:
    """The particle table of a STAR file, or of an MRC stack (one particle per section, the
    header's voxel size as pixel size), for ``ImageSource``."""
    path = Path(path)
    if path.suffix.lower() not in (".mrcs", ".mrc", ".st"):
        return read_particles(path)
    with open_mrc(path) as mrc:
        n, box = as_stack(mrc.data).shape[:2]
        pixel = float(mrc.voxel_size.x)
    if pixel <= 0:
        raise InputError(path, "the header has no pixel size (voxel size 0): give the particles as a STAR file")
    particles = pd.DataFrame({"rlnImageName": [f"{i}@{path}" for i in range(1, n + 1)], "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [pixel], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    return new_particle_table(particles, optics)
