"""Denoising a particle STAR file with the cascade: input preparation, fine-tuning on the user's
particles (Algorithm 1 of Lei & Yang 2021, with rotation-aware neighbours), inference, histogram
equalisation, and the denoised stacks + STAR file.

Images live in memory-mapped float32 work arrays under ``OUT/.cdae_work/`` (one per stage), so
memory does not grow with the number of particles; the only per-particle data held in RAM are the
kNN features (N x ``n_components`` floats) and the neighbour lists (N x k integers).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from cdae_em.runtime import distributed, progress
from cdae_em.denoise.cascade import Cascade
from cdae_em.core.prepare import BatchPreparer, resolve_phase_flip
from cdae_em.errors import InputError
from cdae_em.io.memory import Releaser, Streamed
from cdae_em.core.preprocess import equalise_histogram, particle_mask
from cdae_em.denoise.selfcheck import (KernelFilter, check_rows, choose_polarity, finetuning_helped, guard,
                                       new_record)
from cdae_em.io.stacks import StackWriter
from cdae_em.io.images import ImageSource
from cdae_em.io.star import ParticleTable, read_particles, write_star
from cdae_em.denoise import inference
from cdae_em.denoise.inference import run_cascade
from cdae_em.runtime.workarrays import WORK_DIR, remove_work, shared_work_array, work_size
from cdae_em.settings import DenoiseSettings

log = logging.getLogger(__name__)

STACK_CHUNK = 10000  # images per denoised stack file


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
        progress.report(rows.stop - lo, hi - lo, "reading images")
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
                progress.report(start + len(x), n, "writing denoised images")
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
    from cdae_em.denoise.weights import default_weights_path, load_weights

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
    check = np.setdiff1d(check_rows(len(inputs), settings.seed, held_out=settings.finetune), blank)
    check_images = torch.from_numpy(Streamed(inputs)[check]).to(device)  # random rows: read a group at a time
    summary["selfcheck"], noise = new_record(check_images)
    sign = choose_polarity(model, check_images, settings, device, summary["selfcheck"], noise, should_stop)
    sign, summary["selfcheck"] = distributed.broadcast((sign, summary["selfcheck"]))  # every rank as rank 0
    model.set_polarity(sign)
    if settings.finetune:
        from cdae_em.denoise.finetune import finetune

        pretrained = copy.deepcopy(model)
        summary["finetune"] = finetune(model, inputs, work, settings, device, should_stop, blank=blank,
                                       holdout=check if settings.check else None)
        peak_work = max([peak_work] + [r.get("work_bytes", 0) for r in summary["finetune"]])
        final = np.load(work / f"block{len(model.blocks)}.npy", mmap_mode="r")
        helped = not settings.check or finetuning_helped(model, pretrained, check_images, summary["selfcheck"],
                                                         noise, device, should_stop)
        helped, summary["selfcheck"] = distributed.broadcast((helped, summary["selfcheck"]))
        if not helped:
            model = pretrained
            final = run_cascade(pretrained, inputs, work / "pretrained.npy", device, settings.batch_size, should_stop)
    else:
        final = run_cascade(model, inputs, work / "pretrained.npy", device, settings.batch_size, should_stop)
        summary["finetune"] = []
    verdict = guard(model, check_images, summary["selfcheck"], noise, settings, device, should_stop)
    verdict, summary["selfcheck"] = distributed.broadcast((verdict, summary["selfcheck"]))
    if "warning" in summary["selfcheck"]:
        progress.warn("denoiser self-check: " + summary["selfcheck"]["warning"])
    if not verdict.use_model:
        del final
        final = shared_work_array(work / "reference.npy", len(inputs), inputs.shape[-1])
        inference.run_block(KernelFilter(verdict.kernel), inputs, final, device, settings.batch_size,
                            f"{verdict.reference}: filter", should_stop)
    peak_work = max(peak_work, work_size(out))
    summary["denoised_star"] = str(out / "denoised_particles.star")
    summary["work_bytes"] = peak_work  # the largest .cdae_work measured (after each stage)
    summary["blank_rows"] = (blank + 1).tolist()
    if distributed.world().main:  # one rank writes the outputs
        write_denoised(table, final, out, pixel, settings, device, blank, inputs)
        log.info("%s: %.2f GB at most during denoising%s", out / WORK_DIR, peak_work / 1e9,
                 " (kept: --keep-work)" if keep_work else "")
        from cdae_em.core.figures import gallery, raw_denoised_pairs

        gallery(out / "denoised_pairs.png", None, None,
                raw_denoised_pairs(out / "denoised_particles.star", star, project_dir, n_pairs=8))
    del final, inputs
    distributed.barrier()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if not keep_work and distributed.world().main:
        remove_work(out)
    log.info("denoised %d particles in %.1f s", len(table), summary["seconds"])
    return summary
