"""Benchmark data sets: particles simulated by ``cdae_em.simulate.simulator`` from the structures shipped in
``benchmarks/data/`` (see PROVENANCE.md there), under two protocols.

- ``paper``: the CDAE paper's Table 1/2 protocol: 4 fixed views, no in-plane rotation, no shifts,
  no CTF, SNR 0.1.
- ``realistic``: 12 fixed views, random in-plane rotation psi, random shifts (+-4 px), CTF with
  defocus 1-3 um, SNR 0.05.

None of the three proteins is 4JSV (mTOR), the protein of the default weights and map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

DATA = Path(__file__).resolve().parent / "data"

# name, file, description
PROTEINS = [
    ("1BHL", "1BHL.pdb.gz", "HIV-1 integrase catalytic domain (dimer, 1,048 atoms)"),
    ("2XHE", "2XHE.pdb.gz", "Unc18-syntaxin 1 complex, M. brevicollis (6,267 atoms)"),
    ("4ZHL", "4ZHL.cif.gz", "murinised human uPA with the peptide mupain-1-IG (2,030 atoms)"),
    ("1FAT", "1FAT.pdb.gz", "phytohemagglutinin-L tetramer, ~110 kDa (7,232 atoms)"),
]

PROTOCOLS = {
    "paper": dict(n_views=4, in_plane=False, max_shift=0.0, ctf=False, snr=0.1),
    "realistic": dict(n_views=12, in_plane=True, max_shift=4.0, ctf=True, snr=0.05),
}

FILL = 0.6  # the particle's largest diameter spans this fraction of the box


@dataclass
class Dataset:
    protein: str
    protocol: str
    dir: Path
    star: Path  # noisy particles
    noisy: np.ndarray  # (N, box, box) float32
    clean: np.ndarray
    views: np.ndarray  # (N,) 0-based true view
    pixel_size: float
    snr: float
    n_views: int

    @property
    def name(self) -> str:
        return f"{self.protein}/{self.protocol}"

    @property
    def sigma(self) -> float:
        """Standard deviation of the added noise (clean images have unit variance)."""
        return float(1.0 / np.sqrt(self.snr))


def structure_path(protein: str) -> Path:
    """The shipped atomic model of a benchmark structure (``PROTEINS``)."""
    return DATA / dict((p, f) for p, f, _ in PROTEINS)[protein]


def pixel_size_for(path: Path, box: int, fill: float = FILL) -> float:
    from cdae_em.simulate.structure import centre, read_atoms

    atoms = centre(read_atoms(path))
    radius = float(np.sqrt((atoms.xyz**2).sum(axis=1)).max())
    return round(2 * radius / (fill * box), 3)


def make_dataset(protein: str, protocol: str, n: int, box: int, work: Path, seed: int = 0) -> Dataset:
    """Simulate (or reuse) one data set under ``work/protein_protocol``."""
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
    from cdae_em.io.star import read_particles

    path = structure_path(protein)
    p = PROTOCOLS[protocol]
    px = pixel_size_for(path, box)
    out = work / f"{protein}_{protocol}_{n}_{box}"
    settings = SimulationSettings(n_particles=n, n_views=p["n_views"], in_plane=p["in_plane"],
                                  max_shift=p["max_shift"] * box / 64, ctf=p["ctf"],
                                  defocus_range=(10000.0, 30000.0), snrs=[p["snr"]], seed=seed)
    if not (out / "simulation.json").exists():
        simulate(load_source(path, box=box, pixel_size=px), settings, out)
    with mrcfile.open(out / "particles.mrcs", permissive=True) as m:
        noisy = np.array(m.data, dtype=np.float32)
    with mrcfile.open(out / "clean.mrcs", permissive=True) as m:
        clean = np.array(m.data, dtype=np.float32)
    views = read_particles(out / "truth.star").particles["rlnClassNumber"].to_numpy().astype(int) - 1
    return Dataset(protein, protocol, out, out / "particles.star", noisy, clean, views, px, p["snr"], p["n_views"])
