"""2D alignment (RELION convention), invariant features, kNN and aligned neighbour means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cdae_em.core.align import align_pairs, apply_alignment, estimate_particle_radius
from cdae_em.core.neighbours import aligned_neighbour_means, invariant_features, nearest_neighbours, reduce_features
from cdae_em.core.geometry import euler_to_matrix
from cdae_em.core.preprocess import soft_circular_mask, translate
from cdae_em.simulate.simulator import load_source

BOX = 64
# an asymmetric particle: blobs of both signs at different radii and angles (no rotational or mirror
# symmetry, rotational average near zero), as (x, y, sigma, amplitude) in pixels from the centre
BLOBS = [(8, 0, 2.5, 1.0), (-4, 6.9, 2.5, -1.0), (-9.4, -3.4, 2, 1.2), (3.4, -9.4, 2, -1.2),
         (2, 2, 1.5, 0.7), (13, 6, 1.5, 0.8)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small batches on a shared 2-core machine run far faster (and steadier) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source():
    return load_source(None)


def blob_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The asymmetric test particle evaluated at coordinates (x, y) relative to the box centre."""
    out = torch.zeros_like(x)
    for cx, cy, sigma, amp in BLOBS:
        out += amp * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return out


def centred_coords(box: int = BOX) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(box, dtype=torch.float32) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def unit(images: torch.Tensor) -> torch.Tensor:
    images = images - images.mean(dim=(-2, -1), keepdim=True)
    return images / images.flatten(1).std(dim=1)[:, None, None]


def masked_corr(a: torch.Tensor, b: torch.Tensor, radius: float = 22.0) -> torch.Tensor:
    """Pearson correlation per image inside a soft circular mask."""
    mask = soft_circular_mask(a.shape[-1], radius)
    w = mask / mask.sum()
    a = (a - (a * w).sum(dim=(-2, -1), keepdim=True)) * mask.sqrt()
    b = (b - (b * w).sum(dim=(-2, -1), keepdim=True)) * mask.sqrt()
    return (a * b).sum(dim=(-2, -1)) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))


def angle_error(a: torch.Tensor | np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((np.asarray(a) - b + 180.0) % 360.0 - 180.0)


def projections(source, rot, tilt, psi) -> torch.Tensor:
    rot, tilt, psi = (np.broadcast_to(np.asarray(v, dtype=np.float64), np.shape(psi)) for v in (rot, tilt, psi))
    return source.project(euler_to_matrix(rot, tilt, psi))


def raw_particles(source, rot, tilt, n, seed, max_shift=4.0, snr=None):
    """Projections of one view with random psi and shifts (origin = -shift), optionally noisy."""
    rng = np.random.default_rng(seed)
    psi = rng.uniform(0, 360, n)
    shift = rng.uniform(-max_shift, max_shift, (n, 2))
    clean = unit(translate(projections(source, rot, tilt, psi), shift))
    if snr is None:
        return clean, psi, -shift
    gen = torch.Generator().manual_seed(seed)
    return clean + torch.randn(clean.shape, generator=gen) / math.sqrt(snr), psi, -shift


# ---------------------------------------------------------------------------------------------
# apply_alignment
# ---------------------------------------------------------------------------------------------
def test_apply_alignment_follows_relion_formula_on_asymmetric_image():
    """aligned(r) = raw(R^T r - o), R = [[c, -s], [s, c]]: checked against the analytic image."""
    x, y = centred_coords()
    raw = blob_image(x, y)[None].repeat(3, 1, 1)
    psi = torch.tensor([30.0, 90.0, 233.0])
    origin = torch.tensor([[1.5, -2.5], [3.0, 1.0], [-2.25, 0.5]])
    aligned = apply_alignment(raw, psi, origin)
    for i in range(3):
        s, c = math.sin(math.radians(psi[i])), math.cos(math.radians(psi[i]))
        expected = blob_image(c * x + s * y - origin[i, 0], -s * x + c * y - origin[i, 1])
        assert (aligned[i] - expected).abs().max() < 0.1  # bilinear interpolation error
        assert masked_corr(aligned[i:i + 1], expected[None]) > 0.995
        # the same transform with a sign error in psi or in the origin does not match
        wrong_psi = blob_image(c * x - s * y - origin[i, 0], s * x + c * y - origin[i, 1])
        wrong_origin = blob_image(c * x + s * y + origin[i, 0], -s * x + c * y + origin[i, 1])
        assert (aligned[i] - wrong_psi).abs().max() > 0.3
        assert (aligned[i] - wrong_origin).abs().max() > 0.3


def test_apply_alignment_integer_case_is_exact_pixel_mapping():
    x, y = centred_coords()
    raw = blob_image(x, y)[None]
    out = apply_alignment(raw, torch.tensor([90.0]), torch.tensor([[3.0, -2.0]]))[0]
    # psi = 90: aligned[cy + y, cx + x] = raw[cy - x - oy, cx + y - ox]
    c = BOX // 2
    rows = (c - x.long() + 2) % BOX
    cols = (c + y.long() - 3) % BOX
    assert torch.allclose(out, raw[0][rows, cols], atol=1e-4)


def test_apply_alignment_undoes_simulated_rotation_and_shift(source):
    """A projection made with psi and shifted by s comes back to the psi = 0 projection with o = -s."""
    clean, psi, origin = raw_particles(source, 40.0, 70.0, 6, seed=3)
    reference = unit(projections(source, 40.0, 70.0, np.zeros(6)))
    aligned = apply_alignment(clean, torch.tensor(psi), torch.tensor(origin))
    assert masked_corr(aligned, reference).min() > 0.99
    # and the opposite signs do not
    wrong = apply_alignment(clean, torch.tensor(-psi), torch.tensor(-origin))
    assert masked_corr(wrong, reference).max() < 0.9


# ---------------------------------------------------------------------------------------------
# features, PCA, neighbours
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bispectrum", "amplitude"])
def test_invariant_features_ignore_rotation_and_shift(source, kind):
    a, _, _ = raw_particles(source, 30.0, 60.0, 8, seed=1, max_shift=3.0)
    b, _, _ = raw_particles(source, 120.0, 100.0, 8, seed=2, max_shift=3.0)
    f = invariant_features(torch.cat([a, b]), kind=kind, mask_radius=22)
    d = torch.cdist(f, f)
    within = max(float(d[:8, :8].max()), float(d[8:, 8:].max()))
    between = float(d[:8, 8:].min())
    assert within < 0.5 * between, (within, between)


def test_bispectrum_features_tell_mirror_images_apart(source):
    img, _, _ = raw_particles(source, 30.0, 60.0, 6, seed=4, max_shift=2.0)
    mirrored = torch.flip(img, dims=[-1])
    for kind, separated in (("bispectrum", True), ("amplitude", False)):
        f = invariant_features(torch.cat([img, mirrored]), kind=kind, mask_radius=22)
        d = torch.cdist(f, f)
        within = float(d[:6, :6].max())
        between = float(d[:6, 6:].min())
        assert (between > 2 * within) == separated, (kind, within, between)


def test_reduce_features_finds_dominant_direction_deterministically():
    gen = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(20, generator=gen), dim=0)
    data = torch.randn(500, 20, generator=gen) * 0.1 + 5.0 * torch.randn(500, 1, generator=gen) * direction
    z = reduce_features(data, n_components=4)
    assert z.shape == (500, 4) and z.dtype == torch.float32
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-4)
    assert z[:, 0].var() > 100 * z[:, 1].var()
    assert torch.equal(z, reduce_features(data, n_components=4))
    w = reduce_features(data, n_components=4, whiten=True)
    assert torch.allclose(w.var(0), torch.ones(4), atol=1e-3)


def test_reduce_features_reads_wide_features_in_batches():
    """Invariant features of 256 px images (d ~4,800) are reduced batch by batch, never read whole
    (memory flat in N), and still give the principal components."""
    gen = torch.Generator().manual_seed(1)
    d = 4800
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    data = (torch.randn(300, d, generator=gen) * 0.1 + 5.0 * torch.randn(300, 1, generator=gen) * direction).numpy()

    class Counting:  # array-like (as a memory map is read) that records its largest read
        shape, dtype, largest = data.shape, data.dtype, 0

        def __len__(self):
            return len(data)

        def __getitem__(self, rows):
            out = data[rows]
            Counting.largest = max(Counting.largest, len(out))
            return out

    z = reduce_features(Counting(), n_components=3, batch_bytes=100 * 8 * d)
    assert Counting.largest <= 100
    centred = torch.from_numpy(data).double() - torch.from_numpy(data).double().mean(0)
    top = torch.linalg.svd(centred, full_matrices=False)[2][0]
    assert abs(float(torch.corrcoef(torch.stack([z[:, 0].double(), centred @ top]))[0, 1])) > 0.9999


def brute_force_knn(f: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(f.double(), f.double())
    d.fill_diagonal_(float("inf"))
    dist, idx = torch.topk(d, k, dim=1, largest=False)
    return idx, dist.float()


@pytest.mark.parametrize("block_size", [64, 1000])
def test_nearest_neighbours_match_brute_force(block_size):
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(300, 8, generator=gen) + 3.0
    idx, dist = nearest_neighbours(f, 7, block_size=block_size)
    ref_idx, ref_dist = brute_force_knn(f, 7)
    assert idx.dtype == torch.int64 and idx.shape == (300, 7)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(dist, ref_dist, atol=1e-5)
    assert not (idx == torch.arange(300)[:, None]).any()


def test_nearest_neighbours_max_distance_puts_self():
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(200, 4, generator=gen)
    full_idx, full_dist = nearest_neighbours(f, 5, block_size=50)
    limit = float(full_dist[:, 2].median())
    idx, dist = nearest_neighbours(f, 5, block_size=50, max_distance=limit)
    far = full_dist > limit
    assert far.any() and (~far).any()
    own = torch.arange(200)[:, None].expand(200, 5)
    assert torch.equal(idx[far], own[far]) and torch.all(dist[far] == 0)
    assert torch.equal(idx[~far], full_idx[~far]) and torch.equal(dist[~far], full_dist[~far])
    with pytest.raises(ValueError):
        nearest_neighbours(f[:5], 5)


def test_estimate_particle_radius():
    x, y = centred_coords()
    clean = blob_image(x, y)[None]  # blobs reach ~14.5 + 2 sigma from the centre
    gen = torch.Generator().manual_seed(0)
    noisy = clean + torch.randn((200, BOX, BOX), generator=gen)
    radius = estimate_particle_radius(noisy)
    assert 13 <= radius <= 20


# ---------------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("snr", [None, 1.0])
def test_align_pairs_recovers_psi_and_shift(source, snr):
    raw, psi, origin = raw_particles(source, 30.0, 60.0, 16, seed=5, snr=snr)
    reference = unit(projections(source, 30.0, 60.0, np.zeros(16)))
    got_psi, got_origin, score = align_pairs(raw, reference)
    assert got_psi.shape == (16,) and got_origin.shape == (16, 2) and score.shape == (16,)
    assert angle_error(got_psi, psi).max() < 5.0
    assert (got_origin.numpy() - origin).__abs__().max() < 1.0
    if snr is None:
        aligned = apply_alignment(raw, got_psi, got_origin)
        assert masked_corr(aligned, reference).min() > 0.99
        assert score.min() > 0.9


def test_aligned_neighbour_means_recover_the_particle_where_plain_means_fail():
    n, snr = 30, 0.5
    rng = np.random.default_rng(7)
    psi = torch.tensor(rng.uniform(0, 360, n), dtype=torch.float32)
    shift = torch.tensor(rng.uniform(-3, 3, (n, 2)), dtype=torch.float32)
    x, y = centred_coords()
    # copy i is the particle rotated by -psi_i and shifted, so that (psi_i, -shift_i) aligns it
    clean = []
    for i in range(n):
        s, c = math.sin(math.radians(psi[i])), math.cos(math.radians(psi[i]))
        xs, ys = x - shift[i, 0], y - shift[i, 1]
        clean.append(blob_image(c * xs - s * ys, s * xs + c * ys))
    clean = unit(torch.stack(clean))
    gen = torch.Generator().manual_seed(8)
    noisy = clean + torch.randn(clean.shape, generator=gen) / math.sqrt(snr)
    neighbours = torch.tensor([[j for j in range(n) if j != i] for i in range(n)])

    means = aligned_neighbour_means(noisy, neighbours)
    assert means.shape == noisy.shape
    assert masked_corr(means, clean).min() > 0.9
    plain = noisy.mean(dim=0, keepdim=True).expand(n, -1, -1)
    assert masked_corr(plain, clean).median() < 0.5
    assert masked_corr(noisy, clean).median() < 0.8  # single images are far noisier

    # numpy input and a preallocated output give the same means (one round only, for speed)
    out = np.zeros(noisy.shape, dtype=np.float32)
    first = aligned_neighbour_means(noisy, neighbours, refine=False, mask_radius=22)
    again = aligned_neighbour_means(noisy.numpy(), neighbours.numpy(), refine=False, mask_radius=22, out=out)
    assert again is out and np.allclose(out, first.numpy(), atol=1e-5)
    # a subset of centre images: neighbours[r] belongs to rows[r]
    rows = torch.tensor([5, 0, 17])
    subset = aligned_neighbour_means(noisy, neighbours[rows], refine=False, mask_radius=22, rows=rows)
    assert torch.allclose(subset, first[rows], atol=1e-5)


def test_neighbour_equal_to_self_adds_the_image_itself():
    gen = torch.Generator().manual_seed(9)
    images = torch.randn((4, 32, 32), generator=gen)
    self_only = torch.arange(4)[:, None].expand(4, 3)
    assert torch.allclose(aligned_neighbour_means(images, self_only), images, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CTF-aware and full-resolution comparison with references
# ---------------------------------------------------------------------------------------------
def test_batch_rows_keeps_device_tensors_that_array_views_hand_back():
    """Classification reads masked rows through an array view that returns tensors on the job's
    device; on a GPU numpy cannot read those (the first CUDA run failed there). A 'meta' tensor
    stands in for a CUDA one: numpy cannot read it either."""
    from cdae_em.core.polar import batch_rows

    class View:
        shape = (4, 8, 8)

        def __len__(self) -> int:
            return 4

        def __getitem__(self, rows) -> torch.Tensor:
            return torch.zeros(len(np.arange(4)[rows]), 8, 8, device="meta")

    out = batch_rows(View(), slice(0, 2), torch.device("meta"))
    assert out.shape == (2, 8, 8) and out.device.type == "meta"
