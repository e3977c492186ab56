"""Fourier resizing, masks and shifts."""

import numpy as np
import torch

from cdae_em.core.preprocess import fourier_resize, particle_mask, soft_circular_mask, translate


def gaussian(box, sigma, centre=(0.0, 0.0)):
    c = torch.arange(box, dtype=torch.float32) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))


def test_fourier_crop_matches_coarser_sampling_and_keeps_mean():
    fine = gaussian(64, 6.0)[None]
    coarse = fourier_resize(fine, 32)
    expected = gaussian(32, 3.0)[None]
    assert torch.allclose(coarse, expected, atol=2e-3)
    assert abs(float(coarse.mean() - expected.mean())) < 1e-4
    back = fourier_resize(coarse, 64)
    assert torch.allclose(back, fine, atol=5e-3)


def test_soft_mask_profile():
    m = soft_circular_mask(64, radius=20, width=4)
    assert m[32, 32] == 1 and m[32, 32 + 20] == 1
    assert 0 < m[32, 32 + 22] < 1
    assert m[32, 32 + 25] == 0 and m[0, 0] == 0


def test_translate_integer_shift_is_roll_and_subpixel_moves_centroid():
    img = gaussian(32, 2.0)[None]
    moved = translate(img, np.array([[3.0, -2.0]]))
    assert torch.allclose(moved, torch.roll(img, shifts=(-2, 3), dims=(1, 2)), atol=1e-5)
    half = translate(img, np.array([[0.5, 0.0]]))[0]
    c = torch.arange(32, dtype=torch.float32) - 16
    centroid_x = float((half.sum(dim=0) * c).sum() / half.sum())
    assert abs(centroid_x - 0.5) < 1e-3


def test_histogram_equalisation_is_flat_inside_the_mask():
    from cdae_em.core.preprocess import equalise_histogram

    gen = torch.Generator().manual_seed(2)
    images = torch.randn((3, 32, 32), generator=gen) ** 3  # a very skewed histogram
    mask = soft_circular_mask(32, radius=12, width=3)
    out = equalise_histogram(images, mask)
    inside = mask == 1
    for img in out:
        counts = torch.histc(img[inside], bins=5, min=-0.5, max=0.5)
        assert counts.min() > 0.8 * counts.mean()  # flat: every fifth of the range equally used
        assert abs(float(img[inside].mean())) < 0.02
    assert torch.all(out[:, mask == 0] == 0)
    # monotonic: equalisation keeps the order of pixel values inside the mask
    a, b = images[0][inside], out[0][inside]
    order = torch.argsort(a)
    assert torch.all(torch.diff(b[order]) >= 0)


def test_particle_mask_defaults_to_90_percent_of_the_box():
    box = 40
    m = particle_mask(box)
    centre_row = m[box // 2]
    assert float(m[box // 2, box // 2]) == 1.0
    inside = int((centre_row > 0.5).sum())  # the diameter at half height
    assert abs(inside - 0.9 * box) <= 2
    assert torch.equal(particle_mask(box, diameter=20), soft_circular_mask(box, radius=8, width=4))
