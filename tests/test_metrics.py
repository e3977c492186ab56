"""FRC and the half-set statistics of class averages (cdae_em.core.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from cdae_em.core.metrics import NO_RESOLUTION, HalfSetStats, frc, half_set_stats, radial_power, random_halves


def test_frc_of_an_image_with_itself_is_one_and_of_independent_noise_is_small():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 4, 32, 32))
    assert np.allclose(frc(a, a), 1.0)
    assert np.abs(frc(a, b)[2:]).max() < 0.3
    assert len(frc(a[0], b[0])) == 17


def test_radial_power_of_white_noise_is_flat():
    noise = np.random.default_rng(1).normal(size=(64, 32, 32))
    assert np.allclose(radial_power(noise).mean(axis=0)[1:], 1.0, atol=0.15)  # orthonormal FFT: unit power


def test_random_halves_split_every_class():
    labels = np.repeat([0, 1, 2], [5, 8, 1])
    half = random_halves(labels, 3)
    assert [int(half[labels == c].sum()) for c in range(3)] == [2, 4, 0]


def test_half_set_stats_identical_halves_reach_nyquist_and_noise_halves_do_not():
    rng = np.random.default_rng(2)
    signal = rng.normal(size=(32, 32))
    a = np.stack([signal, rng.normal(size=(32, 32))])
    b = np.stack([signal, rng.normal(size=(32, 32))])
    stats = half_set_stats(a, b, np.array([10, 10]), np.array([10, 0]), pixel_size=2.0)
    assert stats.resolution[0] == pytest.approx(32 * 2.0 / 16)  # Nyquist: 2 pixels
    assert stats.resolution[1] == NO_RESOLUTION  # an empty half: not estimated
    assert np.allclose(stats.noise, 0.0)  # the only class with two halves has identical ones
    back = HalfSetStats.from_json(stats.to_json())
    assert np.allclose(back.frc, stats.frc, atol=1e-4) and np.allclose(back.ssnr, stats.ssnr, rtol=1e-2)
    assert np.array_equal(back.resolution, stats.resolution)
