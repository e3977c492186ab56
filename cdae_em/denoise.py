"""Denoising a particle STAR file with the cascade: input preparation, fine-tuning on the user's
particles (Algorithm 1 of Lei & Yang 2021, with rotation-aware neighbours), inference, histogram
equalisation, and the denoised stacks + STAR file.

Images live in memory-mapped float32 work arrays under ``OUT/.cdae_work/`` (one per stage), so
memory does not grow with the number of particles; the only per-particle data held in RAM are the
kNN features (N x ``n_components`` floats) and the neighbour lists (N x k integers).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from cdae_em.cascade import Cascade
from cdae_em.ctf import CtfParams, ctf_2d, phase_flip
from cdae_em.errors import InputError
from cdae_em.preprocess import equalise_histogram, fourier_resize, soft_circular_mask
from cdae_em.stacks import ImageSource, StackWriter
from cdae_em.star import ParticleTable, read_particles, write_star
from cdae_em.train import TrainSettings, autocast, train_block

log = logging.getLogger(__name__)

WORK_DIR = ".cdae_work"
STACK_CHUNK = 10000  # images per denoised stack file


@dataclass
class DenoiseSettings:
    """Options of ``cdae-em denoise`` (and the denoising stage of ``cdae-em run``)."""

    weights: str | None = None  # None: the weights shipped with cdae-em
    finetune: bool = True
    k: int = 30  # neighbours per particle for the fine-tuning targets (paper: 30)
    max_distance: float | None = None  # neighbours farther than this (feature units) are dropped
    finetune_subset: int = 4000  # particles whose kNN targets train each block (all if fewer)
    n_components: int = 32  # PCA size of the invariant kNN features
    psi_step: float = 5.0  # degrees, rotational search when aligning neighbours
    train: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=3))
    equalise: bool = True  # histogram equalisation of the output (paper: on)
    mask_diameter: float | None = None  # Angstrom; default: 90% of the box
    phase_flip: bool = False  # CTF phase flipping before denoising (needs CTF columns)
    box: int | None = None  # working box (Fourier crop/pad); default: the input box
    batch_size: int = 128
    seed: int = 0


def resolve_device(gpu: str | int | None) -> torch.device:
    """``None``/"" -> CPU; "0" -> cuda:0 (an error if CUDA is not available)."""
    if gpu is None or str(gpu).strip() in ("", "cpu", "-1"):
        return torch.device("cpu")
    gpu = str(gpu).split(",")[0].strip()
    if not torch.cuda.is_available():
        raise InputError(None, f"--gpu {gpu}: CUDA is not available on this machine (torch {torch.__version__})")
    return torch.device(f"cuda:{int(gpu)}")


def open_work_array(path: Path, n: int, box: int, mode: str = "w+") -> np.memmap:
    return np.lib.format.open_memmap(path, mode=mode, dtype=np.float32, shape=(n, box, box))


def prepare_inputs(table: ParticleTable, images: ImageSource, settings: DenoiseSettings, work: Path,
                   device: torch.device) -> tuple[np.memmap, float]:
    """Read particles in STAR order, phase-flip / resize as asked, check them, and store them in
    the work array ``input.npy``; returns it and the working pixel size."""
    per = table.per_particle()
    pixel = per["rlnImagePixelSize"].to_numpy()
    if np.isnan(pixel).any():
        raise InputError(table.path, "no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize and rlnMagnification)")
    box_in = images.box
    box = settings.box or box_in
    prepare = BatchPreparer(table, settings, box_in, device)
    pixel_out = float(np.median(pixel)) * box_in / box
    if (work / "input.done").exists():
        log.info("particles already prepared (resuming)")
        return np.load(work / "input.npy", mmap_mode="r"), pixel_out
    out = open_work_array(work / "input.npy", len(table), box)
    for start, batch in images.batches(settings.batch_size, progress=True):
        rows = slice(start, start + len(batch))
        x = prepare(batch, rows)
        flat = x.reshape(len(x), -1)
        constant = torch.nonzero(flat.std(dim=1) == 0)
        if len(constant):
            row = start + int(constant[0])
            raise InputError(table.path, "image is constant (all pixels equal): nothing to denoise", row=row + 1)
        out[rows] = x.cpu().numpy()
    out.flush()
    (work / "input.done").touch()
    return out, pixel_out


class BatchPreparer:
    """What happens to original particles before the model sees them: optional CTF phase flip,
    then Fourier crop/pad to the working box. ``prepare(batch, rows)`` -> tensor on ``device``."""

    def __init__(self, table: ParticleTable, settings: DenoiseSettings, box_in: int, device: torch.device):
        per = table.per_particle()
        self.pixel = per["rlnImagePixelSize"].to_numpy()
        self.box_in, self.box, self.device = box_in, settings.box or box_in, device
        self.ctf = None
        if settings.phase_flip:
            needed = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
                      "rlnAmplitudeContrast"]
            missing = [c for c in needed if per[c].isna().any()]
            if missing:
                raise InputError(table.path, f"--phase-flip needs CTF values; missing {', '.join(missing)}")
            self.ctf = CtfParams.from_table(per)

    def __call__(self, batch: np.ndarray, rows) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32)).to(self.device)
        if self.ctf is not None:
            x = phase_flip(x, ctf_2d(self.ctf.subset(rows), self.box_in, self.pixel[rows], self.device))
        if self.box != self.box_in:
            x = fourier_resize(x, self.box)
        return x


@torch.no_grad()
def run_block(block: torch.nn.Module, src: np.ndarray, dst: np.ndarray, device: torch.device, batch_size: int,
              desc: str, should_stop: Callable[[], None] | None = None) -> None:
    """dst[i] = block(src[i]) for all i, streamed in batches."""
    block.eval().to(device)
    for start in tqdm(range(0, len(src), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        if should_stop is not None:
            should_stop()
        x = torch.from_numpy(np.array(src[start:start + batch_size])).to(device)
        with autocast(device):
            y = block(x)
        dst[start:start + len(x)] = y.float().cpu().numpy()
    if isinstance(dst, np.memmap):
        dst.flush()


def neighbour_targets(outputs: np.ndarray, rows: np.ndarray, settings: DenoiseSettings, device: torch.device) -> torch.Tensor:
    """Fine-tuning targets for ``rows``: the mean of each one's k nearest neighbours among all
    block outputs, found with rotation/shift-invariant features and aligned to it before averaging.
    """
    from cdae_em.neighbours import aligned_neighbour_means, invariant_features, nearest_neighbours, reduce_features

    feats = invariant_features(outputs, device=device).cpu()  # one mask radius for all particles
    features = reduce_features(feats, n_components=settings.n_components, seed=settings.seed)
    idx, _ = nearest_neighbours(features, settings.k, max_distance=settings.max_distance)
    return aligned_neighbour_means(outputs, idx[torch.as_tensor(rows)], rows=torch.as_tensor(rows),
                                   psi_step=settings.psi_step, batch_size=settings.batch_size, progress=True,
                                   device=device)


def finetune(model: Cascade, inputs: np.ndarray, work: Path, settings: DenoiseSettings, device: torch.device,
             should_stop: Callable[[], None] | None = None) -> list[dict]:
    """Algorithm 1, lines 2-7: fine-tune blocks 1, 2, 3 in order on the user's particles.

    For block j: y = f_j(x_j) for every particle; target_i = mean of y over x_i's aligned k nearest
    neighbours; train f_j on (x_j[i], target_i) for a random subset of particles; then the fine-tuned
    f_j's output is x_{j+1}. Returns one record per block (losses, timings).

    Resumable: after block j, its weights (``block{j}.pt``), its output (``block{j}.npy``) and a
    marker (``block{j}.done``) are in ``work``; a rerun loads finished blocks instead of redoing
    them. Each block draws from its own seeded generator, so a resumed run gives the same result.
    """
    from cdae_em.weights import load_weights, save_weights

    n = len(inputs)
    if n <= settings.k:
        raise InputError(None, f"{n} particles are too few for {settings.k} neighbours: give more particles or a smaller --k")
    history = []
    x = inputs
    box = inputs.shape[-1]
    for j, block in enumerate(model.blocks, start=1):
        done = work / f"block{j}.done"
        if done.exists():
            finished, _ = load_weights(work / f"block{j}.pt", map_location=device)
            model.blocks[j - 1].load_state_dict(finished.blocks[j - 1].state_dict())
            x = np.load(work / f"block{j}.npy", mmap_mode="r")
            history.append({"block": j, "resumed": True})
            log.info("block %d: already fine-tuned (resuming)", j)
            continue
        t0 = time.perf_counter()
        rng = np.random.default_rng([settings.seed, j])
        y = open_work_array(work / f"block{j}_before.npy", n, box)
        run_block(block, x, y, device, settings.batch_size, f"block {j}: denoise", should_stop)
        rows = np.sort(rng.choice(n, size=min(n, settings.finetune_subset), replace=False))
        log.info("block %d: kNN targets (k=%d) for %d particles", j, settings.k, len(rows))
        targets = neighbour_targets(y, rows, settings, device).cpu().numpy()
        del y
        (work / f"block{j}_before.npy").unlink()
        train = TrainSettings(**{**asdict(settings.train), "seed": settings.seed + j})
        record = {"block": j, "particles": len(rows),
                  "epochs": train_block(block, _Rows(x, rows), targets, train, device, desc=f"block {j}: fine-tune",
                                        should_stop=should_stop)}
        nxt = open_work_array(work / f"block{j}.npy", n, box)
        run_block(block, x, nxt, device, settings.batch_size, f"block {j}: denoise", should_stop)
        save_weights(model, work / f"block{j}.pt", {"fine-tuned blocks": j})
        done.touch()
        if j > 1:
            (work / f"block{j - 1}.npy").unlink(missing_ok=True)
        x = nxt
        record["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(record)
        log.info("block %d fine-tuned in %.1f s", j, record["seconds"])
    return history


class _Rows:
    """A view of ``array[rows]`` that indexes like an array (for training on a subset)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        return self.array[self.rows[idx]]


def stack_names(out_dir: Path, n: int) -> list[Path]:
    """Paths of the denoised stacks: ``denoised/particles_00001.mrcs`` ... (STACK_CHUNK each)."""
    return [out_dir / "denoised" / f"particles_{i + 1:05d}.mrcs" for i in range((n + STACK_CHUNK - 1) // STACK_CHUNK)]


def star_path_name(path: Path) -> str:
    """How an output file is named in a STAR file: relative to the working directory (RELION's
    project directory) when it lies below it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_denoised(table: ParticleTable, images: np.ndarray, out_dir: Path, pixel_size: float,
                   settings: DenoiseSettings, device: torch.device) -> Path:
    """Equalise (if asked) and write the denoised stacks and ``denoised_particles.star``.

    Stacks are written in the work directory and moved to ``denoised/`` only when all are
    complete; the STAR file comes last, so a pipeline never sees a half-written result.
    """
    n, box = len(images), images.shape[-1]
    diameter = settings.mask_diameter / pixel_size if settings.mask_diameter else 0.9 * box
    mask = soft_circular_mask(box, radius=diameter / 2 - 2, width=4, device=device)
    staging = out_dir / WORK_DIR / "denoised"
    staging.mkdir(parents=True, exist_ok=True)
    final_paths = stack_names(out_dir, n)
    names = []
    for i, path in enumerate(final_paths):
        lo, hi = i * STACK_CHUNK, min(n, (i + 1) * STACK_CHUNK)
        with StackWriter(staging / path.name, hi - lo, box, pixel_size) as writer:
            for start in range(lo, hi, settings.batch_size):
                x = torch.from_numpy(np.array(images[start:min(hi, start + settings.batch_size)])).to(device)
                if settings.equalise:
                    x = equalise_histogram(x, mask)
                writer.write(start - lo, x.cpu().numpy())
        rel = star_path_name(path)
        names += [f"{k:06d}@{rel}" for k in range(1, hi - lo + 1)]
    (out_dir / "denoised").mkdir(exist_ok=True)
    for path in final_paths:
        os.replace(staging / path.name, path)
    updates = {"rlnImageName": names, "rlnImageOriginalName": table.particles["rlnImageName"].to_numpy()}
    optics = {}
    if table.flavour == "3.1":
        optics = {"rlnImagePixelSize": pixel_size, "rlnImageSize": box}
        if settings.phase_flip:
            optics["rlnCtfDataArePhaseFlipped"] = 1
    else:
        if "rlnImagePixelSize" in table.particles or "rlnMagnification" not in table.particles:
            updates["rlnImagePixelSize"] = np.full(n, pixel_size)
        else:  # RELION 3.0: pixel size = detector pixel (um) * 1e4 / magnification
            updates["rlnMagnification"] = table.particles["rlnDetectorPixelSize"].to_numpy(float) * 1e4 / pixel_size
    star = out_dir / "denoised_particles.star"
    write_star(table.with_columns(particles=updates, optics=optics), star)
    return star


def load_model(settings: DenoiseSettings, device: torch.device) -> tuple[Cascade, dict]:
    from cdae_em.weights import default_weights_path, load_weights

    path = settings.weights or default_weights_path()
    model, meta = load_weights(path, map_location=device)
    log.info("weights: %s", path)
    return model, meta


def denoise(star: str | Path, out_dir: str | Path, settings: DenoiseSettings, device: torch.device,
            project_dir: str | Path | None = None, keep_work: bool = False,
            should_stop: Callable[[], None] | None = None) -> dict:
    """Denoise every particle of ``star`` into ``out_dir``; returns a summary (timings, losses)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    table = read_particles(star)
    model, meta = load_model(settings, device)
    torch.manual_seed(settings.seed)
    with ImageSource(table, project_dir=project_dir) as images:
        if images.box < 8:
            raise InputError(star, f"images of {images.box} px are too small for the model (at least 8)")
        out.mkdir(parents=True, exist_ok=True)
        work = out / WORK_DIR
        work.mkdir(exist_ok=True)
        log.info("denoising %d particles of %d px from %s", len(table), images.box, star)
        inputs, pixel = prepare_inputs(table, images, settings, work, device)
    summary: dict = {"particles": len(table), "box": inputs.shape[-1], "pixel_size": pixel,
                     "weights": str(settings.weights or "default"), "weights_metadata": meta.get("command")}
    if settings.finetune:
        summary["finetune"] = finetune(model, inputs, work, settings, device, should_stop)
        final = np.load(work / f"block{len(model.blocks)}.npy", mmap_mode="r")
    else:
        final = inputs
        for j, block in enumerate(model.blocks, start=1):
            nxt = open_work_array(work / f"block{j}.npy", len(inputs), inputs.shape[-1])
            run_block(block, final, nxt, device, settings.batch_size, f"block {j}: denoise", should_stop)
            final = nxt
        summary["finetune"] = []
    summary["denoised_star"] = str(write_denoised(table, final, out, pixel, settings, device))
    from cdae_em.figures import gallery, raw_denoised_pairs

    gallery(out / "denoised_pairs.png", None, None,
            raw_denoised_pairs(out / "denoised_particles.star", star, project_dir, n_pairs=8))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    del final, inputs
    if not keep_work:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    log.info("denoised %d particles in %.1f s", len(table), summary["seconds"])
    return summary
