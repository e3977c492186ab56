"""Orientations in RELION's conventions.

Euler angles are RELION's ZYZ triple (rot, tilt, psi) in degrees. ``euler_to_matrix`` returns the
matrix A of RELION's ``Euler_angles2matrix``: a point r of the 3D map appears in the projection at
(A r)[:2], i.e. the projection image is P(x, y) = integral over z of map(A^T (x, y, z)).
"""

from __future__ import annotations

import numpy as np


def euler_to_matrix(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) for RELION Euler angles given in degrees (arrays of length N)."""
    a, b, g = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(np.broadcast(a, b, g).shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def even_views(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (rot, tilt) pairs spread evenly over the sphere (Fibonacci lattice), in degrees.

    Used for the fixed set of views of the CDAE paper's protocol: each view is one class.
    """
    if n < 1:
        raise ValueError("need at least one view")
    i = np.arange(n, dtype=np.float64) + 0.5
    tilt = np.rad2deg(np.arccos(1.0 - 2.0 * i / n))
    rot = np.mod(np.rad2deg(np.pi * (1.0 + 5.0**0.5) * i), 360.0)
    return rot, tilt


def random_views(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (rot, tilt) pairs drawn uniformly over the sphere, in degrees."""
    rot = rng.uniform(0.0, 360.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    return rot, tilt
