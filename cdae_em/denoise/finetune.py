"""Fine-tuning the cascade on the user's particles (Algorithm 1 of Lei & Yang 2021, with
rotation-aware neighbours): kNN-mean targets, block-by-block training, resumable per block.

Work arrays are memory-mapped ``.npy`` files under ``OUT/.cdae_work/`` (see ``cdae_em.denoise.stage``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cdae_em.denoise.cascade import Cascade
from cdae_em.runtime import distributed
from cdae_em.denoise.inference import run_block
from cdae_em.runtime.workarrays import shared_work_array, work_size
from cdae_em.settings import DenoiseSettings
from cdae_em.errors import InputError
from cdae_em.io.memory import Streamed
from cdae_em.denoise.train import train_block
from cdae_em.settings import TrainSettings

log = logging.getLogger(__name__)


def neighbour_targets(outputs: np.ndarray, rows: np.ndarray, settings: DenoiseSettings, device: torch.device,
                      valid: np.ndarray | None = None, work: Path | None = None) -> torch.Tensor:
    """Fine-tuning targets for ``rows``: the mean of each one's k nearest neighbours among all
    block outputs (among the ``valid`` rows only, if given: blank images are never neighbours),
    found with rotation/shift-invariant features and aligned to it before averaging. Only the
    neighbours of ``rows`` are searched for (exact, or approximate at scale: ``cdae_em.core.knn``). With
    a ``work`` directory the invariant features (N x ~1,100 at 64 px) go to a memory-mapped work
    array there, each rank writing its rows, instead of being held (and gathered) in memory.
    """
    from cdae_em.core.align import estimate_particle_radius
    from cdae_em.core.knn import find_neighbours
    from cdae_em.core.neighbours import aligned_neighbour_means, reduced_invariant_features

    outputs = Streamed(outputs)  # read through the map, resident memory kept flat (cdae_em.io.memory)
    radius = estimate_particle_radius(outputs, device=device)  # one mask radius for all particles (and ranks)
    rows = np.asarray(rows)
    if valid is None:
        valid = np.arange(len(outputs))
    features = reduced_invariant_features(outputs, radius, device, settings.n_components, settings.seed, work,
                                          rows=valid)
    lo, hi = distributed.shard(len(rows))  # each rank: the neighbours and targets of its share of ``rows``
    found = find_neighbours(features, settings.k, queries=np.searchsorted(valid, rows[lo:hi]),
                            max_distance=settings.max_distance, seed=settings.seed)
    idx = torch.as_tensor(valid)[found.indices]  # back to rows of ``outputs``
    means = aligned_neighbour_means(outputs, idx, rows=torch.as_tensor(rows[lo:hi]), psi_step=settings.psi_step,
                                    batch_size=settings.batch_size, progress=True, device=device,
                                    mask_radius=radius)
    return distributed.gather_rows(means.cpu())


def finetune(model: Cascade, inputs: np.ndarray, work: Path, settings: DenoiseSettings, device: torch.device,
             should_stop: Callable[[], None] | None = None, blank: np.ndarray | None = None,
             holdout: np.ndarray | None = None) -> list[dict]:
    """Algorithm 1, lines 2-7: fine-tune blocks 1, 2, 3 in order on the user's particles.

    For block j: y = f_j(x_j) for every particle; target_i = mean of y over x_i's aligned k nearest
    neighbours; train f_j on (x_j[i], target_i) for a random subset of particles; then the fine-tuned
    f_j's output is x_{j+1}. Returns one record per block (losses, timings).

    Resumable: after block j, its weights (``block{j}.pt``), its output (``block{j}.npy``) and a
    marker (``block{j}.done``) are in ``work``; a rerun loads finished blocks instead of redoing
    them. Each block draws from its own seeded generator, so a resumed run gives the same result.
    ``holdout`` rows are never trained on (they check the result, see ``cdae_em.denoise.selfcheck``).
    """
    from cdae_em.denoise.weights import load_weights, save_weights

    n = len(inputs)
    valid = np.setdiff1d(np.arange(n), blank if blank is not None else [])  # blank images never train
    if len(valid) <= settings.k:
        raise InputError(None, f"{len(valid)} particles are too few for {settings.k} neighbours: give more particles "
                         "or a smaller --neighbours")
    history = []
    box = inputs.shape[-1]
    resumed = distributed.broadcast(resume_point(work, len(model.blocks), n, box) if distributed.world().main else None)
    if resumed:  # the last finished block's file holds every block fine-tuned so far
        finished, _ = load_weights(work / f"block{resumed}.pt", map_location=device)
        for i in range(resumed):
            model.blocks[i].load_state_dict(finished.blocks[i].state_dict())
            history.append({"block": i + 1, "resumed": True})
            log.info("block %d: already fine-tuned (resuming)", i + 1)
    x = np.load(work / f"block{resumed}.npy", mmap_mode="r") if resumed else inputs  # only what is needed
    for j, block in enumerate(model.blocks, start=1):
        done = work / f"block{j}.done"
        if j <= resumed:
            continue
        t0 = time.perf_counter()
        rng = np.random.default_rng([settings.seed, j])
        y = shared_work_array(work / f"block{j}_before.npy", n, box)
        run_block(block, x, y, device, settings.batch_size, f"block {j}: denoise", should_stop)
        trainable = np.setdiff1d(valid, holdout) if holdout is not None and len(valid) - len(holdout) > settings.k else valid
        rows = np.sort(rng.choice(trainable, size=min(len(trainable), settings.finetune_subset), replace=False))
        log.info("block %d: kNN targets (k=%d) for %d particles", j, settings.k, len(rows))
        targets = neighbour_targets(y, rows, settings, device, valid=valid, work=work).cpu().numpy()
        del y
        if distributed.world().main:
            (work / f"block{j}_before.npy").unlink()
        train = TrainSettings(**{**asdict(settings.train), "seed": settings.seed + j})
        record = {"block": j, "particles": len(rows),
                  "epochs": train_block(block, _Rows(Streamed(x), rows), targets, train, device, desc=f"block {j}: fine-tune",
                                        should_stop=should_stop)}
        nxt = shared_work_array(work / f"block{j}.npy", n, box)
        run_block(block, x, nxt, device, settings.batch_size, f"block {j}: denoise", should_stop)
        record["work_bytes"] = work_size(work.parent)  # input, x and this block's output: the largest point
        if distributed.world().main:
            save_weights(model, work / f"block{j}.pt", {"fine-tuned blocks": j})
            done.touch()
            if j > 1:
                (work / f"block{j - 1}.npy").unlink(missing_ok=True)
        distributed.barrier()
        x = nxt
        record["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(record)
        log.info("block %d fine-tuned in %.1f s", j, record["seconds"])
    return history


def resume_point(work: Path, n_blocks: int, n: int, box: int) -> int:
    """The last fine-tuned block a rerun can start after (0: none): its marker, weights and output
    array (of the right shape) are all there. Markers of later or incomplete blocks are removed."""
    point = 0
    for j in range(1, n_blocks + 1):
        if not (work / f"block{j}.done").exists():
            break
        if (work / f"block{j}.pt").exists() and (work / f"block{j}.npy").exists():
            try:
                if np.load(work / f"block{j}.npy", mmap_mode="r").shape == (n, box, box):
                    point = j
            except (OSError, ValueError):
                pass
    for j in range(point + 1, n_blocks + 1):
        (work / f"block{j}.done").unlink(missing_ok=True)
    return point


class _Rows:
    """A view of ``array[rows]`` that indexes like an array (for training on a subset)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        return self.array[self.rows[idx]]
