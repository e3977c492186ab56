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


def test_ctf_corrected_class_means_undo_the_ctf_that_plain_means_keep():
    """Noiseless phase-flipped particles of one view at six defoci are |CTF| times it: their CTF-
    corrected average is closer to the view (up to the regulariser), their plain average is the
    view filtered by the mean |CTF|."""
    from cdae_em.classify import _rows, class_means
    from cdae_em.ctf import CtfAmplitudes, CtfParams

    box, n = 32, 6
    view = torch.as_tensor(load_source(None, box=box).project(np.eye(3)[None]), dtype=torch.float32)
    params = CtfParams(defocus_u=np.linspace(8000, 30000, n), defocus_v=np.linspace(8000, 30000, n),
                       defocus_angle=np.zeros(n), voltage=np.full(n, 300.0), cs=np.full(n, 2.7),
                       amplitude_contrast=np.full(n, 0.1))
    amp = CtfAmplitudes(params, 3.0, box)
    flipped = torch.fft.irfft2(torch.fft.rfft2(view) * torch.as_tensor(amp[:]), s=(box, box)).numpy()
    zeros = np.zeros(n, np.float32)
    target = _rows(view.numpy(), [0], torch.device("cpu"))[0].numpy()
    args = (np.zeros(n, int), zeros, np.zeros((n, 2), np.float32), 1, torch.device("cpu"))
    corrected, counts = class_means(flipped, *args, ctf=amp)
    plain, _ = class_means(flipped, *args)
    f = torch.fft.fftfreq(box)
    rings = (f[:, None] ** 2 + torch.fft.rfftfreq(box)[None] ** 2).sqrt().numpy()
    detail = lambda a: np.fft.rfft2(a)[(rings > 0.1) & (rings < 0.4)]  # noqa: E731 (beyond the CTF's dip)
    error = lambda a: float(np.linalg.norm(detail(a) - detail(target)) / np.linalg.norm(detail(target)))  # noqa: E731
    assert counts.tolist() == [n]
    assert error(corrected[0]) < 0.3  # 0.27: WIENER and the mask (applied before the |CTF|) keep it above 0
    assert error(plain[0]) > error(corrected[0]) + 0.05  # 0.35: the test can fail
