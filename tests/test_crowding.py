"""Crowding: a second particle just outside a particle (an aggregate) found by a matched filter."""

import numpy as np
import torch

from cdae_em.core.crowding import crowding, robust_z, rotational_template
from cdae_em.core.preprocess import translate

BOX, RADIUS = 48, 10.0


def blob(shift=(0.0, 0.0)) -> torch.Tensor:
    """A lopsided particle (two Gaussians) of radius ~RADIUS, shifted by (dx, dy)."""
    c = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    image = torch.exp(-((x - shift[0]) ** 2 + (y - shift[1]) ** 2) / (2 * 5.0**2))
    image += 0.5 * torch.exp(-((x - shift[0] - 4) ** 2 + (y - shift[1]) ** 2) / (2 * 3.0**2))
    return image


def test_a_partner_just_outside_the_particle_is_crowding_and_the_particle_alone_is_not():
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    n, n_aggregates = 120, 12
    images = blob()[None].repeat(n, 1, 1)
    for i in range(n_aggregates):  # a partner 1.3-1.8 radii away, in any direction
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(1.3, 1.8) * RADIUS
        images[i] += blob((distance * np.cos(angle), distance * np.sin(angle)))
    images = images + 0.5 * torch.randn(images.shape, generator=gen)
    # picked up to 2 px off-centre, which their alignment (psi, origin) undoes
    offsets = rng.uniform(-2, 2, (n, 2))
    picked = translate(images, offsets)
    psi, origin = np.zeros(n, np.float32), (-offsets).astype(np.float32)
    averages = blob()[None]
    z = crowding(picked.numpy(), averages, np.array([n]), psi, origin, RADIUS, batch_size=32)
    assert z.shape == (n,)
    assert z[:n_aggregates].min() > 4, z[:n_aggregates]
    assert np.mean(z[n_aggregates:] > 2.5) < 0.03  # the particles alone: the noise's maxima
    # the same through a partner-free class: contrast inverted, z-scores the same
    z_dark = crowding(-picked.numpy(), -averages, np.array([n]), psi, origin, RADIUS, batch_size=32)
    assert np.allclose(z, z_dark, atol=1e-4)


def test_the_template_is_the_rotational_average_of_the_count_weighted_averages():
    averages = torch.stack([blob(), torch.zeros(BOX, BOX)])
    one = rotational_template(averages, np.array([3, 0]), RADIUS)
    half = rotational_template(averages, np.array([1, 1]), RADIUS)
    c = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    r = torch.hypot(c[:, None], c[None, :])
    assert torch.allclose(one, one.T, atol=1e-5)  # the same along x and y: rotationally symmetric
    assert one[r > RADIUS + 1].abs().max() == 0 and abs(float(one.sum())) < 1e-3
    assert torch.allclose(half, one / 2, atol=1e-5)  # an empty class weighs in by its count
    assert float(one[BOX // 2, BOX // 2]) > 0  # the particle's own contrast


def test_robust_z_ignores_the_outliers_it_scores():
    values = np.r_[np.random.default_rng(0).normal(5.0, 2.0, 1000), [100.0, 200.0]]
    z = robust_z(values)
    assert abs(np.median(z)) < 0.01 and 0.9 < np.std(z[:1000]) < 1.1
    assert z[-2] > 40 and z[-1] > 80
    assert np.array_equal(robust_z(np.ones(5)), np.zeros(5))
