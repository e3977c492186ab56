"""Multi-reference alignment (``cdae_em.core.multiref``): the best reference, psi and shift of each
image, the shortlist, the CTF-aware score and the full-resolution rescoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_align import BOX, angle_error, one_thread, projections, raw_particles, source, unit  # noqa: F401 (fixtures)

from cdae_em.core.multiref import Shortlist, align_to_references


@pytest.mark.parametrize("snr", [None, 1.0])
def test_align_to_references_picks_view_psi_and_shift(source, snr):
    views = [(30.0, 60.0), (120.0, 20.0), (200.0, 100.0), (300.0, 150.0)]
    references = unit(projections(source, [v[0] for v in views], [v[1] for v in views], np.zeros(4)))
    rng = np.random.default_rng(6)
    true_class = rng.integers(0, 4, 24)
    parts = [raw_particles(source, *views[c], 1, seed=100 + i, snr=snr) for i, c in enumerate(true_class)]
    raw = torch.cat([p[0] for p in parts])
    psi = np.concatenate([p[1] for p in parts])
    origin = np.concatenate([p[2] for p in parts])
    cls, got_psi, got_origin, score = align_to_references(raw, references, batch_size=10)
    assert np.array_equal(cls.numpy(), true_class)
    assert angle_error(got_psi, psi).max() < 5.0
    assert np.abs(got_origin.numpy() - origin).max() < 1.0
    assert score.shape == (24,)
    # the same through a numpy array (e.g. a memmap), full-band search
    cls2, psi2, _, _ = align_to_references(raw.numpy(), references, band=None)
    assert np.array_equal(cls2.numpy(), true_class) and angle_error(psi2, psi).max() < 5.0


def test_shortlist_searches_only_the_references_the_cheaper_search_picks(source):
    """With a shortlist the full search meets only each particle's best references in a cheaper
    search: the right ones among 8 references for particles of 4 views (same classes and poses as
    the search over all), and a shortlist of all K is the search over all, bit for bit."""
    views = [(30.0, 60.0), (120.0, 20.0), (200.0, 100.0), (300.0, 150.0), (60.0, 120.0), (150.0, 80.0),
             (250.0, 40.0), (330.0, 10.0)]
    references = unit(projections(source, [v[0] for v in views], [v[1] for v in views], np.zeros(len(views))))
    rng = np.random.default_rng(9)
    true_class = rng.integers(0, len(views), 24)
    parts = [raw_particles(source, *views[c], 1, seed=200 + i, snr=1.0) for i, c in enumerate(true_class)]
    raw = torch.cat([p[0] for p in parts])
    every = align_to_references(raw, references, batch_size=10, rescore=2)
    short = align_to_references(raw, references, batch_size=10, rescore=2, shortlist=Shortlist(2, 0.125, 20.0))
    assert np.array_equal(every[0].numpy(), true_class)  # the test can fail: the search over all is right
    assert np.array_equal(short[0].numpy(), true_class)
    assert angle_error(short[1], every[1].numpy()).max() < 0.5
    assert np.abs(short[2].numpy() - every[2].numpy()).max() < 0.1
    whole = align_to_references(raw, references, batch_size=10, rescore=2, shortlist=Shortlist(8, 0.125, 20.0))
    assert all(torch.equal(a, b) for a, b in zip(whole, every))


# ---------------------------------------------------------------------------------------------
# neighbour means
# ---------------------------------------------------------------------------------------------


def band_pass(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Images keeping only frequencies low <= |f| < high (cycles/pixel)."""
    box = images.shape[-1]
    fy, fx = torch.meshgrid(torch.fft.fftfreq(box), torch.fft.rfftfreq(box), indexing="ij")
    keep = ((fy**2 + fx**2).sqrt() >= low) & ((fy**2 + fx**2).sqrt() < high)
    return torch.fft.irfft2(torch.fft.rfft2(images) * keep, s=(box, box))


def test_ctf_aware_score_matches_a_phase_flipped_particle_to_its_clean_reference(source):
    """A noiseless phase-flipped particle is |CTF| times its view: compared with the reference
    multiplied by its |CTF| it matches it exactly (score ~1); compared with the bare reference not."""
    from cdae_em.core.ctf import CtfAmplitudes, CtfParams

    references = unit(projections(source, [30.0, 200.0], [60.0, 100.0], np.zeros(2)))
    params = CtfParams(defocus_u=np.array([8000.0, 25000.0]), defocus_v=np.array([8000.0, 25000.0]),
                       defocus_angle=np.zeros(2), voltage=np.full(2, 300.0), cs=np.full(2, 2.7),
                       amplitude_contrast=np.full(2, 0.1))
    amp = CtfAmplitudes(params, 2.0, BOX)
    flipped = torch.fft.irfft2(torch.fft.rfft2(references) * torch.as_tensor(amp[0:2]), s=(BOX, BOX))
    mask = 0.45 * BOX
    cls, psi, origin, aware = align_to_references(flipped, references, ctf=amp, mask_radius=mask, band=None)
    _, _, _, plain = align_to_references(flipped, references, mask_radius=mask, band=None)
    assert np.array_equal(cls.numpy(), [0, 1])
    assert angle_error(psi, np.zeros(2)).max() < 1.0 and origin.abs().max() < 0.5
    assert 0.97 < aware.min() and aware.max() < 1.0 + 1e-4  # a normalised cross-correlation
    assert plain.max() < aware.min() - 0.1  # the test can fail: the bare references match worse
    # the same through a shortlist of one, picked by the CTF-aware cheaper search
    short = align_to_references(flipped, references, ctf=amp, mask_radius=mask, band=None, shortlist=Shortlist(1, 0.125, 20.0))
    assert np.array_equal(short[0].numpy(), [0, 1]) and torch.allclose(short[3], aware, atol=1e-5)


def test_rescore_tells_apart_references_that_differ_only_above_the_band(source):
    """Reference A matches the particle best below the search band, B at full resolution (it has
    the particle's fine detail): the band's winner alone picks A, comparing the best two at full
    resolution picks B."""
    views = unit(projections(source, [30.0, 120.0, 300.0], [60.0, 20.0, 150.0], np.zeros(3)))
    low, other, fine = band_pass(views[0:1], 0, 0.12), band_pass(views[1:2], 0, 0.12), band_pass(views[2:3], 0.3, 0.45)
    fine = fine * (low.norm() / fine.norm())
    particle = low + fine + 0.1 * other
    references = torch.cat([low + 0.1 * other, low + fine])
    band_only = align_to_references(particle, references, band=0.1875, rescore=1)
    rescored = align_to_references(particle, references, band=0.1875, rescore=2)
    assert int(band_only[0][0]) == 0  # the test can fail: below the band A is the better match
    assert int(rescored[0][0]) == 1
    assert angle_error(rescored[1], np.zeros(1)).max() < 2.0 and rescored[2].abs().max() < 0.5
    # a shortlist of one from a search below 0.125 cycles/pixel keeps A alone: B is never compared
    shortlisted = align_to_references(particle, references, band=0.1875, rescore=2, shortlist=Shortlist(1, 0.125, 20.0))
    assert int(shortlisted[0][0]) == 0


def test_distance_sends_a_faint_image_to_a_faint_reference_where_correlation_does_not(source):
    """A fragment-like image keeps 30% of a view's signal. The normalised CC leaves the scale free,
    so it matches the view's strong reference best (CC 1); the least-squares distance fixes the
    scale and prefers a faint, blurred average of the same view (as a junk class's mean is). The
    whole view goes to its own reference either way, and the score returned is the CC both times."""
    view = unit(projections(source, [30.0], [60.0], np.zeros(1)))
    faint = 0.3 * band_pass(view, 0, 0.1)
    references = torch.cat([view, faint])
    images = torch.cat([0.3 * view, view])
    by_cc = align_to_references(images, references, band=None, rescore=2)
    by_distance = align_to_references(images, references, band=None, rescore=2, criterion="distance")
    assert by_cc[0].tolist() == [0, 0]
    assert by_distance[0].tolist() == [1, 0]
    assert by_cc[3][0] > 0.98 and by_distance[3][0] < by_cc[3][0]  # the CC with the chosen reference
    # the same through the cheaper search's shortlist of one: it too picks by the distance
    short = align_to_references(images, references, band=None, rescore=2, criterion="distance",
                                shortlist=Shortlist(1, 0.125, 20.0))
    assert short[0].tolist() == [1, 0]
    with pytest.raises(ValueError, match="criterion"):
        align_to_references(images, references, criterion="likelihood")
