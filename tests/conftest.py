"""Shared test helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

# --- particle data (tests of star.py, stacks.py and `cdae-em check`) -------------------------------

PARTICLE_BOX = 16


class ParticleProject:
    """A tiny RELION project on disk: MRC stacks with known, distinct images and STAR files.

    Every image is integer-valued (exact in float16 and int16) and unique to (stack_no, index),
    so a test can tell exactly which image it got back.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def image(stack_no: int, index: int, box: int = PARTICLE_BOX) -> np.ndarray:
        """The known content of image ``index`` (0-based) of stack ``stack_no``."""
        yy, xx = np.mgrid[:box, :box]
        return (stack_no * 100 + index + (3 * yy + xx) % 7 - 3).astype(np.float32)

    def add_stack(
        self, rel: str, stack_no: int, n: int, dtype: str = "float32", box: int | tuple = PARTICLE_BOX
    ) -> Path:
        """Write a stack of ``n`` known images (n=0: a single 2D image) at ``root/rel``."""
        ny, nx = (box, box) if isinstance(box, int) else box
        images = np.stack([self.image(stack_no, i, max(ny, nx))[:ny, :nx] for i in range(max(n, 1))])
        data = images[0] if n == 0 else images
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.new(path, data=data.astype(dtype), overwrite=True) as mrc:
            if n and path.suffix == ".mrcs":
                mrc.set_image_stack()
            mrc.voxel_size = 1.77
        return path

    def write_star(self, rel: str, names: list[str], groups: list[int] | None = None, n_optics: int = 2) -> Path:
        """A RELION 3.1 particle STAR file, laid out as RELION writes it, at ``root/rel``."""
        groups = groups if groups is not None else [i % n_optics + 1 for i in range(len(names))]
        lines = ["", "# version 30001", "", "data_optics", "", "loop_ "]
        optics_labels = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
                         "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
        lines += [f"_{label} #{i} " for i, label in enumerate(optics_labels, 1)]
        for g in range(1, n_optics + 1):
            lines.append(f"opticsGroup{g} {g:12d}   300.000000     2.700000     0.100000     1.770000 "
                         f"{PARTICLE_BOX:12d}            2 ")
        lines += [" ", "", "# version 30001", "", "data_particles", "", "loop_ "]
        particle_labels = ["rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName",
                           "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
        lines += [f"_{label} #{i} " for i, label in enumerate(particle_labels, 1)]
        for i, (name, group) in enumerate(zip(names, groups)):
            lines.append(f"  {100.0 + i:11.6f}  {200.0 + i:11.6f} {name} MotionCorr/job002/Movies/mic1.mrc "
                         f"{group:12d} {10000.0 + i:12.6f} {9800.0 + i:12.6f}    12.500000 ")
        lines += [" ", ""]
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
        return path

    def standard(self) -> tuple[Path, np.ndarray]:
        """Four stacks (float32 and float16 .mrcs, int16 .mrcs, 3D .mrc) and a 2D .mrc, referenced
        in shuffled order by ``Select/job010/particles.star`` with paths relative to the project.

        Returns the STAR path and the expected images in STAR order.
        """
        stacks = [("Extract/job005/Movies/mic1.mrcs", 10, "float32"),
                  ("Extract/job005/Movies/mic2.mrcs", 8, "float16"),
                  ("Extract/job005/Movies/mic3.mrcs", 6, "int16"),
                  ("Extract/job005/Movies/mic4.mrc", 5, "float32"),
                  ("Extract/job005/Movies/single.mrc", 0, "float32")]
        refs = []
        for s, (rel, n, dtype) in enumerate(stacks):
            self.add_stack(rel, s, n, dtype)
            refs += [(s, i, f"{i + 1:06d}@{rel}") for i in range(n)] if n else [(s, 0, rel)]
        order = np.random.default_rng(0).permutation(len(refs))
        refs = [refs[k] for k in order]
        star = self.write_star("Select/job010/particles.star", [name for _, _, name in refs])
        expected = np.stack([self.image(s, i) for s, i, _ in refs])
        return star, expected


@pytest.fixture
def particle_project(tmp_path) -> ParticleProject:
    """An empty ParticleProject in a temporary directory."""
    return ParticleProject(tmp_path / "project")


@pytest.fixture(scope="session")
def make_particle_project():
    """ParticleProject itself, for fixtures that are not function-scoped."""
    return ParticleProject


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cdae-em ARGS`` as a user would (a new process), capturing its output."""
    return subprocess.run([sys.executable, "-m", "cdae_em", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory):
    """Untrained small cascade weights: for tests of the plumbing (test_cascade tests the learning)."""
    import torch

    from cdae_em.denoise.cascade import Cascade
    from cdae_em.denoise.weights import save_weights

    path = tmp_path_factory.mktemp("weights") / "small.pt"
    torch.manual_seed(0)
    save_weights(Cascade(channels=(8, 16, 16), dropout=0.1), path, {"command": "test"})
    return path
