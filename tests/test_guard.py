"""The hallucination guard: a self-check that correlated noise cannot fool (SURE with the noise's
measured covariance), and the job that writes the best reference filter's output, not the
model's, when the model loses to it."""

import json

import mrcfile
import numpy as np
import pytest
import starfile
import torch
import torch.nn.functional as F
from conftest import run_cli

from cdae_em.core.noise import NoiseModel, estimate_noise
from cdae_em.denoise.selfcheck import filter_images, reference_kernels, scores
from cdae_em.simulate.realism import REAL_NOISE
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    """Particles with a real detector's noise (neighbouring pixels correlated 0.2), B-factor 100,
    CTF, SNR 0.05: noisy and clean images."""
    out = tmp_path_factory.mktemp("coloured")
    simulate(load_source(None, box=48), SimulationSettings(n_particles=256, in_plane=True, ctf=True, snrs=[0.05],
                                                           noise=REAL_NOISE, bfactor=100.0, seed=3), out)
    return (torch.from_numpy(mrcfile.read(out / "particles.mrcs").copy()),
            torch.from_numpy(mrcfile.read(out / "clean.mrcs").copy()))


def _one_pixel_check(f, noisy: torch.Tensor) -> float:
    """The check as it was: one pixel hidden (filled with its 4 neighbours' mean)."""
    cross = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]])
    var = noisy.var(dim=(-2, -1), keepdim=True)
    errors = []
    for dy, dx in ((0, 0), (1, 1)):
        mask = torch.zeros(noisy.shape[-2:], dtype=torch.bool)
        mask[dy::4, dx::4] = True
        fill = F.conv2d(F.pad(noisy[:, None], (1, 1, 1, 1), mode="reflect"), cross[None, None])[:, 0]
        hidden = torch.where(mask, fill, noisy)
        errors.append((((f(hidden) - noisy) ** 2) / var)[:, mask].reshape(-1))
    return float(torch.cat(errors).mean())


def test_self_check_ranks_denoisers_as_their_true_error_does_on_coloured_noise(coloured):
    noisy, clean = coloured
    k = reference_kernels()
    texture = torch.from_numpy(np.random.default_rng(0).standard_normal(noisy.shape).astype(np.float32)).clamp(-1, 1)
    blur = lambda s: (lambda x: filter_images(x, k[f"gaussian blur {s} px"]))  # noqa: E731
    candidates = {"blur 1": blur(1), "blur 1.5": blur(1.5), "blur 2": blur(2), "blur 3": blur(3),
                  "inventor": lambda x: blur(2)(x) + 0.5 * texture}  # a blur that paints texture
    centred = lambda t: t - t.mean(dim=(-2, -1), keepdim=True)  # noqa: E731
    corr = lambda a, b: float(((centred(a) * centred(b)).sum((-2, -1))  # noqa: E731
                               / (centred(a).norm(dim=(-2, -1)) * centred(b).norm(dim=(-2, -1)))).mean())
    truth = {n: corr(f(noisy), clean) for n, f in candidates.items()}
    noise = estimate_noise(noisy)
    assert 0.12 < noise.describe()["neighbour_correlation"] < 0.25  # the simulated detector's 0.2
    check = {n: float(e.mean()) for n, e in scores(candidates, noisy, noise, batch_size=len(noisy)).items()}
    by = lambda found: sorted(found, key=found.get)  # noqa: E731
    assert by(check) == by(truth), (truth, check)
    assert all(abs(check[n] - truth[n]) < 0.03 for n in truth), (truth, check)  # measured: within 0.015
    # assuming white noise instead (what a check blind to the correlation does) overrates narrow filters,
    # whose output carries the correlated noise: by far more than the measured noise model does
    white = NoiseModel(noise.variance, torch.zeros_like(noise.correlation), white=True)
    white.correlation[white.correlation.shape[0] // 2, white.correlation.shape[1] // 2] = 1.0
    fooled = {n: float(e.mean()) for n, e in scores(candidates, noisy, white, batch_size=len(noisy)).items()}
    assert fooled["blur 1"] - check["blur 1"] > 0.05, (check, fooled)
    old = {n: _one_pixel_check(f, noisy) for n, f in candidates.items()}
    # so was the blind-spot check that hid one pixel: it prefers the narrow blur, the truth the wide one
    old = {n: _one_pixel_check(f, noisy) for n, f in candidates.items()}
    assert old["blur 1.5"] < old["blur 3"] and truth["blur 3"] < truth["blur 1.5"], (old, truth)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard_sim")
    simulate(load_source(None, box=32), SimulationSettings(n_particles=40, n_views=3, in_plane=True, ctf=True,
                                                           snrs=[0.1], noise=REAL_NOISE, seed=4), out)
    return out / "particles.star"


def _stack(out) -> np.ndarray:
    return mrcfile.read(out / "denoised" / "particles_00001.mrcs")


def test_a_model_that_loses_to_a_blur_is_not_written(sim, small_weights, tmp_path):
    """Untrained weights: the guard writes the best reference filter's output (and says so in the
    log, summary.json and status.json); --force-model writes the model's."""
    common = ["--i", sim, "--weights", small_weights, "--j", 1, "--scale", "native", "--no-phase-flip"]
    r = run_cli("denoise", "--o", tmp_path / "guarded", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.loads((tmp_path / "guarded" / "summary.json").read_text())["denoise"]["selfcheck"]
    assert check["verdict"] == "reference" and check["written"] == check["best_reference"]
    assert check["correlation"]["model"] < check["references"][check["best_reference"]]
    lines = [line for line in r.stderr.splitlines() if "denoiser self-check:" in line and "WARNING" in line]
    assert len(lines) == 1 and check["best_reference"] in lines[0] and "--force-model" in lines[0]
    # 40 particles of 32 px: too little background to measure the noise's correlation; said so
    assert check["noise"].startswith("white") and "assumes white noise" in r.stderr
    status = json.loads((tmp_path / "guarded" / "status.json").read_text())
    assert any(check["best_reference"] in w for w in status["warnings"])
    # what was written is the reference filter of the input, not the model's output
    inputs = torch.from_numpy(mrcfile.read(sim.parent / "particles.mrcs").copy())
    expected = filter_images(inputs, reference_kernels()[check["best_reference"]]).numpy()
    assert np.allclose(_stack(tmp_path / "guarded"), expected, atol=1e-4)

    forced = run_cli("denoise", "--o", tmp_path / "forced", *common, "--force-model")
    assert forced.returncode == 0, forced.stderr[-2000:]
    fcheck = json.loads((tmp_path / "forced" / "summary.json").read_text())["denoise"]["selfcheck"]
    assert fcheck["verdict"] == "reference" and fcheck["written"] == "model"
    assert "--force-model" in fcheck["warning"]
    assert not np.allclose(_stack(tmp_path / "forced"), expected, atol=1e-2)


def test_run_classifies_what_the_guard_wrote(sim, small_weights, tmp_path):
    r = run_cli("run", "--i", sim, "--o", tmp_path / "job", "--weights", small_weights, "--K", 3, "--iter", 1,
                "--j", 1, "--scale", "native")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["denoise"]["selfcheck"]["written"] != "model"
    assert len(starfile.read(tmp_path / "job" / "particles.star")["particles"]) == 40
