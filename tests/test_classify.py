"""Classification details that a user sees in the class averages."""

from __future__ import annotations

from dataclasses import replace

import mrcfile
import numpy as np
import pytest
import torch

from cdae_em.classify.stage import classify

from cdae_em.settings import ClassifySettings
from cdae_em.core.preprocess import translate
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate


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
    import cdae_em.core.neighbours as neighbours

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
    from cdae_em.core.averages import class_means, masked_rows
    from cdae_em.core.ctf import CtfAmplitudes, CtfParams

    box, n = 32, 6
    view = torch.as_tensor(load_source(None, box=box).project(np.eye(3)[None]), dtype=torch.float32)
    params = CtfParams(defocus_u=np.linspace(8000, 30000, n), defocus_v=np.linspace(8000, 30000, n),
                       defocus_angle=np.zeros(n), voltage=np.full(n, 300.0), cs=np.full(n, 2.7),
                       amplitude_contrast=np.full(n, 0.1))
    amp = CtfAmplitudes(params, 3.0, box)
    flipped = torch.fft.irfft2(torch.fft.rfft2(view) * torch.as_tensor(amp[:]), s=(box, box)).numpy()
    zeros = np.zeros(n, np.float32)
    target = masked_rows(view.numpy(), [0], torch.device("cpu"))[0].numpy()
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


def test_ssnr_filter_keeps_what_the_halves_share_and_drops_what_they_do_not():
    """Each class's two half averages share the view's low frequencies and hold independent noise
    above them: the Wiener weight is near 1 where the halves agree and near 0 where they do not, so
    the filtered reference keeps the view and loses the noise. A class too small to split gets the
    weights of the others."""
    from cdae_em.core.averages import apply_ring_filter, ssnr_filter

    box = 32
    rng = np.random.default_rng(0)
    f = np.sqrt(np.fft.fftfreq(box)[:, None] ** 2 + np.fft.rfftfreq(box)[None] ** 2)
    low = lambda a: np.fft.irfft2(np.fft.rfft2(a) * (f < 0.15), s=(box, box))  # noqa: E731
    high = lambda a: np.fft.irfft2(np.fft.rfft2(a) * (f > 0.25), s=(box, box))  # noqa: E731
    view = low(load_source(None, box=box).project(np.eye(3)[None]).numpy()[0])
    scale = view.std()
    half_a = np.stack([view + high(rng.normal(0, scale, (box, box))), view])
    half_b = np.stack([view + high(rng.normal(0, scale, (box, box))), view])
    weights = ssnr_filter(half_a, half_b, np.array([40, 1]), np.array([40, 1]))
    assert weights[0, 1:4].min() > 0.95
    assert weights[0, 9:box // 2].max() < 0.35  # the test can fail: 1 if the noise were shared
    assert np.array_equal(weights[1], weights[0])  # one particle per half: the others' weights
    filtered = apply_ring_filter((half_a + half_b)[:1] / 2, weights[:1])[0]
    error = lambda a: float(np.linalg.norm(a - view) / np.linalg.norm(view))  # noqa: E731
    assert error(filtered) < 0.5 * error((half_a[0] + half_b[0]) / 2)


def test_the_coarse_rounds_run_twice_and_the_higher_objective_goes_on(tmp_path):
    """With ssnr_filter "choose" the coarse rounds and moves run on plain and on SSNR-filtered
    references from the same start; the run with the higher objective is the one the fine rounds
    continue, its rounds marked in_result, the other's not. With "never" or "always" (the default),
    one run, on plain or on filtered references: the choice's runs from the same start."""
    simulate(load_source(None, box=32), SimulationSettings(n_particles=160, n_views=4, in_plane=True,
                                                           snrs=[0.1], seed=3), tmp_path)
    images = mrcfile.read(tmp_path / "particles.mrcs").astype(np.float32)
    settings = ClassifySettings(n_classes=4, n_iter=4, fine_rounds=1, split_merge=1, move_rounds=1, seed=0)
    both = classify(images, replace(settings, ssnr_filter="choose"), torch.device("cpu"))
    plain = classify(images, replace(settings, ssnr_filter="never"), torch.device("cpu"))
    filtered = classify(images, settings, torch.device("cpu"))
    passes = {p["ssnr"]: p for p in both.coarse_passes}
    assert set(passes) == {False, True} and sum(p["kept"] for p in passes.values()) == 1
    kept = passes[True]["kept"]
    assert passes[kept]["energy"] >= passes[not kept]["energy"]
    coarse = [h for h in both.history if h["search"] == "coarse"]
    assert {h["ssnr"] for h in coarse} == {False, True}
    assert all(h["in_result"] == (h["ssnr"] == kept) for h in coarse)
    assert all(h["in_result"] and h["ssnr"] == kept for h in both.history if h["search"] == "fine")
    # the plain run is the one a classification without the filter makes
    assert [h["energy"] for h in coarse if not h["ssnr"]] == [h["energy"] for h in plain.history
                                                              if h["search"] == "coarse"]
    assert not plain.coarse_passes and not any(h["ssnr"] for h in plain.history)
    assert not filtered.coarse_passes and all(h["ssnr"] for h in filtered.history)
    assert [h["energy"] for h in coarse if h["ssnr"]] == [h["energy"] for h in filtered.history
                                                          if h["search"] == "coarse"]
    with pytest.raises(ValueError, match="ssnr_filter"):
        classify(images, replace(settings, ssnr_filter="sometimes"), torch.device("cpu"))


def test_ring_average_keeps_what_turns_with_the_image_and_averages_the_rest():
    """A |CTF| without astigmatism is the same on each Fourier ring and stays as it is; what differs
    along a ring (here fx) is replaced by its mean there."""
    from cdae_em.core.averages import ring_average, ring_index

    box = 16
    index, n_rings, _ = ring_index(box, torch.device("cpu"))
    per_ring = torch.rand(n_rings, generator=torch.Generator().manual_seed(0))
    radial = per_ring[index].reshape(1, box, box // 2 + 1)
    assert torch.allclose(ring_average(radial), radial, atol=1e-6)
    fx = torch.fft.rfftfreq(box)[None, None, :].expand(1, box, box // 2 + 1)
    assert float((ring_average(fx) - fx).abs().max()) > 0.1  # not the same on a ring: averaged
    assert torch.allclose(ring_average(radial + fx - ring_average(fx)), radial, atol=1e-6)


def test_a_shortlist_gives_the_classes_the_search_over_all_references_gives(tmp_path, monkeypatch):
    """With classify.shortlist < K each round, coarse and fine, compares a particle in full with
    only its best references in a cheaper search (below shortlist_band at 4 x psi_step); on
    well-separated views the classes are those of the full search."""
    import cdae_em.classify.stage as stage
    from sklearn.metrics import adjusted_rand_score

    simulate(load_source(None, box=32), SimulationSettings(n_particles=120, n_views=6, in_plane=True,
                                                           snrs=[1.0], seed=4), tmp_path)
    images = mrcfile.read(tmp_path / "particles.mrcs").astype(np.float32)
    settings = ClassifySettings(n_classes=6, n_iter=3, fine_rounds=1, split_merge=0, seed=0)
    every = classify(images, replace(settings, shortlist=0), torch.device("cpu"))
    seen = []
    search = stage.align_to_references

    def spy(*args, **kwargs):
        seen.append(kwargs.get("shortlist"))
        return search(*args, **kwargs)

    monkeypatch.setattr(stage, "align_to_references", spy)
    short = classify(images, replace(settings, shortlist=2), torch.device("cpu"))
    psi = settings.psi_step
    assert len(seen) >= 2 and set(seen) == {stage.Shortlist(2, settings.shortlist_band, 4 * psi)}  # coarse and fine
    assert adjusted_rand_score(every.labels, short.labels) > 0.95
    assert all(h["seconds"] > 0 for h in short.history)


def test_classes_found_on_a_subset_then_every_particle_assigned(tmp_path, monkeypatch):
    """With more than subset_per_class x K particles every round but the last fine_rounds reads
    only a seeded subset of that size (and its particles' |CTF|, row for row); the last rounds
    assign every particle, and the classes are the views."""
    import cdae_em.classify.stage as stage
    import starfile
    from sklearn.metrics import adjusted_rand_score
    from cdae_em.core.ctf import CtfAmplitudes, CtfParams

    n = 240
    simulate(load_source(None, box=32), SimulationSettings(n_particles=n, n_views=4, in_plane=True,
                                                           snrs=[1.0], seed=5), tmp_path)
    images = mrcfile.read(tmp_path / "particles.mrcs").astype(np.float32)
    truth = starfile.read(tmp_path / "truth.star", always_dict=True)["particles"]["rlnClassNumber"].to_numpy()
    defocus = np.random.default_rng(0).uniform(8000, 30000, n)
    amp = CtfAmplitudes(CtfParams(defocus_u=defocus, defocus_v=defocus, defocus_angle=np.zeros(n),
                                  voltage=np.full(n, 300.0), cs=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1)),
                        3.0, 32)
    settings = ClassifySettings(n_classes=4, n_iter=3, fine_rounds=2, split_merge=0, seed=0, subset_per_class=20)
    rows = stage._subset(n, settings)
    assert len(rows) == 80 and len(set(rows)) == 80
    seen = []
    search = stage.align_to_references

    def spy(images, *args, **kwargs):
        ctf = kwargs.get("ctf")
        seen.append((len(images), None if ctf is None else np.array_equal(ctf[[0]], amp[[rows[0]] if len(images) < n else [0]])))
        return search(images, *args, **kwargs)

    monkeypatch.setattr(stage, "align_to_references", spy)
    result = classify(images, settings, torch.device("cpu"), ctf=amp)
    sizes = [s for s, _ in seen]
    assert sizes[-2:] == [n, n] and set(sizes[:-2]) == {80}  # the last fine_rounds read every particle
    assert all(same for _, same in seen if same is not None) and seen[-1][1] is not None
    assert result.history[-1]["stage"] == "all particles" and sum(result.history[-1]["sizes"]) == n
    assert sum(result.history[0]["sizes"]) == 80
    assert set(np.unique(result.labels)) == set(range(4))
    assert adjusted_rand_score(truth, result.labels) > 0.9
    assert stage._subset(n, replace(settings, subset_per_class=60)) is None  # 240 = 60 x 4: every particle
    assert stage._subset(n, replace(settings, subset_per_class=0)) is None


def test_the_rounds_leave_faint_images_with_the_junk_by_distance_not_by_correlation():
    """Whole particles of one view, faint copies of it (30% of its signal, like fragments) and
    empty boxes, started in two classes: the particles in one, the faint copies and empty boxes in
    the other. Picking references by least-squares distance (the default) the faint copies stay
    with the empty boxes, whose average is faint; by normalised correlation, which leaves the scale
    free, they move to the particles' sharp average."""
    rng = np.random.default_rng(4)
    source = load_source(None, box=32)
    view = source.project(torch.eye(3)[None])[0].numpy()
    kinds = np.repeat([0, 1, 2], [30, 15, 15])  # particles, faint copies, empty boxes
    signal = np.where(kinds == 0, 1.0, np.where(kinds == 1, 0.3, 0.0))[:, None, None] * view / view.std()
    images = (signal + 0.5 * rng.standard_normal((len(kinds), 32, 32))).astype(np.float32)
    start = (kinds > 0).astype(int)
    settings = ClassifySettings(n_classes=2, n_iter=2, fine_rounds=1, split_merge=0, ssnr_filter="never", seed=0,
                                center_classes=False, max_shift=2.0)
    by_distance = classify(images, settings, torch.device("cpu"), initial_labels=start)
    by_cc = classify(images, replace(settings, criterion="correlation"), torch.device("cpu"), initial_labels=start)

    def faint_with_empty(result) -> float:
        empty_class = np.bincount(result.labels[kinds == 2]).argmax()
        return float(np.mean(result.labels[kinds == 1] == empty_class))

    assert faint_with_empty(by_distance) > 0.8
    assert faint_with_empty(by_cc) < 0.5  # the test can fail: correlation moves them
    assert np.all(by_distance.labels[kinds == 0] == by_distance.labels[0])  # the particles stay together
