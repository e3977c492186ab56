"""The simulator: projections against analytic images, SNR, ladders, truth files, CLI."""

import json
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cdae_em.core.geometry import euler_to_matrix
from cdae_em.simulate.simulator import MapProjector, SimulationSettings, load_source, simulate


def blob_volume(box, centres, sigma):
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box, box, box), dtype=np.float32)
    for cx, cy, cz in centres:
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return vol


@pytest.fixture(scope="module")
def asym_map(tmp_path_factory):
    """A small asymmetric 'molecule' of Gaussian blobs, 32^3 at 2 A/px."""
    path = tmp_path_factory.mktemp("map") / "blobs.mrc"
    vol = blob_volume(32, [(0, 0, 0), (6, 0, 0), (0, -5, 2), (-3, 4, -4)], 2.0)
    with mrcfile.new(path) as m:
        m.set_data(vol)
        m.voxel_size = 2.0
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cdae_em", *map(str, args)], capture_output=True, text=True)


def test_projection_of_gaussian_blob_matches_analytic_image():
    box, sigma, r0 = 48, 2.5, np.array([7.0, -4.0, 3.0])
    vol = torch.as_tensor(blob_volume(box, [r0], sigma))
    mats = euler_to_matrix([30.0, 200.0, 0.0], [40.0, 110.0, 0.0], [10.0, 250.0, 0.0])
    images = MapProjector(vol)(mats).numpy()
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    for image, a in zip(images, mats):
        p = a @ r0  # where RELION's convention puts the blob in the image
        analytic = np.sqrt(2 * np.pi) * sigma * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2) / (2 * sigma**2))
        # measured: 0.8% for general views, 3.2% for the identity (slice on grid planes)
        assert np.abs(image - analytic).max() < 0.04 * analytic.max()
        assert np.corrcoef(image.ravel(), analytic.ravel())[0, 1] > 0.999


def test_map_and_atom_projections_agree():
    from cdae_em.simulate.structure import Atoms, atoms_to_map, project_atoms

    rng = np.random.default_rng(3)
    xyz = rng.normal(0, 8.0, (60, 3))
    atoms = Atoms(xyz=xyz, weight=rng.choice([6.0, 7.0, 8.0, 16.0], 60), path=None)
    box, px = 48, 1.5
    vol = atoms_to_map(atoms, box, px, resolution=4.0)
    mats = euler_to_matrix([10.0, 123.0, 300.0], [20.0, 80.0, 150.0], [0.0, 45.0, 200.0])
    from_map = MapProjector(torch.as_tensor(vol))(mats).numpy()
    from_atoms = np.asarray(project_atoms(atoms, mats, box, px, resolution=4.0))
    for a, b in zip(from_map, from_atoms):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_snr_and_ladder_share_clean_signal(asym_map, tmp_path):
    settings = SimulationSettings(n_particles=150, n_views=3, in_plane=True, max_shift=2.0, ctf=True,
                                  snrs=[0.1, 0.4, 0.6, None], seed=5, batch_size=64)
    manifest = simulate(load_source(asym_map), settings, tmp_path / "sim", single_name=None)
    clean = mrcfile.read(tmp_path / "sim" / "clean.mrcs")
    assert clean.shape == (150, 32, 32)
    assert np.allclose(clean.var(axis=(1, 2)), 1.0, atol=1e-3)
    for level, snr in (("snr0.1", 0.1), ("snr0.4", 0.4), ("snr0.6", 0.6)):
        stack = tmp_path / "sim" / manifest["levels"][level]["stack"]
        noisy = mrcfile.read(stack)
        noise = noisy - clean
        measured = clean.var() / noise.var()
        assert abs(measured / snr - 1) < 0.05, (level, measured)
        # same clean signal in every level: regressing each image on the clean one gives slope 1
        slope = (noisy * clean).sum(axis=(1, 2)) / (clean * clean).sum(axis=(1, 2))
        assert abs(slope.mean() - 1) < 0.02
        with mrcfile.open(stack) as m:
            assert np.isclose(float(m.voxel_size.x), 2.0)
    # the noise of two levels is independent
    n1 = mrcfile.read(tmp_path / "sim" / "particles_snr0.1.mrcs") - clean
    n2 = mrcfile.read(tmp_path / "sim" / "particles_snr0.4.mrcs") - clean
    assert abs(np.corrcoef(n1.ravel(), n2.ravel())[0, 1]) < 0.02


def test_cli_writes_relion_files_with_truth(asym_map, tmp_path):
    out = tmp_path / "sim"
    r = run_cli("simulate", "--map", asym_map, "--o", out, "--n", 40, "--views", 4, "--in-plane",
                "--max-shift", 2, "--ctf", "--snr", 0.2, "--seed", 11)
    assert r.returncode == 0, r.stderr
    star = starfile.read(out / "particles.star")
    assert set(star) == {"optics", "particles"}
    parts = star["particles"]
    assert len(parts) == 40 and parts["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    assert "rlnAnglePsi" not in parts  # the input a user would have: no answers in it
    assert float(star["optics"]["rlnImagePixelSize"].iloc[0]) == 2.0
    assert (parts["rlnDefocusU"].between(1e4, 3e4)).all()
    truth = starfile.read(out / "truth.star")["particles"]
    assert set(truth["rlnClassNumber"]) <= {1, 2, 3, 4}
    assert truth["rlnAnglePsi"].between(0, 360).all() and truth["rlnAnglePsi"].std() > 50
    assert truth["rlnOriginXAngst"].abs().max() <= 4.0 + 1e-9
    # same view -> same (rot, tilt)
    for _, group in truth.groupby("rlnClassNumber"):
        assert group["rlnAngleRot"].nunique() == 1 and group["rlnAngleTilt"].nunique() == 1
    assert mrcfile.read(out / "particles.mrcs").shape == (40, 32, 32)
    manifest = json.loads((out / "simulation.json").read_text())
    assert manifest["levels"]["snr0.2"]["star"] == "particles.star"
    # same seed, same particles; the output directory is not overwritten silently
    again = run_cli("simulate", "--map", asym_map, "--o", out, "--n", 40, "--views", 4, "--snr", 0.2)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    r2 = run_cli("simulate", "--map", asym_map, "--o", tmp_path / "sim2", "--n", 40, "--views", 4, "--in-plane",
                 "--max-shift", 2, "--ctf", "--snr", 0.2, "--seed", 11)
    assert r2.returncode == 0
    assert np.array_equal(mrcfile.read(out / "particles.mrcs"), mrcfile.read(tmp_path / "sim2" / "particles.mrcs"))


def test_in_plane_rotation_rotates_the_projection(asym_map, tmp_path):
    """A particle simulated with psi shows its psi=0 image rotated by psi about the centre."""
    source = load_source(asym_map)
    base = source.project(euler_to_matrix([40.0], [60.0], [0.0]))[0].numpy()
    turned = source.project(euler_to_matrix([40.0], [60.0], [90.0]))[0].numpy()
    # RELION's psi acts last: a point q of the psi=0 image appears at A2 q, A2 the 2x2 block of
    # euler_to_matrix(0, 0, psi); so the psi image at p samples the psi=0 image at A2^T p
    c = 16
    shifted = np.zeros_like(base)
    for yy in range(1, 32):
        for xx in range(1, 32):
            x, y = xx - c, yy - c
            a = euler_to_matrix(0.0, 0.0, 90.0)[:2, :2]
            sx, sy = a.T @ np.array([x, y])
            sx, sy = int(round(sx)) + c, int(round(sy)) + c
            if 0 <= sx < 32 and 0 <= sy < 32:
                shifted[yy, xx] = base[sy, sx]
    assert np.corrcoef(shifted.ravel(), turned.ravel())[0, 1] > 0.99


def test_simulate_from_atomic_model(tmp_path):
    pdb = tmp_path / "tiny.pdb"
    lines = []
    rng = np.random.default_rng(0)
    for i, (x, y, z) in enumerate(rng.normal(0, 6, (30, 3)), start=1):
        lines.append(f"ATOM  {i:5d}  CA  ALA A{i:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C")
    pdb.write_text("\n".join(lines) + "\nEND\n")
    r = run_cli("simulate", "--map", pdb, "--o", tmp_path / "sim", "--n", 10, "--box", 32, "--snr", 1.0)
    assert r.returncode == 0, r.stderr
    assert mrcfile.read(tmp_path / "sim" / "clean.mrcs").shape == (10, 32, 32)


@pytest.mark.parametrize("args, words", [
    (["--snr", "-1"], "SNR must be > 0"),
    (["--snr-ladder", "0.1,lots"], "not an SNR"),
    (["--map", "nowhere.mrc"], "nowhere.mrc"),
    (["--n", "0"], "--n"),
    (["--bfactor", "-5"], "--bfactor"),
    (["--noise", "pink"], "--noise"),
])
def test_bad_arguments_fail_in_one_line(tmp_path, args, words):
    r = run_cli("simulate", "--o", tmp_path / "sim", *args)
    assert r.returncode != 0
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "sim" / "particles.star").exists()


def test_truth_origins_recentre_particles_the_relion_way(asym_map, tmp_path):
    """Translating a particle by +rlnOrigin (RELION's centring) gives its unshifted projection."""
    from cdae_em.core.preprocess import translate

    settings = SimulationSettings(n_particles=12, in_plane=True, max_shift=3.0, snrs=[None], seed=2)
    simulate(load_source(asym_map), settings, tmp_path / "sim")
    truth = starfile.read(tmp_path / "sim" / "truth.star")["particles"]
    clean = torch.as_tensor(mrcfile.read(tmp_path / "sim" / "clean.mrcs"))
    origins = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 2.0  # pixels
    assert np.abs(origins).max() > 1.0
    centred = translate(clean, origins).numpy()
    source = load_source(asym_map)
    mats = euler_to_matrix(truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"])
    reference = source.project(mats).numpy()
    for a, b in zip(centred, reference):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_real_data_conditions_coloured_noise_bfactor_and_relion_normalisation(tmp_path):
    """`cdae-em simulate --noise coloured --bfactor 150 --normalise`: neighbouring noise pixels
    correlated as the model says (0.2, as on real particles), the same SNR, signal damped at high
    frequency, and each image's background at mean 0, std 1, as RELION's Extract leaves it."""
    common = ["--n", 64, "--box", 64, "--ctf", "--snr", 0.05, "--seed", 2]
    r = subprocess.run([sys.executable, "-m", "cdae_em", "simulate", "--o", tmp_path / "plain", *map(str, common)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "cdae_em", "simulate", "--o", tmp_path / "real", "--noise", "coloured",
                        "--bfactor", "150", "--normalise", *map(str, common)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plain_clean = mrcfile.read(tmp_path / "plain" / "clean.mrcs")
    clean = mrcfile.read(tmp_path / "real" / "clean.mrcs")
    noisy = mrcfile.read(tmp_path / "real" / "particles.mrcs")
    manifest = json.loads((tmp_path / "real" / "simulation.json").read_text())
    assert manifest["settings"]["noise_lag1_correlation"] == pytest.approx(0.195, abs=0.01)
    assert manifest["levels"]["snr0.05"]["measured_snr"] == pytest.approx(0.05, rel=0.1)
    # the noise (in the normalised frame: noisy minus the clean image fitted to it) is correlated 0.2
    c = clean - clean.mean(axis=(1, 2), keepdims=True)
    x = noisy - noisy.mean(axis=(1, 2), keepdims=True)
    n = x - c * ((x * c).sum(axis=(1, 2), keepdims=True) / (c * c).sum(axis=(1, 2), keepdims=True))
    lag1 = float((n[:, :, 1:] * n[:, :, :-1]).mean() / (n * n).mean())
    assert 0.15 < lag1 < 0.25
    # B-factor: less of the clean images' power at high frequency than without it
    high = lambda im: float((np.abs(np.fft.rfft2(im))[:, 16:48, 16:] ** 2).sum() / (np.abs(np.fft.rfft2(im)) ** 2).sum())  # noqa: E731
    assert high(clean) < 0.5 * high(plain_clean)
    # RELION normalisation: background (beyond 75% of the box radius) mean 0, std 1 in every image
    yy, xx = np.mgrid[:64, :64] - 32
    bg = np.hypot(yy, xx) > 0.75 * 32
    assert np.allclose(noisy[:, bg].mean(axis=1), 0, atol=1e-4) and np.allclose(noisy[:, bg].std(axis=1), 1, atol=1e-2)


def test_junk_picks_are_named_in_the_truth_and_the_particles_drawn_as_without(tmp_path):
    """--junk: ice, carbon edges, aggregates and fragments, equally often, named in cdaeTrueKind;
    the particles among them are the same images as in a simulation without junk."""
    common = ("--n", 200, "--views", 4, "--in-plane", "--box", 32, "--snr", 1.0, "--seed", 3)
    assert run_cli("simulate", "--o", tmp_path / "junk", "--junk", 0.4, *common).returncode == 0
    assert run_cli("simulate", "--o", tmp_path / "clean", *common).returncode == 0
    truth = starfile.read(tmp_path / "junk" / "truth.star")["particles"]
    kinds = truth["cdaeTrueKind"].value_counts()
    assert set(kinds.index) == {"particle", "ice", "carbon", "aggregate", "fragment"}
    assert 0.3 < 1 - kinds["particle"] / 200 < 0.5 and kinds.drop("particle").min() >= 10
    assert (truth.loc[truth["cdaeTrueKind"] != "particle", "rlnClassNumber"] == 0).all()
    particle = (truth["cdaeTrueKind"] == "particle").to_numpy()
    junk_clean = mrcfile.read(tmp_path / "junk" / "clean.mrcs")
    plain_clean = mrcfile.read(tmp_path / "clean" / "clean.mrcs")
    assert np.allclose(junk_clean[particle], plain_clean[particle], atol=1e-5)
    # fragments keep part of the particle; aggregates add partners beyond it
    r = np.hypot(*(np.mgrid[:32, :32] - 16))
    outer = lambda images: np.abs(images[:, r > 12]).mean()  # noqa: E731
    aggregate = (truth["cdaeTrueKind"] == "aggregate").to_numpy()
    assert outer(junk_clean[aggregate]) > 2 * outer(plain_clean[aggregate])
    r2 = run_cli("simulate", "--o", tmp_path / "bad", "--junk", 1.5, *common)
    assert r2.returncode != 0 and "--junk" in r2.stderr and "Traceback" not in r2.stderr
