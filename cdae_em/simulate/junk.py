"""Junk picks for simulations of a cleaning job: empty boxes of ice, carbon-film edges, aggregates
(2-3 particles overlapping) and fragments (part of a particle), equally often (``JUNK_KINDS``).

``draw_junk`` decides which rows are junk and draws what each needs, with its own generator, so the
particles among the junk are the images a simulation without junk draws. ``simulator.clean_images``
then calls ``add_partners_and_cuts`` on the projections (before shifts, B-factor and CTF, which
the junk goes through like the particles), ``junk_scale`` where it normalises (junk as strong as
the particles it is picked among) and ``fill_empty_boxes`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cdae_em.core.geometry import euler_to_matrix, random_views
from cdae_em.core.preprocess import translate
from cdae_em.simulate.realism import ice_and_carbon

#: truth.star's cdaeTrueKind: PARTICLE or one of JUNK_KINDS
JUNK_KINDS = ("ice", "carbon", "aggregate", "fragment")
PARTICLE = "particle"


@dataclass
class Junk:
    """Which rows of a simulation are junk, and what each junk row needs (arrays of length n)."""

    kind: np.ndarray  # PARTICLE or one of JUNK_KINDS
    partners: np.ndarray  # aggregates: (n, 2, 5) rot, tilt, psi, dx, dy of up to 2 more particles (NaN: none)
    cut: np.ndarray  # fragments: (n, 2) angle (radians) and offset (fraction of the box) of the cut


def draw_junk(n: int, fraction: float, seed: int, box: int) -> Junk:
    """``fraction`` of ``n`` rows made junk: their kind, the aggregates' partners (views and
    offsets 0.3-0.5 box away; half pairs, half triplets) and the fragments' cuts."""
    rng = np.random.default_rng([seed, 7919])
    junk = rng.random(n) < fraction
    kind = np.where(junk, np.asarray(JUNK_KINDS)[rng.integers(0, len(JUNK_KINDS), n)], PARTICLE)
    rot, tilt = random_views(2 * n, rng)
    psi = rng.uniform(0.0, 360.0, 2 * n)
    distance = rng.uniform(0.3, 0.5, 2 * n) * box
    direction = rng.uniform(0, 2 * np.pi, 2 * n)
    partners = np.stack([rot, tilt, psi, distance * np.cos(direction), distance * np.sin(direction)], 1).reshape(n, 2, 5)
    partners[rng.random(n) < 0.5, 1] = np.nan  # half the aggregates are pairs, half triplets
    cut = np.stack([rng.uniform(0, 2 * np.pi, n), rng.uniform(-0.1, 0.15, n)], 1)
    return Junk(kind, partners, cut)


def add_partners_and_cuts(source, junk: Junk, rows: slice, images: torch.Tensor) -> torch.Tensor:
    """``images`` (projections of ``rows`` by ``source``, before shifts and filters) with the
    aggregates' partners added and the fragments cut (a soft straight edge through the particle)."""
    kind = junk.kind[rows]
    box = images.shape[-1]
    for i in np.flatnonzero(kind == "aggregate"):
        for rot, tilt, psi, dx, dy in junk.partners[rows.start + i]:
            if np.isnan(rot):
                continue
            partner = source.project(euler_to_matrix(np.array([rot]), np.array([tilt]), np.array([psi])))
            # shifted in a box twice the size, then cut: a partner beyond the edge is lost, not
            # wrapped round to the opposite side
            padded = torch.nn.functional.pad(partner, (box // 2,) * 4)
            images[i] += translate(padded, np.array([[dx, dy]]))[0, box // 2:box // 2 + box, box // 2:box // 2 + box]
    fragments = np.flatnonzero(kind == "fragment")
    if len(fragments):
        c = (torch.arange(box, dtype=torch.float32) - box // 2) / box
        angle, offset = (torch.as_tensor(junk.cut[rows][fragments, j], dtype=torch.float32)[:, None, None] for j in (0, 1))
        d = torch.cos(angle) * c[None, None, :] + torch.sin(angle) * c[None, :, None] - offset
        images[fragments] = images[fragments] * torch.sigmoid(d * box / 1.5)
    return images


def junk_scale(std: torch.Tensor, junk: Junk, rows: slice) -> torch.Tensor:
    """The per-image scale (n, 1, 1) that normalises ``rows``: each particle's own standard
    deviation ``std``, the particles' mean for junk (an aggregate's parts each as strong as a
    particle), the junk's own where the rows hold no particle."""
    particle = torch.as_tensor(junk.kind[rows] == PARTICLE)
    if not particle.any():
        return std
    return torch.where(particle[:, None, None], std, std[particle].mean())


def fill_empty_boxes(images: torch.Tensor, junk: Junk, rows: slice, seed: int) -> torch.Tensor:
    """``images`` (normalised clean images of ``rows``) with the empty boxes replaced by an ice
    gradient, and a carbon edge where they are carbon, in units of the particles' contrast."""
    kind = junk.kind[rows]
    empty = np.flatnonzero(np.isin(kind, ("ice", "carbon")))
    if len(empty):
        box = images.shape[-1]
        rng = np.random.default_rng([seed, 7920, rows.start])
        carbon = kind[empty] == "carbon"
        background = ice_and_carbon(len(empty), box, rng, carbon_fraction=1.0, ice_amplitude=1.0)
        ice = ice_and_carbon(len(empty), box, rng, carbon_fraction=0.0, ice_amplitude=1.0)
        images[empty] = torch.where(torch.as_tensor(carbon)[:, None, None], background, ice)
    return images
