"""The working scale: particles larger than the weights were trained on are Fourier-cropped to the
scale of their training (``--scale auto``, the default), and the job's outputs for 3D work stay
at the native box and pixel size."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile
from conftest import run_cli

from cdae_em.core.prepare import TRAINED_BOX, TRAINED_FILL, estimate_particle_diameter, working_box
from cdae_em.io.images import ImageSource
from cdae_em.io.stacks import write_stack
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate


def _simulate(out, box: int, n: int = 120, snr: float = 0.1):
    """The same particles (views, shifts, CTF, noise seed) at ``box`` px: the default map fills the
    same fraction of any box."""
    settings = SimulationSettings(n_particles=n, n_views=3, in_plane=True, max_shift=2.0 * box / 64, ctf=True,
                                  snrs=[snr], seed=5)
    simulate(load_source(None, box=box), settings, out)
    return out / "particles.star"


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return {box: _simulate(root / f"s{box}", box) for box in (48, 144)}


def test_the_diameter_estimate_follows_the_particle_not_the_box(sims):
    with ImageSource(sims[48]) as small, ImageSource(sims[144]) as large:
        d_small, d_large = estimate_particle_diameter(small), estimate_particle_diameter(large)
    # the default map's particle spans about 0.55-0.6 of the box at any box
    assert 0.45 < d_small / 48 < 0.75 and 0.45 < d_large / 144 < 0.75, (d_small, d_large)
    assert d_large / d_small == pytest.approx(3.0, rel=0.15)


def test_no_estimate_from_noise_alone(tmp_path):
    rng = np.random.default_rng(0)
    write_stack(tmp_path / "noise.mrcs", rng.normal(size=(64, 96, 96)).astype(np.float32), 1.5)
    with ImageSource(tmp_path / "noise.mrcs") as noise:
        assert estimate_particle_diameter(noise) is None


@pytest.mark.parametrize("box, diameter, expected", [
    (200, 137.5, 64),  # the 17 real particles of tests/data/real (1.338 A/px): about 0.69 of the box
    (64, 40.0, 64),  # within the trained scale: as it is
    (64, 60.0, 48),  # just larger than trained: to the middle of the trained range too (an FFT-friendly box)
    (128, None, 128),  # unknown: as it is
    (256, 10.0, 256),  # smaller than trained: never padded
    (1024, 900.0, 50),  # the crop keeps the particle at the middle of the trained range
])
def test_working_box(box, diameter, expected):
    assert working_box(box, diameter) == expected
    if expected != box:
        assert TRAINED_FILL[0] * TRAINED_BOX <= diameter * expected / box <= TRAINED_FILL[1] * TRAINED_BOX


def test_run_works_at_the_trained_scale_and_writes_native_outputs(sims, small_weights, tmp_path):
    """`cdae-em run` on 144 px particles about 80 px across: denoised and classified in a smaller
    box (recorded in summary.json), the denoised particles written at that box with its pixel
    size; particles.star shifts in Angstrom and the class averages at 144 px and the input's pixel
    size. `--scale native` keeps the particles' box."""
    star = sims[144]
    base = ["--i", star, "--K", 3, "--weights", small_weights, "--iter", 1, "--j", 1]
    r = run_cli("run", "--o", tmp_path / "auto", *base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "working scale: particles" in r.stderr and "Fourier-cropped to a" in r.stderr
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    scale = summary["working_scale"]
    work = scale["working_box"]
    assert scale["native_box"] == 144 and work < 144 and summary["settings"]["denoise"]["box"] == work
    pixel = float(starfile.read(star, always_dict=True)["optics"]["rlnImagePixelSize"][0])
    denoised = starfile.read(tmp_path / "auto" / "denoised_particles.star", always_dict=True)
    assert float(denoised["optics"]["rlnImagePixelSize"][0]) == pytest.approx(pixel * 144 / work, rel=1e-6)
    with mrcfile.open(tmp_path / "auto" / "denoised" / "particles_00001.mrcs") as m:
        assert m.data.shape[-1] == work and m.voxel_size.x == pytest.approx(pixel * 144 / work, rel=1e-4)
    with mrcfile.open(tmp_path / "auto" / "class_averages.mrcs") as m:
        assert m.data.shape == (3, 144, 144) and m.voxel_size.x == pytest.approx(pixel, rel=1e-4)
    parts = starfile.read(tmp_path / "auto" / "particles.star", always_dict=True)["particles"]
    assert (parts["rlnImageName"] == starfile.read(star, always_dict=True)["particles"]["rlnImageName"]).all()
    assert np.abs(parts["rlnOriginXAngst"]).max() <= 144 / 8 * pixel + 1e-6  # within the search, in Angstrom

    r = run_cli("denoise", "--o", tmp_path / "native", "--scale", "native", "--i", star, "--weights", small_weights,
                "--j", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    with mrcfile.open(tmp_path / "native" / "denoised" / "particles_00001.mrcs") as m:
        assert m.data.shape[-1] == 144
    assert "working_scale" not in json.loads((tmp_path / "native" / "summary.json").read_text())
