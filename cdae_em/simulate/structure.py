"""Atomic models as sums of Gaussian atoms: density maps and analytic projections (the models
themselves are read by ``cdae_em.simulate.atomic_models``, whose ``Atoms``, ``read_atoms`` and ``centre`` are
re-exported here).

Used to build the embedded default map and to simulate particles of known structure for tests.
Each atom is an isotropic 3D Gaussian with sigma = 0.225 * resolution (UCSF Chimera molmap's
convention) and scattering weight Z (its atomic number; hydrogens are dropped).

Geometry follows ``cdae_em.core.geometry``: a point r (Angstrom, relative to the box centre) sits at
voxel index ``n // 2 + r / pixel_size`` on each axis, with x on the last array axis; a rotation
matrix A sends it to (A r)[:2] in the projection image.

Scale: every 1D Gaussian factor is normalised so that its *sampled* values sum to 1 over the
(unbounded) pixel lattice, not by the continuous formula 1 / (sqrt(2 pi) sigma). So the voxels of
one atom sum to its weight exactly, whatever its sub-voxel position and however narrow the Gaussian
(the continuous formula would be off by a few percent for sigma below a voxel), and the z-sum of
``atoms_to_map`` equals ``project_atoms`` for the identity rotation. Values are "weight per voxel"
(the density integrated over the voxel), so the projection is the line integral in voxel units.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cdae_em.simulate.atomic_models import Atoms, centre, read_atoms  # noqa: F401 (re-exported: the model API in one place)

log = logging.getLogger(__name__)

#: Chimera molmap's sigma per Angstrom of resolution.
SIGMA_PER_RESOLUTION = 0.225


# --------------------------------------------------------------------------------------------
# Densities


def _sigma_voxels(pixel_size: float, resolution: float | None) -> float:
    """Gaussian sigma in voxels for a resolution in Angstrom (default 2 * pixel_size)."""
    if pixel_size <= 0:
        raise ValueError(f"pixel size must be positive, got {pixel_size}")
    if resolution is None:
        resolution = 2.0 * pixel_size
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return SIGMA_PER_RESOLUTION * resolution / pixel_size


def _profiles(u: torch.Tensor, box: int, s: float) -> torch.Tensor:
    """1D Gaussian factors (..., box) centred at voxel positions ``u`` (...), each summing to 1
    over the unbounded lattice (so an atom near the edge loses what falls outside the box).

    Only the voxels within 8 sigma of each centre are evaluated (beyond, exp(-32) is negligible),
    then scattered into place: a few times faster than evaluating the whole box.
    """
    half = int(np.ceil(8.0 * s)) + 1
    base = torch.floor(u).unsqueeze(-1)
    idx = base + torch.arange(-half, half + 1, dtype=u.dtype)  # (..., 2 * half + 1) voxel indices
    vals = torch.exp(-0.5 * ((idx - u.unsqueeze(-1)) / s) ** 2)
    vals = vals / vals.sum(-1, keepdim=True)
    # voxels outside the box go to two spill columns (0 and box + 1), dropped at the end
    col = (idx + 1).clamp_(0, box + 1).to(torch.int64)
    out = torch.zeros(u.shape + (box + 2,), dtype=u.dtype)
    out.scatter_add_(-1, col, vals)
    return out[..., 1:box + 1]


def _check_box(atoms: Atoms, box: int, pixel_size: float, what: str, radius: np.ndarray) -> None:
    """Warn when atoms fall outside the box (their density is then cut off)."""
    if box < 1:
        raise ValueError(f"box must be positive, got {box}")
    half = (box // 2) * pixel_size
    outside = int((radius > half).sum())
    if outside:
        log.warning("%s: %d of %d atoms lie outside the %d-voxel box at %.3g A/pixel",
                    what, outside, len(atoms), box, pixel_size)


def atoms_to_map(atoms: Atoms, box: int, pixel_size: float,
                 resolution: float | None = None, max_elements: int = 2**22) -> np.ndarray:
    """Density map (box, box, box) float32, indexed [z, y, x], of Gaussian atoms.

    Each atom contributes weight * gz (x) gy (x) gx with sampled 1D Gaussians of sigma
    0.225 * resolution, each normalised to sum 1 over the lattice: the voxels of an atom inside the
    box sum to its weight. Evaluated separably, a chunk of atoms per matrix product
    (``max_elements`` bounds the chunk's (atoms, box^2) outer-product array).
    """
    s = _sigma_voxels(pixel_size, resolution)
    _check_box(atoms, box, pixel_size, "atoms_to_map", np.abs(atoms.xyz).max(1) if len(atoms) else
               np.zeros(0))
    u = torch.from_numpy(box // 2 + atoms.xyz / pixel_size)  # (N, 3): x, y, z voxel positions
    w = torch.from_numpy(atoms.weight)
    out = torch.zeros((box, box * box), dtype=torch.float64)
    chunk = max(1, min(4096, max_elements // (box * box)))
    for start in range(0, len(atoms), chunk):
        g = _profiles(u[start:start + chunk], box, s)  # (n, 3, box)
        gyx = (g[:, 1, :, None] * g[:, 0, None, :]).reshape(len(g), box * box)
        out += (g[:, 2] * w[start:start + chunk, None]).T @ gyx
    return out.reshape(box, box, box).numpy().astype(np.float32)


def project_atoms(atoms: Atoms, matrices: np.ndarray, box: int, pixel_size: float,
                  resolution: float | None = None, max_elements: int = 2**22) -> np.ndarray:
    """Projections (M, box, box) float32, indexed [view, y, x], of the atoms rotated by each A.

    Analytic: an atom at r lands at (A r)[:2] as a 2D Gaussian of the map's sigma and weight, so the
    projection equals the z-sum of ``atoms_to_map`` of the rotated atoms (the line integral in voxel
    units). Image = Gy^T diag(w) Gx, batched over views with torch matmuls; ``max_elements`` bounds
    the size of the per-chunk factor arrays.
    """
    mats = np.asarray(matrices, dtype=np.float64)
    if mats.ndim == 2:
        mats = mats[None]
    if mats.shape[1:] != (3, 3):
        raise ValueError(f"expected rotation matrices of shape (M, 3, 3), got {mats.shape}")
    s = _sigma_voxels(pixel_size, resolution)
    n_views, n_atoms = len(mats), len(atoms)
    _check_box(atoms, box, pixel_size, "project_atoms", np.linalg.norm(atoms.xyz, axis=1))
    out = torch.zeros((n_views, box, box), dtype=torch.float64)
    if n_atoms == 0:
        return out.numpy().astype(np.float32)
    view_chunk = max(1, min(n_views, max_elements // (box * min(n_atoms, 4096))))
    atom_chunk = max(1, min(n_atoms, max_elements // (box * view_chunk)))
    xyz_all = torch.from_numpy(atoms.xyz).to(torch.float32)
    w = torch.from_numpy(atoms.weight).to(torch.float32)
    for v0 in range(0, n_views, view_chunk):
        rot = torch.from_numpy(mats[v0:v0 + view_chunk, :2, :]).to(torch.float32)  # (V, 2, 3)
        acc = torch.zeros((len(rot), box, box), dtype=torch.float64)
        for a0 in range(0, n_atoms, atom_chunk):
            xyz = xyz_all[a0:a0 + atom_chunk]
            u = box // 2 + torch.einsum("vij,nj->vni", rot, xyz) / pixel_size  # (V, n, 2)
            g = _profiles(u, box, s)  # (V, n, 2, box): x then y factors
            gy = g[:, :, 1] * w[a0:a0 + atom_chunk, None]
            acc += torch.bmm(gy.transpose(1, 2), g[:, :, 0]).to(torch.float64)
        out[v0:v0 + len(rot)] = acc
    return out.numpy().astype(np.float32)
