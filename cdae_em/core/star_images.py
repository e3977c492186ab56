"""The images of a STAR file as an array-like (``len``, ``shape``, ``[rows]``), for classification:
as they are, as the denoiser saw them (phase flip, resize), or histogram-equalised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdae_em.settings import DenoiseSettings


class StarImages:
    """Images of a STAR file as an array-like (``len``, ``shape``, ``[rows]``) for classification."""

    def __init__(self, star: Path, project_dir: str | None, prepare: DenoiseSettings | None = None,
                 device=None, equalise_diameter: float | None = None):
        from cdae_em.core.prepare import BatchPreparer
        from cdae_em.io.stacks import ImageSource
        from cdae_em.io.star import read_particles

        table = read_particles(star)
        self.source = ImageSource(table, project_dir=project_dir)
        # the originals as the model saw them: phase flip and resizing as in ``prepare``
        self.prepare = None if prepare is None else BatchPreparer(table, prepare, self.source.box, device)
        box = self.prepare.box if self.prepare is not None else self.source.box
        # |CTF| of phase-flipped images, for CTF-aware classification (None when not phase-flipped)
        self.ctf = None if self.prepare is None else self.prepare.amplitudes()
        self.shape = (self.source.n, box, box)
        # histogram equalisation inside the particle mask (the paper's step before clustering)
        self.equalise_mask = None
        if equalise_diameter is not None:
            from cdae_em.core.preprocess import particle_mask

            self.equalise_mask = particle_mask(box, equalise_diameter or None)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.atleast_1d(np.asarray(rows))
        images = self.source.read(rows)
        if self.prepare is not None:
            images = self.prepare(images, rows).cpu().numpy()
        if self.equalise_mask is not None:
            import torch

            from cdae_em.core.preprocess import equalise_histogram

            images = equalise_histogram(torch.from_numpy(np.asarray(images, dtype=np.float32)), self.equalise_mask).numpy()
        return images

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.source.close()
