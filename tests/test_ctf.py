"""CTF values and phase flipping."""

import math

import numpy as np
import torch

from cdae_em.core.ctf import CtfParams, apply_filter, ctf_2d, electron_wavelength, phase_flip


def params(n=1, du=20000.0, dv=None, angle=0.0, cs=0.0, q0=0.1, phase=0.0):
    dv = du if dv is None else dv
    full = lambda v: np.full(n, v, dtype=float)  # noqa: E731
    return CtfParams(full(du), full(dv), full(angle), full(300.0), full(cs), full(q0), full(phase))


def test_wavelength_300kv():
    assert abs(float(electron_wavelength(300.0)) - 0.019687) < 1e-5


def test_first_zero_where_theory_puts_it():
    box, px, dz, q0 = 256, 1.0, 20000.0, 0.1
    ctf = ctf_2d(params(du=dz, q0=q0), box, px)[0, 0]  # along +x (fy = 0)
    assert ctf[0] > 0  # underfocus: positive at low frequency (sin of the amplitude-contrast phase)
    assert abs(float(ctf[0]) - q0) < 1e-3
    lam = float(electron_wavelength(300.0))
    s_zero = math.sqrt((math.pi - math.atan(q0 / math.sqrt(1 - q0**2))) / (math.pi * lam * dz))
    first_sign_change = int(torch.nonzero(ctf < 0)[0]) / (box * px)
    assert abs(first_sign_change - s_zero) < 1.5 / (box * px)


def test_astigmatism_angle_selects_defocus_u():
    box = 128
    # defocus U along the x axis (angle 0) vs along y (angle 90): the two CTFs swap axes
    a = ctf_2d(params(du=15000.0, dv=25000.0, angle=0.0), box, 1.0)[0]
    b = ctf_2d(params(du=15000.0, dv=25000.0, angle=90.0), box, 1.0)[0]
    along_x_a, along_y_b = a[0, : box // 2], b[: box // 2, 0]
    assert torch.allclose(along_x_a, along_y_b, atol=1e-5)
    assert not torch.allclose(a[0, : box // 2], a[: box // 2, 0], atol=1e-2)


def test_phase_flip_is_its_own_inverse_and_keeps_amplitudes():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((3, 64, 64), generator=gen)
    ctf = ctf_2d(params(n=3, du=18000.0, dv=21000.0, angle=30.0, cs=2.7), 64, 1.5)
    twice = phase_flip(phase_flip(images, ctf), ctf)
    assert torch.allclose(twice, images, atol=1e-4)
    flipped = phase_flip(apply_filter(images, ctf), ctf)
    expected = apply_filter(images, ctf.abs())
    assert torch.allclose(flipped, expected, atol=1e-4)
    # the sign pattern of the flipped image's transfer function is non-negative everywhere
    assert torch.all(torch.sign(ctf) * ctf >= 0)


def test_phase_flip_from_star_ctf_columns(tmp_path):
    """CTF columns of a simulated STAR, read back, phase-flip its particles to |CTF| modulation."""
    import mrcfile

    from cdae_em.core.geometry import euler_to_matrix
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
    from cdae_em.io.star import read_particles

    source = load_source(None, box=32)
    settings = SimulationSettings(n_particles=6, ctf=True, astigmatism=2000.0, snrs=[None], seed=4)
    simulate(source, settings, tmp_path)
    table = read_particles(tmp_path / "truth.star")
    per = table.per_particle()
    ctf = ctf_2d(CtfParams.from_table(per), 32, per["rlnImagePixelSize"].to_numpy())
    flipped = phase_flip(torch.as_tensor(mrcfile.read(tmp_path / "clean.mrcs")), ctf)
    parts = table.particles
    projections = source.project(euler_to_matrix(parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"]))
    expected = apply_filter(projections, ctf.abs())
    for a, b in zip(flipped, expected):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
