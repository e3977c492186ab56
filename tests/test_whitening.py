"""Noise whitening: measured on the particles' background per optics group, applied before
clustering and alignment (never to the images the job writes)."""

import json
import logging

import numpy as np
import starfile
import torch
from conftest import run_cli

from cdae_em.core.ctf import CtfAmplitudes, CtfParams
from cdae_em.core.noise import measure_whitening
from cdae_em.core.metrics import clustering_scores
from cdae_em.simulate.realism import REAL_NOISE, NoiseShape, coloured_noise
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

STRONG = NoiseShape(floor=0.05, falloff=0.08, bump=1.0)  # neighbouring pixels correlated ~0.5


def _tilt(x: torch.Tensor) -> float:
    """Mean noise power at low frequencies (0 < |f| < 0.15 cycles/px) over that at high ones
    (|f| > 0.3): 1 for white noise."""
    from cdae_em.simulate.realism import frequency_grid

    power = (torch.fft.rfft2(x).abs() ** 2).mean(0)
    f = frequency_grid(x.shape[-1])
    return float(power[(f > 0) & (f < 0.15)].mean() / power[f > 0.3].mean())


def _lag1(x: torch.Tensor) -> float:
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return float((x[..., :, 1:] * x[..., :, :-1]).mean() / (x**2).mean())


def test_each_optics_group_is_whitened_by_its_own_spectrum_and_keeps_its_variance():
    rng = np.random.default_rng(0)
    box, n = 48, 300
    noise = torch.cat([coloured_noise(n, box, REAL_NOISE, rng), coloured_noise(n, box, STRONG, rng)])
    groups = np.repeat(["1", "2"], n)
    whitening = measure_whitening(groups, lambda rows: noise[rows], box)
    assert whitening is not None and len(whitening.filters) == 2
    record = whitening.record["groups"]
    assert 0.1 < record["1"]["neighbour_correlation"] < 0.3 < record["2"]["neighbour_correlation"]
    rows = np.arange(2 * n)
    white = whitening.apply(noise, rows)
    for g in (slice(0, n), slice(n, 2 * n)):
        assert _lag1(noise[g]) > 0.1 and _tilt(noise[g]) > 3
        assert abs(_lag1(white[g])) < 0.03 and 0.85 < _tilt(white[g]) < 1.15
        assert 0.9 < float(white[g].var() / noise[g].var()) < 1.1
    # the other group's filter does not whiten this one
    assert _tilt(whitening.apply(noise[:n], np.full(n, n))) < 0.6
    # alignment weighs each group's signal by its filter relative to the mean one, as it does |CTF|
    params = CtfParams.from_table(__import__("pandas").DataFrame({
        "rlnDefocusU": np.full(2 * n, 15000.0), "rlnDefocusV": np.full(2 * n, 15000.0),
        "rlnDefocusAngle": np.zeros(2 * n), "rlnVoltage": np.full(2 * n, 300.0),
        "rlnSphericalAberration": np.full(2 * n, 2.7), "rlnAmplitudeContrast": np.full(2 * n, 0.1),
        "rlnPhaseShift": np.zeros(2 * n)}))
    plain = CtfAmplitudes(params, 2.0, box)[[0, n]]
    scaled = CtfAmplitudes(params, 2.0, box, (whitening.relative(), whitening.group))[[0, n]]
    relative = whitening.relative()
    assert np.allclose(scaled, plain * relative.numpy(), atol=1e-6)
    assert not np.allclose(relative[0], relative[1], atol=0.05)


def test_too_little_background_is_not_whitened_and_says_so(caplog):
    noise = coloured_noise(20, 8, REAL_NOISE, np.random.default_rng(1))
    with caplog.at_level(logging.WARNING):
        assert measure_whitening(np.zeros(20), lambda rows: noise[rows], 8, where="tiny.star") is None
    assert "tiny.star" in caplog.text and "not whitened" in caplog.text


def test_classification_whitens_by_default_and_says_so(tmp_path):
    """`cdae-em classify` on particles with a real detector's noise: whitened (the summary records the
    noise measured), or not with --no-whiten; the classes' agreement with the views either way."""
    simulate(load_source(None, box=32), SimulationSettings(n_particles=120, n_views=2, in_plane=True, ctf=True,
                                                          snrs=[0.5], noise=REAL_NOISE, seed=4), tmp_path / "sim")
    star = tmp_path / "sim" / "particles.star"
    for flags, whitened in (((), True), (("--no-whiten",), False)):
        out = tmp_path / f"out_{whitened}"
        done = run_cli("classify", "--i", star, "--o", out, "--K", 2, "--iter", 2, "--j", 1, *flags)
        assert done.returncode == 0, done.stderr
        record = json.loads((out / "summary.json").read_text())["whitening"]
        assert record["whitened"] is whitened
        if whitened:
            assert 0.1 < record["groups"]["0"]["neighbour_correlation"] < 0.35
            assert "not whitened" in record["domain"]
            assert "noise whitening" in done.stderr
        else:
            assert record["why"] == "--no-whiten"
        truth = starfile.read(tmp_path / "sim" / "truth.star")["particles"]["rlnClassNumber"].to_numpy()
        labels = starfile.read(out / "particles.star")["particles"]["rlnClassNumber"].to_numpy()
        assert clustering_scores(truth, labels)["hungarian_f1"] > 0.9
