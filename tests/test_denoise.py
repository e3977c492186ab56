"""`cdae-em denoise` end to end on simulated STAR files, as a user runs it."""

import json

import mrcfile
import numpy as np
import pytest
import starfile
from conftest import run_cli

from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    settings = SimulationSettings(n_particles=60, n_views=3, in_plane=True, max_shift=1.0, ctf=True,
                                  snrs=[0.3], seed=3)
    simulate(load_source(None, box=32), settings, out)
    return out / "particles.star"


def test_denoise_writes_stacks_and_star_keeping_every_column(particles, small_weights, tmp_path):
    before = particles.read_bytes()
    out = tmp_path / "den"
    r = run_cli("denoise", "--i", particles, "--o", out, "--weights", small_weights, "--k", 5, "--epochs", 1,
                "--finetune", "--finetune-subset", 30, "--phase-flip", "--equalise", "--j", 2)
    assert r.returncode == 0, r.stderr
    assert particles.read_bytes() == before  # input untouched
    star_in = starfile.read(particles)
    star_out = starfile.read(out / "denoised_particles.star")
    p_in, p_out = star_in["particles"], star_out["particles"]
    assert len(p_out) == len(p_in)
    assert set(p_in.columns) <= set(p_out.columns)
    assert (p_out["rlnImageOriginalName"] == p_in["rlnImageName"]).all()
    for col in ("rlnDefocusU", "rlnDefocusV"):
        assert np.allclose(p_out[col], p_in[col])
    assert int(star_out["optics"]["rlnCtfDataArePhaseFlipped"].iloc[0]) == 1
    stacks = sorted((out / "denoised").glob("*.mrcs"))
    assert len(stacks) == 1
    with mrcfile.open(stacks[0]) as m:
        assert m.data.shape == (60, 32, 32) and np.isfinite(m.data).all()
        assert np.isclose(float(m.voxel_size.x), float(star_out["optics"]["rlnImagePixelSize"].iloc[0]), atol=1e-3)
        # --equalise: flat histogram on [-0.5, 0.5] inside the mask, 0 outside
        assert m.data.min() >= -0.5 and m.data.max() <= 0.5 and m.data.max() > 0.45
        assert m.data[:, 0, 0].max() == 0
    assert not (out / ".cdae_work").exists()
    # its size was measured and logged before it went
    summary = json.loads((out / "summary.json").read_text())["denoise"]
    assert summary["work_bytes"] >= 3 * 60 * 32 * 32 * 4  # input, a block's input and output at once
    assert "GB at most during denoising" in r.stderr and "removing" in r.stderr
    with open(out / "denoised_pairs.png", "rb") as f:  # raw / denoised pairs to look at
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "block 3" in r.stderr and "fine-tune" in r.stderr


def test_run_keep_work_keeps_the_work_arrays(particles, small_weights, tmp_path):
    out = tmp_path / "job"
    r = run_cli("run", "--i", particles, "--o", out, "--K", 2, "--weights", small_weights, "--no-finetune",
                "--iter", 1, "--keep-work")
    assert r.returncode == 0, r.stderr
    assert (out / ".cdae_work" / "input.npy").exists() and "(kept: --keep-work)" in r.stderr
    assert (out / "particles.star").exists()


def test_denoised_names_resolve_from_the_project_directory(particles, small_weights, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    r = run_cli("denoise", "--i", particles, "--o", "Denoise/job001", "--weights", small_weights, "--no-finetune",
                "--box", 16, "--no-equalise", cwd=project)
    assert r.returncode == 0, r.stderr
    star = starfile.read(project / "Denoise/job001/denoised_particles.star")
    name = star["particles"]["rlnImageName"].iloc[5]
    index, path = name.split("@")
    assert path == "Denoise/job001/denoised/particles_00001.mrcs" and int(index) == 6
    with mrcfile.open(project / path) as m:
        assert m.data.shape == (60, 16, 16)
    # Fourier cropping to 16 px doubles the pixel size, in the optics table and the stack header
    px_in = float(starfile.read(particles)["optics"]["rlnImagePixelSize"].iloc[0])
    assert np.isclose(float(star["optics"]["rlnImagePixelSize"].iloc[0]), 2 * px_in, atol=1e-4)
    assert int(star["optics"]["rlnImageSize"].iloc[0]) == 16


def test_too_few_particles_for_k(particles, small_weights, tmp_path):
    r = run_cli("denoise", "--i", particles, "--o", tmp_path / "o", "--weights", small_weights, "--k", 60,
                "--finetune")
    assert r.returncode != 0 and "too few" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "denoised_particles.star").exists()


def test_bad_weights_file(particles, tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a weights file")
    r = run_cli("denoise", "--i", particles, "--o", tmp_path / "o", "--weights", bad)
    assert r.returncode != 0 and "junk.pt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "denoised_particles.star").exists()


def test_blank_images_pass_through_and_never_train(particles, small_weights, tmp_path):
    """Blank boxes (all pixels equal) do not stop the job: each is written back unchanged (no
    equalisation), every output stays row-aligned, and one warning names how many and which rows."""
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(particles.parent, work)
    with mrcfile.open(work / "particles.mrcs", mode="r+") as m:
        m.data[7] = 1.5
        m.data[40] = 0.0
        raw = np.array(m.data)
    r = run_cli("denoise", "--i", work / "particles.star", "--o", tmp_path / "o", "--weights", small_weights,
                "--neighbours", 5, "--epochs", 1, "--finetune", "--finetune-subset", 30)
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "WARNING" in line and "blank" in line]
    assert len(warning) == 1 and "2 blank image(s)" in warning[0] and "row(s) 8, 41" in warning[0], warning
    denoised = mrcfile.read(tmp_path / "o" / "denoised" / "particles_00001.mrcs")
    assert len(denoised) == 60
    assert np.array_equal(denoised[7], raw[7]) and np.array_equal(denoised[40], raw[40])
    assert denoised[8].std() > 0 and np.isfinite(denoised).all()
    star = starfile.read(tmp_path / "o" / "denoised_particles.star")["particles"]
    assert list(star["rlnImageOriginalName"]) == list(starfile.read(work / "particles.star")["particles"]["rlnImageName"])


def test_blank_images_are_never_neighbours(tmp_path):
    """The kNN targets are found among the valid rows only (features in memory or in a work array)."""
    import torch

    from cdae_em.settings import DenoiseSettings
    from cdae_em.denoise.finetune import neighbour_targets

    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 32, 32)).astype(np.float32)
    images[[3, 17]] = 0.0  # blank: if one were a neighbour, a mean would be pulled towards zero
    valid = np.setdiff1d(np.arange(30), [3, 17])
    settings = DenoiseSettings(k=27, psi_step=30.0)
    targets = neighbour_targets(images, valid, settings, torch.device("cpu"), valid=valid).numpy()
    on_disk = neighbour_targets(images, valid, settings, torch.device("cpu"), valid=valid, work=tmp_path).numpy()
    assert np.array_equal(targets, on_disk) and not (tmp_path / "features.npy").exists()
    # with k = all other valid rows, every target is built from the 27 other valid images only
    assert targets.shape == (28, 32, 32) and np.isfinite(targets).all()
    energy = np.square(targets).mean(axis=(1, 2))
    with_blank = neighbour_targets(images, valid, DenoiseSettings(k=29, psi_step=30.0), torch.device("cpu")).numpy()
    assert (np.square(with_blank).mean(axis=(1, 2)) < energy).all()


def test_all_images_blank_is_refused(particles, small_weights, tmp_path):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(particles.parent, work)
    with mrcfile.open(work / "particles.mrcs", mode="r+") as m:
        m.data[:] = 2.0
    r = run_cli("denoise", "--i", work / "particles.star", "--o", tmp_path / "o", "--weights", small_weights)
    assert r.returncode == 1 and "60 of 60 images are blank" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "denoised_particles.star").exists()
