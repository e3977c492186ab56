"""2D classification of (denoised) particles up to in-plane rotation and shift.

1. Initial classes from rotation/shift-invariant features (``neighbours.invariant_features`` + PCA),
   clustered by k-means (mini-batch when large) or hierarchical clustering (Ward, on a subsample
   of at most ``hc_max`` particles, the rest assigned to the nearest class centre) - the paper's two.
2. Initial references: each class's members aligned onto its medoid (the member nearest the
   class centre in feature space) and averaged.
3. ``n_iter`` rounds of multi-reference alignment: every particle aligned to every reference
   (rotation on a psi grid, shift by FFT cross-correlation), assigned to the best one, references
   re-averaged from the aligned particles. Coarse to fine: all rounds but the last ``fine_rounds``
   search at twice the psi step and a lower frequency band; the ``rescore`` references that match a
   particle best within the band are then compared with it at full resolution, where views that
   differ only in fine detail are told apart. In the fine rounds of CTF phase-flipped particles,
   each is compared with the references multiplied by its |CTF| (``ctf_aware``), and the
   references are CTF-corrected averages. Empty classes are re-seeded with the worst-fitting
   particles of the largest class.
4. After the coarse rounds, up to ``split_merge`` merge-and-split moves (``cdae_em.splitmerge``): the
   two most alike classes merged, the most heterogeneous one split, a few coarse rounds, and the
   move kept only if the k-means objective rose. They undo the local optimum where two views share
   a class while another view is split over two.
5. With ``ssnr_filter``, steps 3 (coarse rounds) and 4 run a second time from the same start,
   aligning to the references Wiener-filtered by their SSNR (per Fourier ring, from the FRC of the
   averages of each class's two halves), and the run with the higher k-means objective goes on to
   the fine rounds. Filtering keeps the frequencies where a class average is mostly noise from
   deciding a particle's class, which wins at low SNR; where views differ only in faint detail
   the plain references do better, and the objective tells which case holds.
Classes are returned ordered by size (class 1 the largest), with each particle's psi and origin in
RELION's convention (applying them to the particle brings it onto its class average).

Cost: step 3 dominates, N x K x (360 / psi_step) cross-correlations per round, computed by FFT in
batches (see ``align.align_to_references``); memory holds the features (N x n_components) and the
per-particle alignment (N x 4), images are streamed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans, MiniBatchKMeans

from cdae_em import distributed
from cdae_em.align import (align_pairs, align_to_references, apply_alignment, estimate_particle_radius,
                           shift_in_raw_frame)
from cdae_em.ctf import frequency_grid
from cdae_em.metrics import frc, ssnr_from_frc
from cdae_em.neighbours import reduced_invariant_features
from cdae_em.errors import InputError
from cdae_em.polar import batch_rows
from cdae_em.preprocess import particle_mask
from cdae_em.progress import report
from cdae_em.splitmerge import explained_energy, propose

log = logging.getLogger(__name__)


@dataclass
class ClassifySettings:
    n_classes: int
    method: str = "kmeans"  # "kmeans" or "hierarchical"
    n_iter: int = 10
    psi_step: float = 5.0
    max_shift: float | None = None  # pixels; default box / 8
    n_components: int = 32
    hc_max: int = 5000
    batch_size: int = 256
    seed: int = 0
    # coarse to fine: every round but the last ``fine_rounds`` searches psi at twice psi_step and
    # frequencies below ``coarse_band`` cycles/pixel (about 3x cheaper at the defaults)
    fine_rounds: int = 2
    settled: float = 0.01  # coarse rounds end early once fewer than this fraction of particles change class
    coarse_band: float = 0.1875
    fine_band: float = 0.25
    rescore: int = 4  # the references matching best within the band compared at full resolution (1: none)
    # merge-and-split moves tried after the coarse rounds (0: none); each is kept only if it helps,
    # and the first that does not ends them (see cdae_em.splitmerge)
    split_merge: int = 3
    move_rounds: int = 4  # coarse rounds after a move, before it is judged
    center_classes: bool = True  # shift each class average's centre of mass to the box centre (RELION's --center_classes)
    # with the particles' |CTF| (phase-flipped images), the fine rounds compare each particle with the
    # references multiplied by its |CTF| (the coarse rounds and moves compare plain images)
    ctf_aware: bool = True
    # the coarse rounds and moves run twice from the same start, aligning to the plain references and
    # to the references Wiener-filtered by their SSNR (from the FRC of each class's two half
    # averages); the run with the higher k-means objective is kept (see docs/notes.md)
    ssnr_filter: bool = True


@dataclass
class Classification:
    labels: np.ndarray  # (N,) 0 .. K-1, class 0 the largest
    psi: np.ndarray  # (N,) degrees
    origin: np.ndarray  # (N, 2) pixels (x, y)
    score: np.ndarray  # (N,) normalised cross-correlation with the class reference
    references: np.ndarray  # (K, box, box) aligned averages of the classified images
    history: list = field(default_factory=list)
    # with ssnr_filter: the two runs of the coarse rounds, {"ssnr": bool, "energy": objective, "kept": bool}
    coarse_passes: list = field(default_factory=list)


def cluster(features: np.ndarray, n_classes: int, method: str, seed: int = 0, hc_max: int = 5000) -> np.ndarray:
    """Labels (N,) from k-means or hierarchical (Ward) clustering of feature vectors."""
    n = len(features)
    if method == "kmeans":
        if n > 20000:
            km = MiniBatchKMeans(n_clusters=n_classes, random_state=seed, n_init=3, batch_size=4096)
        else:
            km = KMeans(n_clusters=n_classes, random_state=seed, n_init=10)
        return km.fit_predict(features)
    if method == "hierarchical":
        rng = np.random.default_rng(seed)
        sub = np.sort(rng.choice(n, size=min(n, hc_max), replace=False))
        sub_labels = AgglomerativeClustering(n_clusters=n_classes, linkage="ward").fit_predict(features[sub])
        if len(sub) == n:
            return sub_labels
        centres = np.stack([features[sub][sub_labels == k].mean(axis=0) for k in range(n_classes)])
        d = ((features[:, None, :] - centres[None]) ** 2).sum(-1)
        return d.argmin(axis=1)
    raise ValueError(f"unknown clustering method {method!r} (kmeans or hierarchical)")


def _rows(images, rows, device) -> torch.Tensor:
    """Images ``rows`` ready to compare: zero mean inside a circular mask, masked.

    Histogram-equalised particles are bright discs on a zero background; without this the disc
    would dominate every cross-correlation and all classes would look alike.
    """
    x = torch.from_numpy(np.asarray(images[rows], dtype=np.float32)).to(device)
    mask = particle_mask(x.shape[-1], device=device)  # the denoiser's default mask
    inside = mask > 0.5
    mean = x[:, inside].mean(dim=1)
    return (x - mean[:, None, None]) * mask


class _Masked:
    """``images`` read through ``_rows`` (masked, zero mean inside the mask) as an array-like."""

    def __init__(self, images, device):
        self.images, self.device, self.shape = images, device, images.shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> torch.Tensor:
        return _rows(self.images, rows, self.device)


def class_means(images, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray, n_classes: int,
                device: torch.device, batch_size: int = 256, ctf=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means of the aligned images (K, box, box) and the class counts (K,).

    With ``ctf`` (|CTF| of phase-flipped ``images``, row for row; see ``cdae_em.ctf.CtfAmplitudes``)
    the CTF-corrected least-squares averages instead: per frequency sum |CTF| x / (sum CTF^2 + WIENER n),
    CTF^2 averaged over rings so that it turns with the images (exact without astigmatism)."""
    sums, power = _class_sums(images, labels, psi, origin, n_classes, device, batch_size, ctf)
    counts = np.bincount(labels, minlength=n_classes)
    return _averages(sums, power, counts), counts


def _class_sums(images, groups: np.ndarray, psi: np.ndarray, origin: np.ndarray, n_groups: int,
                device: torch.device, batch_size: int, ctf=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group: the sum of the aligned images (G, box, box; with ``ctf`` each image multiplied by
    its |CTF| first) and with ``ctf`` the sum of the ring-averaged CTF^2 (G, rings)."""
    box = images.shape[-1]
    sums = torch.zeros((n_groups, box, box), device=device)
    power = None
    if ctf is not None:
        rings, n_rings, per_ring = _rings(box, device)
        power = torch.zeros((n_groups, n_rings), device=device)
    lo, hi = distributed.shard(len(images))  # each rank its rows; the sums are added over ranks
    for start in range(lo, hi, batch_size):
        rows = slice(start, min(start + batch_size, hi))
        x, classes = _rows(images, rows, device), torch.as_tensor(groups[rows], device=device)
        if ctf is not None:
            amp = batch_rows(ctf, rows, device)
            x = torch.fft.irfft2(torch.fft.rfft2(x) * amp, s=(box, box))
            ring_power = torch.zeros((len(x), n_rings), device=device).index_add_(1, rings, amp.square().flatten(1))
            power.index_add_(0, classes, ring_power / per_ring)
        x = apply_alignment(x, torch.as_tensor(psi[rows], device=device, dtype=torch.float32),
                            torch.as_tensor(origin[rows], device=device, dtype=torch.float32))
        sums.index_add_(0, classes, x)
    return distributed.all_reduce_sum(sums), None if power is None else distributed.all_reduce_sum(power)


def _averages(sums: torch.Tensor, power: torch.Tensor | None, counts: np.ndarray) -> np.ndarray:
    """The averages from ``_class_sums``: plain means, or with ``power`` CTF-corrected ones."""
    n_groups, box = sums.shape[0], sums.shape[-1]
    n = torch.as_tensor(np.maximum(counts, 1), device=sums.device, dtype=torch.float32)[:, None, None]
    if power is None:
        return (sums / n).cpu().numpy()
    rings = _rings(box, sums.device)[0]
    den = power[:, rings].reshape(n_groups, box, box // 2 + 1) + WIENER * n
    return torch.fft.irfft2(torch.fft.rfft2(sums) / den, s=(box, box)).cpu().numpy()


def ssnr_filter(half_a: np.ndarray, half_b: np.ndarray, n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Per class and Fourier ring, the Wiener weight SSNR / (1 + SSNR) of the class average, its
    SSNR from the FRC of the averages of its two halves (K, box, box each, of ``n_a``/``n_b``
    particles): (K, box // 2 + 1). Classes with fewer than 2 particles in a half get the
    count-weighted mean weight of the others (all ones if there are none)."""
    k, box = len(half_a), half_a.shape[-1]
    weights = np.ones((k, box // 2 + 1))
    valid = (np.asarray(n_a) >= 2) & (np.asarray(n_b) >= 2)
    for c in np.flatnonzero(valid):
        ssnr = ssnr_from_frc(frc(half_a[c], half_b[c]))
        weights[c] = ssnr / (1.0 + ssnr)
    if valid.any() and not valid.all():
        size = (np.asarray(n_a) + np.asarray(n_b))[valid].astype(np.float64)
        weights[~valid] = (weights[valid] * size[:, None]).sum(axis=0) / size.sum()
    return weights


def apply_ring_filter(images: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each image (K, box, box) multiplied in Fourier space by its weight per ring (K, box // 2 + 1)."""
    box = images.shape[-1]
    rings = _rings(box, torch.device("cpu"))[0].clamp(max=weights.shape[1] - 1)
    w = torch.as_tensor(weights, dtype=torch.float32)[:, rings].reshape(len(images), box, box // 2 + 1)
    return torch.fft.irfft2(torch.fft.rfft2(torch.as_tensor(images, dtype=torch.float32)) * w, s=(box, box)).numpy()


WIENER = 0.1  # the CTF-corrected averages' regulariser, per particle (CTF^2 is at most 1)


def _rings(box: int, device: torch.device) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Ring index of every rfft2 frequency (flattened), the number of rings, and frequencies per ring."""
    fy, fx = frequency_grid(box, device)
    rings = torch.round(torch.sqrt(fy**2 + fx**2) * box).long().flatten()
    n_rings = int(rings.max()) + 1
    return rings, n_rings, torch.bincount(rings, minlength=n_rings).float()


def classify(images, settings: ClassifySettings, device: torch.device,
             should_stop: Callable[[], None] | None = None,
             initial_labels: np.ndarray | None = None, work: Path | None = None, ctf=None) -> Classification:
    """Classify ``images`` (N, box, box; an array or memmap) into ``settings.n_classes`` classes.

    ``initial_labels`` (N,) replaces step 1 (e.g. classes found on other images of the same
    particles); alignment and re-assignment then run on ``images``. With a ``work`` directory the
    invariant features of step 1 go to a memory-mapped array there (removed after the PCA), so
    that resident memory does not grow with N. ``ctf``: the |CTF| of phase-flipped ``images``
    (``cdae_em.ctf.CtfAmplitudes``); with ``settings.ctf_aware`` the fine rounds compare each
    particle with the references multiplied by its |CTF|, their references CTF-corrected averages.
    (From a rough start the coarse rounds do better on plain images, whose strong low frequencies
    the |CTF| would weaken.) The returned references are plain averages either way.
    """
    n, box = len(images), images.shape[-1]
    k = settings.n_classes
    if not 2 <= k <= n:
        raise InputError(None, f"number of classes K={k} must be between 2 and the number of particles ({n})")
    max_shift = settings.max_shift if settings.max_shift is not None else box / 8
    t0 = time.perf_counter()
    ctf = ctf if settings.ctf_aware else None
    labels, psi, origin, score = _initial_classes(images, settings, device, max_shift, initial_labels, work)
    rounds = _Rounds(images, settings, device, max_shift, should_stop, ctf)
    state = rounds.state(labels, psi, origin, score)
    passes = []
    if settings.n_iter > 0:
        n_fine = min(settings.fine_rounds, settings.n_iter)
        if settings.ssnr_filter and settings.n_iter > n_fine:
            state, passes = _coarse_plain_and_filtered(rounds, state, images, settings, device, n_fine)
        else:
            state = _coarse(rounds, state, images, settings, device, n_fine)
        state = rounds.run(state, fine=True, limit=n_fine)
    labels, psi, origin, score, references, counts = state[:6]
    history = rounds.history

    if settings.center_classes:
        origin = _centre_classes(references, labels, psi, origin)
    if settings.center_classes or ctf is not None:
        references, counts = class_means(images, labels, psi, origin, k, device, settings.batch_size)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    log.info("classified %d particles into %d classes in %.1f s", n, k, time.perf_counter() - t0)
    return Classification(labels=rank[labels], psi=psi, origin=origin, score=score,
                          references=references[order], history=history, coarse_passes=passes)


class _State(NamedTuple):
    labels: np.ndarray
    psi: np.ndarray
    origin: np.ndarray
    score: np.ndarray
    references: np.ndarray
    counts: np.ndarray
    # what the next round aligns to: the references Wiener-filtered by their half-set SSNR
    # (``ClassifySettings.ssnr_filter``); None: the references as they are
    filtered: np.ndarray | None = None


class _Rounds:
    """Step 3: rounds of multi-reference alignment on ``images``, with their history."""

    def __init__(self, images, settings: ClassifySettings, device: torch.device, max_shift: float,
                 should_stop: Callable[[], None] | None, ctf=None):
        self.images, self.settings, self.device, self.max_shift = images, settings, device, max_shift
        self.should_stop, self.ctf = should_stop, ctf  # used by the fine rounds
        self.ssnr = False  # whether the rounds align to the references filtered by their half-set SSNR
        self.history: list[dict] = []
        # for progress only: every round once, and the coarse rounds and moves again with ssnr_filter
        once = settings.n_iter + settings.split_merge * settings.move_rounds
        n_fine = min(settings.fine_rounds, settings.n_iter)
        self.budget = once + (once - n_fine if settings.ssnr_filter and settings.n_iter > n_fine else 0)
        report(0, self.budget, "round")

    def state(self, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray, score: np.ndarray, ctf=None) -> _State:
        """The state of an assignment: its references (CTF-corrected with ``ctf``), class counts and,
        with ``ssnr_filter``, the references filtered by their half-set SSNR (halves: even and odd rows)."""
        k = self.settings.n_classes
        if not self.ssnr:
            return _State(labels, psi, origin, score,
                          *class_means(self.images, labels, psi, origin, k, self.device, self.settings.batch_size, ctf))
        counts = np.bincount(labels, minlength=k)
        halves = labels * 2 + np.arange(len(labels)) % 2
        sums, power = _class_sums(self.images, halves, psi, origin, 2 * k, self.device, self.settings.batch_size, ctf)
        n_half = np.bincount(halves, minlength=2 * k).reshape(k, 2)
        half_means = _averages(sums, power, n_half.ravel())
        whole = (lambda t: None if t is None else t.reshape(k, 2, *t.shape[1:]).sum(dim=1))
        references = _averages(whole(sums), whole(power), counts)
        weights = ssnr_filter(half_means[0::2], half_means[1::2], n_half[:, 0], n_half[:, 1])
        return _State(labels, psi, origin, score, references, counts, apply_ring_filter(references, weights))

    def run(self, state: _State, fine: bool, limit: int, stage: str = "refine") -> _State:
        """Up to ``limit`` rounds from ``state``'s references; coarse rounds stop once fewer than
        ``settled`` of the particles change class, fine ones once none does."""
        s, images, k = self.settings, self.images, self.settings.n_classes
        ctf = self.ctf if fine else None
        for _ in range(limit):
            if self.should_stop is not None:
                self.should_stop()
            ref_idx, p, o, sc = distributed.per_row(
                align_to_references, images,
                torch.as_tensor(state.references if state.filtered is None else state.filtered, device=self.device),
                psi_step=s.psi_step * (1 if fine else 2), max_shift=self.max_shift, batch_size=s.batch_size,
                device=self.device, progress=True, band=s.fine_band if fine else s.coarse_band, ctf=ctf,
                rescore=s.rescore, rows_too=("ctf",))
            new, score = ref_idx.cpu().numpy(), sc.cpu().numpy()
            changed = float(np.mean(new != state.labels))
            labels = _reseed_empty(new, score, k)
            state = self.state(labels, p.cpu().numpy(), o.cpu().numpy(), score, ctf)
            search = "fine" if fine else "coarse"
            self.history.append({"iteration": len(self.history) + 1, "changed": changed,
                                 "mean_score": float(score.mean()), "sizes": state.counts.tolist(), "search": search,
                                 "stage": stage, "ctf": ctf is not None, "ssnr": self.ssnr, "in_result": True,
                                 "energy": None if ctf is not None else explained_energy(state.references, state.counts)})
            log.info("classification round %d (%s, %s search): %.1f%% of particles changed class, mean score %.3f",
                     len(self.history), stage, search, 100 * changed, float(score.mean()))
            report(len(self.history), self.budget, "round")
            if changed == 0.0 or (not fine and changed < s.settled):
                break
        return state


def _coarse(rounds: _Rounds, state: _State, images, settings: ClassifySettings, device: torch.device,
            n_fine: int) -> _State:
    """The coarse rounds from ``state``, then the merge-and-split moves."""
    state = rounds.run(state, fine=False, limit=settings.n_iter - n_fine)
    if settings.n_iter > n_fine:
        state = _split_merge(state, rounds, images, settings, device)
    return state


def _coarse_plain_and_filtered(rounds: _Rounds, start: _State, images, settings: ClassifySettings,
                               device: torch.device, n_fine: int) -> tuple[_State, list[dict]]:
    """Step 5: the coarse rounds and moves from ``start`` on the plain references, then on the
    SSNR-filtered ones; the run with the higher k-means objective, and both runs' objectives. The
    rounds of the other run are marked ``in_result: False`` in the history; the fine rounds that
    follow align as the kept run did (``rounds.ssnr``)."""
    plain = _coarse(rounds, start, images, settings, device, n_fine)
    plain_rounds = len(rounds.history)
    rounds.ssnr = True
    filtered = _coarse(rounds, rounds.state(*start[:4]), images, settings, device, n_fine)
    energies = [explained_energy(s.references, s.counts) for s in (plain, filtered)]
    keep = energies[1] > energies[0]
    rounds.ssnr = keep
    for i, entry in enumerate(rounds.history):
        entry["in_result"] = (i >= plain_rounds) == keep
    log.info("coarse rounds on plain / SSNR-filtered references: objective %.5g / %.5g, kept the %s ones",
             *energies, "filtered" if keep else "plain")
    passes = [{"ssnr": ssnr, "energy": e, "kept": ssnr == keep} for ssnr, e in zip((False, True), energies)]
    return (filtered if keep else plain), passes


def _split_merge(state: _State, rounds: _Rounds, images, settings: ClassifySettings, device: torch.device) -> _State:
    """Up to ``settings.split_merge`` merge-and-split moves (``cdae_em.splitmerge``), each kept only
    if, after ``move_rounds`` coarse rounds from its references, the k-means objective is higher."""
    base = explained_energy(state.references, state.counts)
    for move in range(settings.split_merge):
        proposal = distributed.on_main(propose, lambda rows: _rows(images, rows, device), state.labels, state.psi,
                                       state.origin, state.references, state.counts, seed=settings.seed + move)
        if proposal is None:
            break
        references, what = proposal
        trial = rounds.run(state._replace(references=references, filtered=None), fine=False, limit=settings.move_rounds,
                           stage=f"move {move + 1}")
        energy = explained_energy(trial.references, trial.counts)
        kept = energy > base
        rounds.history[-1]["move"] = {**what, "energy_before": base, "energy_after": energy, "kept": kept}
        log.info("move %d: merge classes %d+%d (cc %.3f), split class %d (heterogeneity %.2f): objective %.5g -> %.5g, %s",
                 move + 1, what["merge"][0] + 1, what["merge"][1] + 1, what["merge_score"], what["split"] + 1,
                 what["split_ratio"], base, energy, "kept" if kept else "undone")
        if not kept:
            break
        state, base = trial, energy
    return state


def _centre_classes(references: np.ndarray, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Origins that put each class average's centre of mass at the box centre, as 3D work expects.

    The mass is the squared intensity inside the particle mask (either contrast). Shifting the
    aligned images by -s changes each member's origin o to o - R(psi)^T s (the convention of
    ``align.apply_alignment``)."""
    box = references.shape[-1]
    refs = torch.as_tensor(references, dtype=torch.float64)
    refs = refs - refs.mean(dim=(-2, -1), keepdim=True)
    weight = refs.square() * particle_mask(box).double()
    coords = torch.arange(box, dtype=torch.float64) - box // 2
    total = weight.sum(dim=(-2, -1)).clamp_min(1e-30)
    com = torch.stack([(weight.sum(dim=-2) * coords).sum(-1) / total,
                       (weight.sum(dim=-1) * coords).sum(-1) / total], dim=1)  # (K, 2): x, y
    raw = shift_in_raw_frame(com[torch.as_tensor(labels)].float(), torch.as_tensor(psi, dtype=torch.float32))
    log.info("class averages centred: shifts up to %.2f px", float(com.norm(dim=1).max()))
    return (torch.as_tensor(origin, dtype=torch.float32) - raw).numpy()


def _initial_classes(images, settings: ClassifySettings, device: torch.device, max_shift: float,
                     initial_labels: np.ndarray | None, work: Path | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-2: labels from the invariant features (unless given), and each particle aligned onto
    its class medoid (the member nearest the class centre in feature space): labels, psi, origin, score."""
    n, k = len(images), settings.n_classes
    masked = _Masked(images, device)
    radius = estimate_particle_radius(masked[np.arange(min(n, 1000))])
    features = reduced_invariant_features(masked, radius, device, min(settings.n_components, n - 1), settings.seed,
                                          work).numpy()
    if initial_labels is not None:
        labels = np.asarray(initial_labels, dtype=int)
    else:
        labels = distributed.on_main(cluster, features, k, settings.method, settings.seed, settings.hc_max)
    log.info("initial %s classes from invariant features: sizes %s", settings.method, np.bincount(labels, minlength=k).tolist())
    centres = np.stack([features[labels == c].mean(axis=0) if np.any(labels == c) else features[0] for c in range(k)])
    dist = ((features - centres[labels]) ** 2).sum(axis=1)
    medoid = np.array([np.flatnonzero(labels == c)[np.argmin(dist[labels == c])] if np.any(labels == c) else 0
                       for c in range(k)])
    psi = np.zeros(n, np.float32)
    origin = np.zeros((n, 2), np.float32)
    score = np.zeros(n, np.float32)
    lo, hi = distributed.shard(n)
    for start in range(lo, hi, settings.batch_size):
        rows = slice(start, min(start + settings.batch_size, hi))
        refs = _rows(images, medoid[labels[rows]], device)
        p, o, s = align_pairs(_rows(images, rows, device), refs, psi_step=settings.psi_step, max_shift=max_shift,
                              mask_radius=radius)
        psi[rows], origin[rows], score[rows] = p.cpu().numpy(), o.cpu().numpy(), s.cpu().numpy()
    psi, origin, score = (distributed.gather_rows(torch.from_numpy(a[lo:hi])).numpy() for a in (psi, origin, score))
    return labels, psi, origin, score


def _reseed_empty(labels: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Give each empty class the worst-fitting particles of the largest class (half of them)."""
    labels = labels.copy()
    for c in range(k):
        if np.any(labels == c):
            continue
        big = np.bincount(labels, minlength=k).argmax()
        members = np.flatnonzero(labels == big)
        worst = members[np.argsort(score[members])[: max(1, len(members) // 2)]]
        labels[worst] = c
        log.info("class %d was empty: re-seeded with %d particles", c + 1, len(worst))
    return labels
