"""2D classification of (denoised) particles up to in-plane rotation and shift.

1. Initial classes (``cdae_em.classify.initial``) from rotation/shift-invariant features
   (``neighbours.invariant_features`` + PCA),
   clustered by k-means (mini-batch when large) or hierarchical clustering (Ward, on a subsample
   of at most ``hc_max`` particles, the rest assigned to the nearest class centre) - the paper's two.
2. Initial references: each class's members aligned onto its medoid (the member nearest the
   class centre in feature space) and averaged.
3. ``n_iter`` rounds of multi-reference alignment: every particle aligned to every reference
   (rotation on a psi grid, shift by FFT cross-correlation), assigned to the nearest one in least
   squares (``criterion``; the least-squares distance fixes the match's scale, so that an image
   holding part of a particle's signal, a fragment or an empty box, is nearer a faint junk average
   than a particle's, as in RELION's likelihood), references re-averaged from the aligned
   particles. Coarse to fine: all rounds but the last ``fine_rounds`` search at twice the psi step and a lower frequency band; the ``rescore`` references that match a
   particle best within the band are then compared with it at full resolution, where views that
   differ only in fine detail are told apart. With K above ``shortlist``, each round searches a
   particle in full only against the ``shortlist`` references that match it best in a cheaper
   search over all K (below ``shortlist_band`` at 4 x psi_step). Views that differ only in fine
   detail look alike there, so they are shortlisted together. In the fine rounds of CTF
   phase-flipped particles,
   each is compared with the references multiplied by its |CTF| (``ctf_aware``), and the
   references are CTF-corrected averages. Empty classes are re-seeded with the worst-fitting
   particles of the largest class.
4. After the coarse rounds, up to ``split_merge`` merge-and-split moves (``cdae_em.classify.splitmerge``): the
   two most alike classes merged, the most heterogeneous one split, a few coarse rounds, and the
   move kept only if the k-means objective rose. They undo the local optimum where two views share
   a class while another view is split over two.
5. The rounds align to the references Wiener-filtered by their SSNR (``ssnr_filter`` "always"; per
   Fourier ring, from the FRC of the averages of each class's two halves). Filtering keeps the
   frequencies where a class average is mostly noise from deciding a particle's class, which wins
   at low SNR, and makes the average of a class without consistent signal (junk) faint. With
   ``ssnr_filter`` "choose", steps 3 (coarse rounds) and 4 run on the plain references and again
   from the same start on the filtered ones, and the run with the higher k-means objective goes
   on to the fine rounds (views that differ only in faint detail can do better on the plain
   references); "never": the plain references.
6. With the |CTF| of phase-flipped particles, after the fine rounds, up to ``split_merge`` moves
   again, each judged after ``fine_rounds`` fine rounds. Views that differ in faint detail (two
   views correlating at 0.98) are told apart only by the CTF-aware comparison, so a merge of two
   of them that the coarse rounds made is undone only here. The split follows the members'
   residuals from their CTF-corrected average weighted by |CTF| (not their defocus), the merge takes
   the pair that costs the objective least (a small, noisy class that the correlation passes over).
   Class averages (plain, CTF-corrected, SSNR-filtered) are computed in ``cdae_em.core.averages``.
7. With more than ``subset_per_class`` x K particles, steps 1-6 run on a random subset of that
   size, and then ``fine_rounds`` fine rounds assign every particle to the classes found there.
Classes are returned ordered by size (class 1 the largest), with each particle's psi and origin in
RELION's convention (applying them to the particle brings it onto its class average).

Cost: step 3 dominates, N x K x (360 / psi_step) cross-correlations per round, computed by FFT in
batches (see ``multiref.align_to_references``); the shortlist makes the part that grows with K the
cheaper search's, and step 7 bounds N in all but the last rounds (docs/scale.md). Memory holds the features (N x n_components) and the
per-particle alignment (N x 4), images are streamed. Each round's wall time is in the history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from cdae_em.runtime import distributed
from cdae_em.core.multiref import Shortlist, align_to_references
from cdae_em.core.averages import (apply_ring_filter, averages_from_sums, centred_origins, class_means, class_sums,
                               masked_rows, ssnr_filter)
from cdae_em.errors import InputError
from cdae_em.runtime.progress import report
from cdae_em.settings import ClassifySettings
from cdae_em.classify.initial import initial_classes
from cdae_em.classify.splitmerge import explained_energy, propose

log = logging.getLogger(__name__)


@dataclass
class Classification:
    labels: np.ndarray  # (N,) 0 .. K-1, class 0 the largest
    psi: np.ndarray  # (N,) degrees
    origin: np.ndarray  # (N, 2) pixels (x, y)
    score: np.ndarray  # (N,) normalised cross-correlation with the class reference
    references: np.ndarray  # (K, box, box) aligned averages of the classified images
    history: list = field(default_factory=list)
    # with ssnr_filter "choose": the two runs of the coarse rounds, {"ssnr": bool, "energy": objective, "kept": bool}
    coarse_passes: list = field(default_factory=list)


def classify(images, settings: ClassifySettings, device: torch.device,
             should_stop: Callable[[], None] | None = None,
             initial_labels: np.ndarray | None = None, work: Path | None = None, ctf=None) -> Classification:
    """Classify ``images`` (N, box, box; an array or memmap) into ``settings.n_classes`` classes.

    ``initial_labels`` (N,) replaces step 1 (e.g. classes found on other images of the same
    particles); alignment and re-assignment then run on ``images``. With a ``work`` directory the
    invariant features of step 1 go to a memory-mapped array there (removed after the PCA), so
    that resident memory does not grow with N. ``ctf``: the |CTF| of phase-flipped ``images``
    (``cdae_em.core.ctf.CtfAmplitudes``); with ``settings.ctf_aware`` the fine rounds compare each
    particle with the references multiplied by its |CTF|, their references CTF-corrected averages.
    (From a rough start the coarse rounds do better on plain images, whose strong low frequencies
    the |CTF| would weaken.) The returned references are plain averages either way.
    """
    n, box = len(images), images.shape[-1]
    k = settings.n_classes
    if settings.ssnr_filter not in ("always", "never", "choose"):
        raise ValueError(f"unknown ssnr_filter {settings.ssnr_filter!r}")
    if not 2 <= k <= n:
        raise InputError(None, f"number of classes K={k} must be between 2 and the number of particles ({n})")
    max_shift = settings.max_shift if settings.max_shift is not None else box / 8
    t0 = time.perf_counter()
    ctf = ctf if settings.ctf_aware else None
    subset = _subset(n, settings)
    if subset is None:
        state, rounds, passes = _find_classes(images, settings, device, max_shift, should_stop, initial_labels,
                                              work, ctf)
    else:
        state, rounds, passes = _find_classes_on_subset(images, subset, settings, device, max_shift, should_stop,
                                                        initial_labels, work, ctf)
    labels, psi, origin, score, references, counts = state[:6]
    history = rounds.history

    if settings.center_classes:
        origin = centred_origins(references, labels, psi, origin)
    if settings.center_classes or ctf is not None:
        references, counts = class_means(images, labels, psi, origin, k, device, settings.batch_size)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    log.info("classified %d particles into %d classes in %.1f s", n, k, time.perf_counter() - t0)
    return Classification(labels=rank[labels], psi=psi, origin=origin, score=score,
                          references=references[order], history=history, coarse_passes=passes)


def _find_classes(images, settings: ClassifySettings, device: torch.device, max_shift: float,
                  should_stop: Callable[[], None] | None, initial_labels: np.ndarray | None, work: Path | None,
                  ctf, later_rounds: int = 0) -> tuple[_State, _Rounds, list[dict]]:
    """Steps 1-6 on ``images``: the final state, the rounds (their history) and the coarse passes.
    ``later_rounds``: rounds the caller runs afterwards, counted in the progress."""
    labels, psi, origin, score = initial_classes(images, settings, device, max_shift, initial_labels, work)
    rounds = _Rounds(images, settings, device, max_shift, should_stop, ctf, later_rounds)
    state = rounds.state(labels, psi, origin, score)
    passes = []
    if settings.n_iter > 0:
        n_fine = min(settings.fine_rounds, settings.n_iter)
        if settings.ssnr_filter == "choose" and settings.n_iter > n_fine:
            state, passes = _coarse_plain_and_filtered(rounds, state, images, settings, device, n_fine)
        else:
            state = _coarse(rounds, state, images, settings, device, n_fine)
        state = rounds.run(state, fine=True, limit=n_fine)
        if ctf is not None:
            state = _split_merge(state, rounds, images, settings, device, fine=True)
    return state, rounds, passes


def _subset(n: int, settings: ClassifySettings) -> np.ndarray | None:
    """The rows (sorted, seeded) the classes are found on when there are more than
    ``subset_per_class`` x K particles; None: all of them."""
    size = settings.subset_per_class * settings.n_classes
    if not size or n <= size or settings.n_iter == 0:
        return None
    return np.sort(np.random.default_rng(settings.seed).choice(n, size=size, replace=False))


def _find_classes_on_subset(images, subset: np.ndarray, settings: ClassifySettings, device: torch.device,
                            max_shift: float, should_stop: Callable[[], None] | None,
                            initial_labels: np.ndarray | None, work: Path | None, ctf
                            ) -> tuple[_State, _Rounds, list[dict]]:
    """Steps 1-6 on the ``subset`` rows, then the fine rounds on every particle from the classes
    found there (no moves: they were made on the subset). Only these last ``fine_rounds`` read
    every particle, so the cost of the rest does not grow with N."""
    n_fine = min(settings.fine_rounds, settings.n_iter)
    log.info("finding the classes on %d of the %d particles (%d a class), then assigning every particle",
             len(subset), len(images), settings.subset_per_class)
    part, part_rounds, passes = _find_classes(
        _Rows(images, subset), settings, device, max_shift, should_stop,
        None if initial_labels is None else np.asarray(initial_labels)[subset], work,
        None if ctf is None else _Rows(ctf, subset), later_rounds=n_fine)
    n = len(images)
    labels = np.full(n, -1)  # not yet assigned
    psi, origin, score = np.zeros(n, np.float32), np.zeros((n, 2), np.float32), np.zeros(n, np.float32)
    labels[subset], psi[subset], origin[subset], score[subset] = part.labels, part.psi, part.origin, part.score
    rounds = _Rounds(images, settings, device, max_shift, should_stop, ctf, after=part_rounds)
    state = part._replace(labels=labels, psi=psi, origin=origin, score=score)
    # every particle is assigned by the first round, so the stop on no change cannot end it early
    return rounds.run(state, fine=True, limit=n_fine, stage="all particles"), rounds, passes


class _Rows:
    """Rows ``rows`` of an array-like (``len``, ``shape``, ``[rows]``) as an array-like."""

    def __init__(self, images, rows: np.ndarray):
        self.images, self.rows = images, rows
        self.shape = (len(rows), *images.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows):
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        return self.images[self.rows[rows]]


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
                 should_stop: Callable[[], None] | None, ctf=None, later_rounds: int = 0,
                 after: _Rounds | None = None):
        """``later_rounds``: rounds run after these, counted in the progress; ``after``: the rounds
        (on other images of the same particles) these continue: their history, progress and
        choice of references."""
        self.images, self.settings, self.device, self.max_shift = images, settings, device, max_shift
        self.should_stop, self.ctf = should_stop, ctf  # used by the fine rounds
        if after is not None:
            self.ssnr, self.history, self.budget = after.ssnr, after.history, after.budget
            return
        # whether the rounds align to the references filtered by their half-set SSNR ("choose" sets it per run)
        self.ssnr = settings.ssnr_filter == "always"
        self.history: list[dict] = []
        # for progress only: every round once, the coarse rounds and moves again with ssnr_filter,
        # and with the CTF the fine moves
        once = settings.n_iter + settings.split_merge * settings.move_rounds
        n_fine = min(settings.fine_rounds, settings.n_iter)
        self.budget = once + (once - n_fine if settings.ssnr_filter == "choose" and settings.n_iter > n_fine else 0)
        self.budget += (settings.split_merge * n_fine if ctf is not None else 0) + later_rounds
        report(0, self.budget, "round")

    def state(self, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray, score: np.ndarray, ctf=None) -> _State:
        """The state of an assignment: its references (CTF-corrected with ``ctf``), class counts and,
        while the rounds align to filtered references (``ssnr``), the references filtered by their
        half-set SSNR (halves: even and odd rows)."""
        k = self.settings.n_classes
        if not self.ssnr:
            return _State(labels, psi, origin, score,
                          *class_means(self.images, labels, psi, origin, k, self.device, self.settings.batch_size, ctf))
        counts = np.bincount(labels, minlength=k)
        halves = labels * 2 + np.arange(len(labels)) % 2
        sums, power = class_sums(self.images, halves, psi, origin, 2 * k, self.device, self.settings.batch_size, ctf)
        n_half = np.bincount(halves, minlength=2 * k).reshape(k, 2)
        half_means = averages_from_sums(sums, power, n_half.ravel())
        whole = (lambda t: None if t is None else t.reshape(k, 2, *t.shape[1:]).sum(dim=1))
        references = averages_from_sums(whole(sums), whole(power), counts)
        weights = ssnr_filter(half_means[0::2], half_means[1::2], n_half[:, 0], n_half[:, 1])
        return _State(labels, psi, origin, score, references, counts, apply_ring_filter(references, weights))

    def shortlist(self) -> Shortlist | None:
        """The cheaper search that picks the references a round compares each particle with in full."""
        s = self.settings
        return Shortlist(s.shortlist, s.shortlist_band, 4 * s.psi_step) if s.shortlist else None

    def run(self, state: _State, fine: bool, limit: int, stage: str = "refine") -> _State:
        """Up to ``limit`` rounds from ``state``'s references; coarse rounds stop once fewer than
        ``settled`` of the particles change class, fine ones once none does."""
        s, images, k = self.settings, self.images, self.settings.n_classes
        ctf = self.ctf if fine else None
        for _ in range(limit):
            if self.should_stop is not None:
                self.should_stop()
            t0 = time.perf_counter()
            ref_idx, p, o, sc = distributed.per_row(
                align_to_references, images,
                torch.as_tensor(state.references if state.filtered is None else state.filtered, device=self.device),
                psi_step=s.psi_step * (1 if fine else 2), max_shift=self.max_shift, batch_size=s.batch_size,
                device=self.device, progress=True, band=s.fine_band if fine else s.coarse_band, ctf=ctf,
                rescore=s.rescore, shortlist=self.shortlist(), criterion=s.criterion, rows_too=("ctf",))
            new, score = ref_idx.cpu().numpy(), sc.cpu().numpy()
            changed = float(np.mean(new != state.labels))
            labels = _reseed_empty(new, score, k)
            state = self.state(labels, p.cpu().numpy(), o.cpu().numpy(), score, ctf)
            search = "fine" if fine else "coarse"
            self.history.append({"iteration": len(self.history) + 1, "changed": changed,
                                 "mean_score": float(score.mean()), "sizes": state.counts.tolist(), "search": search,
                                 "stage": stage, "ctf": ctf is not None, "ssnr": self.ssnr, "in_result": True,
                                 "energy": None if ctf is not None else explained_energy(state.references, state.counts),
                                 "seconds": round(time.perf_counter() - t0, 2)})
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


def _split_merge(state: _State, rounds: _Rounds, images, settings: ClassifySettings, device: torch.device,
                 fine: bool = False) -> _State:
    """Up to ``settings.split_merge`` merge-and-split moves (``cdae_em.classify.splitmerge``), each kept only
    if, after ``move_rounds`` coarse rounds from its references, the k-means objective (of the plain
    class averages) is higher. ``fine``: step 6, the moves after the CTF-aware fine rounds: the
    split from the members' CTF-weighted residuals within the fine band, the merge of the pair
    that costs the objective least, each move judged after ``fine_rounds`` fine rounds."""
    k = settings.n_classes
    if fine:
        n_rounds, ctf, band, merge_by = min(settings.fine_rounds, settings.n_iter), rounds.ctf, settings.fine_band, "cost"
    else:
        n_rounds, ctf, band, merge_by = settings.move_rounds, None, None, "correlation"

    def plain(s: _State) -> tuple[float, np.ndarray]:
        refs, counts = (class_means(images, s.labels, s.psi, s.origin, k, device, settings.batch_size) if fine
                        else (s.references, s.counts))
        return explained_energy(refs, counts), refs

    base, references = plain(state)
    for move in range(settings.split_merge):
        proposal = distributed.on_main(propose, lambda rows: masked_rows(images, rows, device), state.labels, state.psi,
                                       state.origin, references, state.counts, seed=settings.seed + move,
                                       ctf=ctf, band=band, merge_by=merge_by)
        if proposal is None:
            break
        new_refs, what = proposal
        stage = f"{'fine ' if fine else ''}move {move + 1}"
        trial = rounds.run(state._replace(references=new_refs, filtered=None), fine=fine, limit=n_rounds, stage=stage)
        energy, trial_refs = plain(trial)
        kept = energy > base
        rounds.history[-1]["move"] = {**what, "energy_before": base, "energy_after": energy, "kept": kept}
        log.info("%s: merge classes %d+%d (cc %.3f), split class %d (heterogeneity %.2f): objective %.5g -> %.5g, %s",
                 stage, what["merge"][0] + 1, what["merge"][1] + 1, what["merge_score"], what["split"] + 1,
                 what["split_ratio"], base, energy, "kept" if kept else "undone")
        if not kept:
            break
        state, base, references = trial, energy, trial_refs
    return state


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
