"""Classification details that a user sees in the class averages."""

from __future__ import annotations

from dataclasses import replace

import mrcfile
import numpy as np
import torch

from cdae_em.classify import ClassifySettings, classify
from cdae_em.preprocess import translate
from cdae_em.simulate import SimulationSettings, load_source, simulate


def _centre_of_mass(images: np.ndarray) -> np.ndarray:
    box = images.shape[-1]
    w = (images - images.mean(axis=(-2, -1), keepdims=True)) ** 2
    c = np.arange(box) - box // 2
    return np.stack([(w.sum(-2) * c).sum(-1), (w.sum(-1) * c).sum(-1)], 1) / w.sum((-2, -1))[:, None]


def test_class_averages_are_centred_like_relion_center_classes(tmp_path):
    """Particles picked 3 px off-centre (all the same way) give off-centre averages unless the
    classes are centred; centring moves the averages and the particles' origins together."""
    simulate(load_source(None, box=32), SimulationSettings(n_particles=60, n_views=2, in_plane=True,
                                                           snrs=[2.0], seed=2), tmp_path)
    images = translate(torch.as_tensor(mrcfile.read(tmp_path / "particles.mrcs")), np.tile([[3.0, -2.0]], (60, 1)))
    images = images.numpy().astype(np.float32)
    settings = ClassifySettings(n_classes=2, n_iter=2, seed=0)
    off = classify(images, replace(settings, center_classes=False), torch.device("cpu"))
    centred = classify(images, settings, torch.device("cpu"))
    assert np.abs(_centre_of_mass(off.references)).max() > 1.5  # the test can fail
    assert np.abs(_centre_of_mass(centred.references)).max() < 0.75
    assert np.array_equal(off.labels, centred.labels)


def test_features_in_a_work_directory_give_the_same_classes(tmp_path, monkeypatch):
    """With a work directory the invariant features are a memory-mapped array there (resident memory
    flat in N), removed after the PCA; the classes are the same as with the features in memory."""
    import cdae_em.neighbours as neighbours

    simulate(load_source(None, box=32), SimulationSettings(n_particles=60, n_views=3, in_plane=True,
                                                           snrs=[1.0], seed=3), tmp_path / "sim")
    images = mrcfile.read(tmp_path / "sim" / "particles.mrcs").astype(np.float32)
    settings = ClassifySettings(n_classes=3, n_iter=2, seed=0)
    in_memory = classify(images, settings, torch.device("cpu"))
    mapped = []

    def spy(*args, **kwargs):
        array = neighbours.feature_array.__wrapped__(*args, **kwargs)
        mapped.append(array.filename)
        return array

    spy.__wrapped__ = neighbours.feature_array
    monkeypatch.setattr(neighbours, "feature_array", spy)
    work = tmp_path / "work"
    work.mkdir()
    on_disk = classify(images, settings, torch.device("cpu"), work=work)
    assert mapped and str(work) in str(mapped[0])
    assert not list(work.iterdir())  # the features' array is gone
    assert np.array_equal(in_memory.labels, on_disk.labels)
    assert np.abs((in_memory.psi - on_disk.psi + 180) % 360 - 180).max() < 1e-3
