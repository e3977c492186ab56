"""Denoising a particle STAR file with the cascade: input preparation, fine-tuning on the user's
particles (Algorithm 1 of Lei & Yang 2021, with rotation-aware neighbours), inference, histogram
equalisation, and the denoised stacks + STAR file.

Images live in memory-mapped float32 work arrays under ``OUT/.cdae_work/`` (one per stage), so
memory does not grow with the number of particles; the only per-particle data held in RAM are the
kNN features (N x ``n_components`` floats) and the neighbour lists (N x k integers).
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from cdae_em import distributed
from cdae_em.cascade import Cascade
from cdae_em.prepare import BatchPreparer, resolve_phase_flip
from cdae_em.errors import InputError
from cdae_em.memory import Releaser, Streamed
from cdae_em.preprocess import equalise_histogram, particle_mask
from cdae_em.selfcheck import check_rows, choose_polarity, finetuning_helped
from cdae_em.stacks import ImageSource, StackWriter
from cdae_em.star import ParticleTable, read_particles, write_star
from cdae_em.train import autocast
from cdae_em.settings import DenoiseSettings

log = logging.getLogger(__name__)

WORK_DIR = ".cdae_work"
STACK_CHUNK = 10000  # images per denoised stack file


def resolve_device(gpu: str | int | None) -> torch.device:
    """``None``/"" -> CPU; "0" -> cuda:0 (an error if CUDA is not available)."""
    if gpu is None or str(gpu).strip() in ("", "cpu", "-1"):
        return torch.device("cpu")
    gpu = str(gpu).split(",")[0].strip()
    if not torch.cuda.is_available():
        raise InputError(None, f"--gpu {gpu}: CUDA is not available on this machine (torch {torch.__version__})")
    return torch.device(f"cuda:{int(gpu)}")


def open_work_array(path: Path, n: int, box: int, mode: str = "w+", shape: tuple | None = None) -> np.memmap:
    """A float32 (n, box, box) ``.npy`` work array (or of ``shape``), memory-mapped. A new one has
    its disk space reserved at once, so that a full disk is an ``OSError`` (ENOSPC) here rather
    than a SIGBUS halfway through writing into the map."""
    array = np.lib.format.open_memmap(path, mode=mode, dtype=np.float32, shape=shape or (n, box, box))
    if mode == "w+" and hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate
                del array
                Path(path).unlink(missing_ok=True)
                raise OSError(exc.errno, exc.strerror, str(path)) from None
        finally:
            os.close(fd)
    return array


def shared_work_array(path: Path, n: int, box: int, shape: tuple | None = None) -> np.memmap:
    """A new work array that every rank of a distributed run writes its rows into: rank 0 creates
    it (``open_work_array``), the others open it once it exists. One process: ``open_work_array``."""
    if not distributed.active():
        return open_work_array(path, n, box, shape=shape)
    if distributed.world().main:
        array = open_work_array(path, n, box, shape=shape)
        distributed.barrier()
        return array
    distributed.barrier()
    return open_work_array(path, n, box, mode="r+", shape=shape)


def prepare_inputs(table: ParticleTable, images: ImageSource, settings: DenoiseSettings, work: Path,
                   device: torch.device) -> tuple[np.memmap, float, np.ndarray]:
    """Read particles in STAR order, phase-flip / resize as asked, and store them in the work
    array ``input.npy``; returns it, the working pixel size and the rows (0-based) of blank images.

    A blank image (all pixels equal, e.g. a box at a micrograph's edge) cannot be denoised: it is
    kept out of fine-tuning and neighbour targets, and passed through (denoised image = input).
    """
    pixel = table.pixel_size()
    box_in = images.box
    box = settings.box or box_in
    prepare = BatchPreparer(table, settings, box_in, device)
    pixel_out = pixel * box_in / box
    if (work / "input.done").exists() and (work / "input.npy").exists() and (work / "blank.npy").exists():
        log.info("particles already prepared (resuming)")
        blank = np.load(work / "blank.npy")
        _warn_blank(table, blank)
        return np.load(work / "input.npy", mmap_mode="r"), pixel_out, blank
    distributed.barrier()  # every rank has seen that input.done is missing
    if distributed.world().main:
        (work / "input.done").unlink(missing_ok=True)
    out = shared_work_array(work / "input.npy", len(table), box)
    blank = []
    pages = Releaser(out)
    lo, hi = distributed.shard(len(table))  # this rank's rows (all of them in one process)
    for start in tqdm(range(lo, hi, settings.batch_size), desc="reading images", unit="batch", disable=None):
        rows = slice(start, min(start + settings.batch_size, hi))
        batch = images.read(np.arange(rows.start, rows.stop))
        flat = np.asarray(batch).reshape(len(batch), -1)
        blank += (start + np.flatnonzero(flat.max(axis=1) == flat.min(axis=1))).tolist()
        out[rows] = prepare(batch, rows).cpu().numpy()
        pages.step(batch.nbytes)
    out.flush()
    pages.now()
    blank = distributed.gather_rows(torch.as_tensor(blank, dtype=torch.int64)).numpy()
    _warn_blank(table, blank)
    if len(blank) > len(table) - 2:
        raise InputError(table.path, f"{len(blank)} of {len(table)} images are blank (all pixels equal): "
                         "nothing to denoise")
    if distributed.world().main:
        np.save(work / "blank.npy", blank)
        (work / "input.done").touch()
    distributed.barrier()
    return out, pixel_out, blank


def _warn_blank(table: ParticleTable, blank: np.ndarray) -> None:
    if len(blank):
        first = ", ".join(str(r + 1) for r in blank[:10])
        log.warning("%s: %d blank image(s) (all pixels equal) passed through undenoised and left out of "
                    "fine-tuning: row(s) %s%s", table.path, len(blank), first, ", ..." if len(blank) > 10 else "")


@torch.no_grad()
def run_block(block: torch.nn.Module, src: np.ndarray, dst: np.ndarray, device: torch.device, batch_size: int,
              desc: str, should_stop: Callable[[], None] | None = None) -> None:
    """dst[i] = block(src[i]) for all i, streamed in batches (in a distributed run, each rank its
    own rows of the shared ``dst``, and then waits for the others)."""
    block.eval().to(device)
    lo, hi = distributed.shard(len(src))
    pages = Releaser(src, dst)  # resident memory flat in N (cdae_em.memory)
    for start in tqdm(range(lo, hi, batch_size), desc=desc, unit="batch", leave=False, disable=None):
        if should_stop is not None:
            should_stop()
        x = torch.from_numpy(np.array(src[start:min(start + batch_size, hi)])).to(device)
        with autocast(device):
            y = block(x)
        dst[start:start + len(x)] = y.float().cpu().numpy()
        pages.step(2 * x.numel() * 4)
    if isinstance(dst, np.memmap):
        dst.flush()
    pages.now()
    distributed.barrier()


def run_cascade(model: Cascade, inputs: np.ndarray, path: Path, device: torch.device, batch_size: int,
                should_stop: Callable[[], None] | None = None) -> np.ndarray:
    """All blocks of ``model`` over ``inputs``, into the work array ``path`` (one pass per block)."""
    x = inputs
    for j, block in enumerate(model.blocks, start=1):
        nxt = shared_work_array(path.with_name(f"{path.stem}_{j}.npy"), len(inputs), inputs.shape[-1])
        run_block(block, x, nxt, device, batch_size, f"block {j}: denoise", should_stop)
        if j > 1:
            del x
            if distributed.world().main:
                path.with_name(f"{path.stem}_{j - 1}.npy").unlink(missing_ok=True)
        x = nxt
    return x


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
                   settings: DenoiseSettings, device: torch.device, blank: np.ndarray | None = None,
                   inputs: np.ndarray | None = None) -> Path:
    """Equalise (if asked) and write the denoised stacks and ``denoised_particles.star``; the
    ``blank`` rows get their ``inputs`` image unchanged.

    Stacks are written in the work directory and moved to ``denoised/`` only when all are
    complete; the STAR file comes last, so a pipeline never sees a half-written result.
    """
    n, box = len(images), images.shape[-1]
    mask = particle_mask(box, settings.mask_diameter / pixel_size if settings.mask_diameter else None, device)
    staging = out_dir / WORK_DIR / "denoised"
    staging.mkdir(parents=True, exist_ok=True)
    final_paths = stack_names(out_dir, n)
    names = []
    pages = Releaser(images)
    for i, path in enumerate(final_paths):
        lo, hi = i * STACK_CHUNK, min(n, (i + 1) * STACK_CHUNK)
        with StackWriter(staging / path.name, hi - lo, box, pixel_size) as writer:
            for start in range(lo, hi, settings.batch_size):
                x = torch.from_numpy(np.array(images[start:min(hi, start + settings.batch_size)])).to(device)
                pages.step(x.numel() * 4)
                if settings.equalise:
                    x = equalise_histogram(x, mask)
                here = blank[(blank >= start) & (blank < start + len(x))] if blank is not None else []
                if len(here):  # blank images pass through as they are
                    x[torch.as_tensor(here - start)] = torch.from_numpy(np.array(inputs[here])).to(x)
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


def _work_dir(out: Path, star: str | Path, settings: DenoiseSettings, project_dir: str | Path | None) -> Path:
    """``OUT/.cdae_work``, emptied first if it holds the work of other settings or particles (a
    rerun with the same ones resumes from it)."""
    work = out / WORK_DIR
    key = json.dumps({"particles": str(Path(star).resolve()), "project_dir": str(project_dir),
                      "settings": asdict(settings)}, sort_keys=True, default=str)
    stamp = work / "settings.json"
    if distributed.world().main:
        if work.exists() and (not stamp.exists() or stamp.read_text() != key):
            log.info("%s holds the work of other settings: starting afresh", work)
            remove_work(out)
        work.mkdir(exist_ok=True)
        if not stamp.exists():
            stamp.write_text(key)
    distributed.barrier()
    return work


def work_size(out: Path) -> int:
    """Bytes on disk under ``OUT/.cdae_work`` (allocated blocks, so sparse or reserved arrays count
    as what they occupy); 0 if there is none."""
    work = out / WORK_DIR
    if not work.exists():
        return 0
    total = 0
    for path in work.rglob("*"):
        try:
            st = path.stat()
        except OSError:  # removed meanwhile
            continue
        if path.is_file():
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def remove_work(out: Path) -> None:
    """Remove ``OUT/.cdae_work`` (its size logged): renamed first, so that a kill halfway never
    leaves a work directory with some of its files gone."""
    work = out / WORK_DIR
    if work.exists():
        log.info("removing %s (%.2f GB)", work, work_size(out) / 1e9)
        trash = out / f"{WORK_DIR}.removing"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(work, trash)
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(out / f"{WORK_DIR}.removing", ignore_errors=True)


def denoise(star: str | Path, out_dir: str | Path, settings: DenoiseSettings, device: torch.device,
            project_dir: str | Path | None = None, keep_work: bool = False,
            should_stop: Callable[[], None] | None = None) -> dict:
    """Denoise every particle of ``star`` into ``out_dir``; returns a summary (timings, losses)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    table = read_particles(star)
    settings = replace(settings, phase_flip=resolve_phase_flip(table, settings.phase_flip))
    model, meta = load_model(settings, device)
    torch.manual_seed(settings.seed)
    with ImageSource(table, project_dir=project_dir) as images:
        if images.box < 8:
            raise InputError(star, f"images of {images.box} px are too small for the model (at least 8)")
        out.mkdir(parents=True, exist_ok=True)
        work = _work_dir(out, star, settings, project_dir)
        log.info("denoising %d particles of %d px from %s", len(table), images.box, star)
        inputs, pixel, blank = prepare_inputs(table, images, settings, work, device)
    peak_work = work_size(out)
    summary: dict = {"particles": len(table), "box": inputs.shape[-1], "pixel_size": pixel,
                     "phase_flipped": settings.phase_flip,
                     "weights": str(settings.weights or "default"), "weights_metadata": meta.get("command")}
    check = np.setdiff1d(check_rows(len(inputs), settings.seed), blank)
    check_images = torch.from_numpy(Streamed(inputs)[check]).to(device)  # random rows: read a group at a time
    sign, summary["selfcheck"] = choose_polarity(model, check_images, settings, device, should_stop)
    sign, summary["selfcheck"] = distributed.broadcast((sign, summary["selfcheck"]))  # every rank as rank 0
    model.set_polarity(sign)
    if settings.finetune:
        from cdae_em.finetune import finetune

        pretrained = copy.deepcopy(model)
        summary["finetune"] = finetune(model, inputs, work, settings, device, should_stop, blank=blank,
                                       holdout=check if settings.check else None)
        peak_work = max([peak_work] + [r.get("work_bytes", 0) for r in summary["finetune"]])
        final = np.load(work / f"block{len(model.blocks)}.npy", mmap_mode="r")
        helped = not settings.check or finetuning_helped(model, pretrained, check_images, summary["selfcheck"],
                                                         device, should_stop)
        helped, summary["selfcheck"] = distributed.broadcast((helped, summary["selfcheck"]))
        if not helped:
            final = run_cascade(pretrained, inputs, work / "pretrained.npy", device, settings.batch_size, should_stop)
    else:
        final = run_cascade(model, inputs, work / "pretrained.npy", device, settings.batch_size, should_stop)
        summary["finetune"] = []
    peak_work = max(peak_work, work_size(out))
    summary["denoised_star"] = str(out / "denoised_particles.star")
    summary["work_bytes"] = peak_work  # the largest .cdae_work measured (after each stage)
    summary["blank_rows"] = (blank + 1).tolist()
    if distributed.world().main:  # one rank writes the outputs
        write_denoised(table, final, out, pixel, settings, device, blank, inputs)
        log.info("%s: %.2f GB at most during denoising%s", out / WORK_DIR, peak_work / 1e9,
                 " (kept: --keep-work)" if keep_work else "")
        from cdae_em.figures import gallery, raw_denoised_pairs

        gallery(out / "denoised_pairs.png", None, None,
                raw_denoised_pairs(out / "denoised_particles.star", star, project_dir, n_pairs=8))
    del final, inputs
    distributed.barrier()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if not keep_work and distributed.world().main:
        remove_work(out)
    log.info("denoised %d particles in %.1f s", len(table), summary["seconds"])
    return summary
