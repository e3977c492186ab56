"""Merge-and-split moves: out of the local optimum where two views share a class while another
view is split over two."""

from __future__ import annotations

from dataclasses import replace

import mrcfile
import numpy as np
import starfile
import torch

from cdae_em.classify.stage import classify

from cdae_em.settings import ClassifySettings
from cdae_em.core.metrics import clustering_scores
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
from cdae_em.core.averages import ring_average
from cdae_em.core.ctf import CtfAmplitudes, CtfParams
from cdae_em.core.geometry import euler_to_matrix
from cdae_em.core.preprocess import particle_mask
from cdae_em.classify.splitmerge import class_residuals, explained_energy, heterogeneity, two_means_1d


def _stuck_start(tmp_path, n_views=4, n=240, snr=0.3):
    """Particles of ``n_views`` views, true views, and labels where views 0 and 1 share class 0 and
    view 2 is split over classes 1 and 2 (view 3 is class 3)."""
    simulate(load_source(None, box=32), SimulationSettings(n_particles=n, n_views=n_views, in_plane=True,
                                                           max_shift=1.0, snrs=[snr], seed=5), tmp_path)
    images = mrcfile.read(tmp_path / "particles.mrcs").astype(np.float32)
    views = starfile.read(tmp_path / "truth.star")["particles"]["rlnClassNumber"].to_numpy().astype(int) - 1
    stuck = np.select([views <= 1, views == 2], [0, 1], 3)
    second_half = (views == 2) & (np.cumsum(views == 2) % 2 == 0)
    stuck[second_half] = 2
    return images, views, stuck


def test_a_move_undoes_a_merged_and_a_split_view(tmp_path):
    images, views, stuck = _stuck_start(tmp_path)
    settings = ClassifySettings(n_classes=4, n_iter=6, seed=0, ssnr_filter="never")  # the moves of one run
    without = classify(images, replace(settings, split_merge=0), torch.device("cpu"), initial_labels=stuck)
    assert clustering_scores(views, without.labels)["hungarian_f1"] < 0.9  # stuck: the test can fail
    moved = classify(images, settings, torch.device("cpu"), initial_labels=stuck)
    assert clustering_scores(views, moved.labels)["hungarian_f1"] > 0.95
    moves = [h["move"] for h in moved.history if "move" in h]
    assert moves[0]["kept"] and moves[0]["energy_after"] > moves[0]["energy_before"]
    assert all(m["kept"] for m in moves[:-1]) and len(moves) <= 3  # the first move that does not help ends them


def test_a_move_that_does_not_help_is_undone(tmp_path):
    """On correct classes a move can only split a view and merge two: it is measured and undone."""
    images, views, _ = _stuck_start(tmp_path)
    result = classify(images, ClassifySettings(n_classes=4, n_iter=6, seed=0, ssnr_filter="never"), torch.device("cpu"),
                      initial_labels=views)
    moves = [h["move"] for h in result.history if "move" in h]
    assert moves and not moves[0]["kept"] and len(moves) == 1
    assert clustering_scores(views, result.labels)["hungarian_f1"] > 0.95


def test_explained_energy_prefers_the_true_partition():
    """Two different signals in noise: grouping by signal beats mixing them (same K, same noise)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 64))
    x = np.concatenate([a + rng.normal(size=(100, 64)), b + rng.normal(size=(100, 64))])
    true = np.repeat([0, 1], 100)
    mixed = np.tile([0, 1], 100)

    def energy(labels):
        means = np.stack([x[labels == c].mean(0) for c in (0, 1)])
        return explained_energy(means, np.bincount(labels))

    assert energy(true) > energy(mixed) + 10


def test_two_means_1d_splits_two_groups():
    t = torch.tensor([-3.0, -2.9, -3.2, 1.0, 1.1, 0.9, 1.2, 0.8])
    side = two_means_1d(t)
    assert side.tolist() == [False] * 3 + [True] * 5


def test_the_split_of_phase_flipped_particles_follows_the_views_not_the_defocus():
    """One class holding two close views (10 degrees of tilt apart, correlation 0.97) at defoci
    1-3 um, phase-flipped, SNR 0.2. Their first principal component follows defocus (each member's
    |CTF| shapes it), so a split along it mixes the views; the residuals from the CTF-corrected
    average, weighted by |CTF|, split them by view."""
    box, n = 32, 200
    views = torch.as_tensor(load_source(None, box=box).project(euler_to_matrix(np.zeros(2), np.array([0.0, 10.0]),
                                                                                 np.zeros(2))), dtype=torch.float32)
    rng = np.random.default_rng(0)
    truth = np.arange(n) % 2
    defocus = rng.uniform(10000, 30000, n)
    params = CtfParams(defocus_u=defocus, defocus_v=defocus, defocus_angle=np.zeros(n), voltage=np.full(n, 300.0),
                       cs=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1))
    amp = torch.as_tensor(CtfAmplitudes(params, 3.0, box)[:])
    x = torch.fft.irfft2(torch.fft.rfft2(views[truth]) * amp, s=(box, box))
    x = x + torch.as_tensor(rng.normal(size=x.shape) * np.sqrt(float(x.var()) / 0.2), dtype=torch.float32)
    mask = particle_mask(box)
    x = (x - x.mean(dim=(-2, -1), keepdim=True)) * mask

    def split(images):
        _, scores = heterogeneity(images, mask > 0.5)
        side = two_means_1d(scores).numpy()
        return max(np.mean(side == truth), np.mean(side != truth)), abs(np.corrcoef(scores, defocus)[0, 1])

    plain_accuracy, plain_defocus = split(x)
    ctf_accuracy, _ = split(class_residuals(x, ring_average(amp), band=0.25))
    assert plain_defocus > 0.5 and plain_accuracy < 0.7  # 0.79, 0.61: the split follows defocus
    assert ctf_accuracy > 0.85  # 0.92


def test_fine_moves_undo_a_merged_and_a_split_view_of_phase_flipped_particles(tmp_path):
    """With the particles' |CTF| the moves also run after the CTF-aware fine rounds: from the stuck
    start, with no coarse rounds at all, they alone reach the views."""
    from cdae_em.settings import DenoiseSettings
    from cdae_em.core.prepare import prepared_images

    simulate(load_source(None, box=32), SimulationSettings(n_particles=240, n_views=4, in_plane=True, max_shift=1.0,
                                                           ctf=True, snrs=[0.3], seed=5), tmp_path)
    views = starfile.read(tmp_path / "truth.star")["particles"]["rlnClassNumber"].to_numpy().astype(int) - 1
    stuck = np.select([views <= 1, views == 2], [0, 1], 3)
    stuck[(views == 2) & (np.cumsum(views == 2) % 2 == 0)] = 2
    settings = ClassifySettings(n_classes=4, n_iter=2, fine_rounds=2, seed=0, ssnr_filter="never")  # fine rounds only
    with prepared_images(tmp_path / "particles.star", None, prepare=DenoiseSettings(phase_flip=True)) as images:
        without = classify(images, replace(settings, split_merge=0), torch.device("cpu"), initial_labels=stuck,
                           ctf=images.ctf)
        moved = classify(images, settings, torch.device("cpu"), initial_labels=stuck, ctf=images.ctf)
    assert clustering_scores(views, without.labels)["hungarian_f1"] < 0.9  # stuck: the test can fail
    assert clustering_scores(views, moved.labels)["hungarian_f1"] > 0.95
    moves = [h for h in moved.history if "move" in h]
    assert moves and all(h["stage"].startswith("fine move") and h["search"] == "fine" for h in moves)
    assert moves[0]["move"]["kept"] and moves[0]["move"]["energy_after"] > moves[0]["move"]["energy_before"]
