"""The one end-to-end entry point shared by every front end: particles STAR in, classes out.

``run_job(JobSettings)`` denoises (with fine-tuning), classifies, averages and writes the output
contract (the README's table) into ``out_dir``:

| file | what |
|---|---|
| particles.star | every input row/block kept, plus rlnClassNumber (1..K), rlnAnglePsi, rlnOriginXAngst, rlnOriginYAngst (alignment to the class average, RELION conventions), cdaeClassFit (normalised cross-correlation with the class reference), cdaeCrowding (another particle just outside this one: robust z, see cdae_em.core.crowding); images = the original particles |
| denoised_particles.star | same rows; rlnImageName -> denoised stacks, rlnImageOriginalName -> input image |
| denoised/*.mrcs | denoised images, float32, voxel size set |
| class_averages.mrcs | K aligned averages of the original particles (class k at index k, classes by size) |
| class_averages.star | one row per class: rlnReferenceImage (k@class_averages.mrcs), rlnClassNumber, rlnClassDistribution, cdaeParticleCount, rlnClassScore (``cdae_em.job.selection``) |
| particles_selected.star, class_averages_selected.star | the classes scoring at least ``--select-threshold``: their particles (as particles.star) and rows (none written where no class does) |
| class_averages_denoised.mrcs | the same classes averaged from the denoised particles |
| summary.json, gallery.png | settings, timings, losses, class sizes, half-set FRC/SSNR per class; averages and raw/denoised pairs |
| status.json | stage, counts, ETA, and the error of a failed run, updated as the job runs (``cdae_em.runtime.progress``) |

Front ends (``cdae-em run``, the RELION External job, the Scipion protocol) only translate their
inputs into a ``JobSettings`` and the outputs into their framework's objects. ``should_stop`` is
called often (between batches); to abort, it raises ``JobAborted``; nothing partial is left under
the contract's names.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

from cdae_em.runtime import distributed
from cdae_em.io.images import ImageSource
from cdae_em.io.atomic_write import write_text as atomic_text
from cdae_em.runtime.workarrays import WORK_DIR
from cdae_em.errors import InputError, OutputError, ResourceError, resource_errors
from cdae_em.job.result import CONTRACT, SELECTION, SUMMARY, JobResult
from cdae_em.job.classes import classes_stage
from cdae_em.job.lock import LOCK_FILE, job_lock, make_out_dir, refuse_if_locked  # noqa: F401 (re-exported)
from cdae_em.runtime.progress import JobProgress, ProgressCallback, tracking
from cdae_em.settings import JobSettings, get, settings_tree  # noqa: F401 (JobSettings re-exported)

log = logging.getLogger(__name__)

JOB_DIR = ".cdae_job"  # stage markers and intermediate results, for resuming

def prepare_output(settings: JobSettings) -> Path:
    """Create/validate the output directory: refuse another job's outputs unless overwrite;
    returns the job's private directory (stage markers)."""
    out = Path(settings.out_dir)
    make_out_dir(out)
    job_dir = out / JOB_DIR
    sig_file = job_dir / "signature"
    previous = sig_file.read_text().strip() if sig_file.exists() else None
    has_outputs = any((out / name).exists() for name in CONTRACT) or (out / "denoised").exists()
    signature = settings.signature()
    if previous != signature and (has_outputs or previous is not None):
        if not settings.overwrite:
            raise OutputError(f"{out}: holds the outputs of a different job; choose another output "
                              "directory or pass --overwrite")
        log.warning("overwriting the earlier job in %s", out)
        for name in CONTRACT + SELECTION:
            (out / name).unlink(missing_ok=True)
        for name in ("denoised", JOB_DIR, WORK_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    elif previous == signature:
        log.info("resuming the job in %s", out)
    for partial in out.rglob(".*.partial"):  # left by a killed run; never a finished file
        partial.unlink(missing_ok=True)
    job_dir.mkdir(exist_ok=True)
    atomic_text(sig_file, signature + "\n")
    return job_dir


def check_settings(settings: JobSettings) -> None:
    """Refuse values no job can run with (below an option's bound, not one of its choices), as one
    line naming the option: front ends that build JobSettings themselves get the command line's checks."""
    for s in settings_tree():
        value, o = get(settings, s.path), s.option
        if value is None:
            continue
        problem = o.bound_problem(value)
        if problem:
            raise InputError(None, f"{o.name} {value}: {problem}")
        if o.choices and value not in o.choices:
            raise InputError(None, f"{o.name} {value}: expected {' or '.join(o.choices)}")
    if settings.stages not in ("all", "denoise", "classify"):
        raise InputError(None, f"stages {settings.stages!r}: expected all, denoise or classify")


def run_job(settings: JobSettings, should_stop: Callable[[], None] | None = None,
            on_progress: ProgressCallback | None = None) -> JobResult:
    """Run the job's stages (all, or denoise / classify alone), resuming finished ones; returns what
    it did and where it put it (``JobResult``; summary.json holds the same). The one stage runner of every front end: settings checked,
    output directory locked and guarded (another job's results are refused unless overwrite),
    ``should_stop`` polled, running out of memory or disk turned into a one-line ResourceError.
    Progress (stage, counts, ETA, the error of a failure) goes to ``on_progress`` and OUT/status.json."""
    check_settings(settings)
    if settings.stages != "denoise" and settings.n_classes < 2:
        raise InputError(None, f"number of classes K={settings.n_classes} must be at least 2")
    main = distributed.env_rank() == 0  # under torchrun: rank 0 alone locks and writes
    if main:
        refuse_if_locked(settings.out_dir)  # before status.json is touched: it is the running job's
    with ExitStack() as lock, tracking(JobProgress(settings.out_dir if main else None, on_progress if main else None)) \
            as progress, _discard_unfinished_on(ResourceError, Path(settings.out_dir), main), \
            resource_errors(settings.denoise.batch_size, settings.out_dir):
        try:
            result = _run_job(settings, should_stop, progress, lock)
        finally:
            distributed.shutdown()
        progress.finish()
        return result


@contextmanager
def _discard_unfinished_on(error: type[Exception], out: Path, main: bool = True) -> Iterator[None]:
    """On ``error`` (e.g. a full disk), remove what the run half-wrote (temporary files, work
    arrays of unfinished stages), keeping finished stages for a rerun to resume from (rank 0)."""
    try:
        yield
    except error:
        if not main:
            raise
        for partial in out.rglob(".*.partial"):
            partial.unlink(missing_ok=True)
        work = out / ".cdae_work"
        if work.exists():
            for array in work.glob("*.npy"):
                if array.name != "blank.npy" and not (work / f"{array.stem}.done").exists():
                    array.unlink(missing_ok=True)
            shutil.rmtree(work / "denoised", ignore_errors=True)
        raise


def _run_job(settings: JobSettings, should_stop: Callable[[], None] | None, progress: JobProgress,
             lock: ExitStack) -> JobResult:
    import torch

    from cdae_em.io.star import read_particles

    t0 = time.perf_counter()
    table = read_particles(settings.particles)  # fail early on a bad STAR, before touching the output
    classify_stage = settings.stages in ("all", "classify")
    if classify_stage and settings.n_classes > len(table):
        raise InputError(settings.particles, f"K={settings.n_classes} classes but only {len(table)} particles")
    table.pixel_size()  # missing, zero, negative or mixed: refused here
    for option, path in (("--weights", settings.denoise.weights), ("--ref", settings.reference_map)):
        if path and not Path(path).is_file():
            raise InputError(path, f"{option}: file not found")
    if classify_stage and settings.classes_from:  # its rows and classes checked before any work
        from cdae_em.classify.given import read_assignment

        read_assignment(settings.classes_from, table, settings.n_classes)
    settings = _resolve_phase_flip(settings, table)
    with ImageSource(table, project_dir=settings.project_dir) as images:  # every stack's header checked, once
        _check_files(settings, table, images.box)
        settings, working_scale = _resolve_working_box(settings, table, images)
    device = distributed.resolve_device(distributed.local_device(settings.gpu))  # under torchrun: LOCAL_RANK's GPU
    part = distributed.init_from_env(device)
    torch.set_num_threads(max(1, settings.threads))
    out = Path(settings.out_dir)

    def guard() -> Path:
        lock.enter_context(job_lock(out))  # inputs checked: only now is the output directory made
        return prepare_output(settings)

    job_dir = distributed.on_main(guard)
    timings: dict[str, float] = {}
    summary: dict = {"cdae_em_job": settings.signature(), "settings": _jsonable(asdict(settings)),
                     "particles": len(table)}
    if working_scale is not None:
        summary["working_scale"] = working_scale

    if settings.stages in ("all", "denoise"):
        summary["denoise"] = _denoise_stage(settings, table, job_dir, device, should_stop, progress, timings)
    if classify_stage:
        labels, psi, origin, score, refs, box, crowd = classes_stage(settings, job_dir, device, should_stop,
                                                                        progress, summary, timings)

        # 4. class averages of the original particles and the output STAR files
        progress.stage(3, "outputs")
        log.info("stage 3/3 class averages and output files")
        t = time.perf_counter()
        from cdae_em.job.outputs import write_outputs

        # one rank writes the outputs (not sharded: one pass over the originals)
        diameter = (summary.get("working_scale") or {}).get("particle_diameter_px")
        summary.update(distributed.on_main(write_outputs, settings, table, labels, psi, origin, score, refs, box,
                                           device, should_stop, diameter, crowd))
        timings["outputs"] = round(time.perf_counter() - t, 2)
    summary["timings"] = {**timings, "total": round(time.perf_counter() - t0, 2)}
    if part.size > 1:
        summary["processes"] = part.size
    if part.main:
        atomic_text(out / SUMMARY, json.dumps(summary, indent=2, default=str))
    log.info("job done in %.1f s: %s", time.perf_counter() - t0, out)
    return JobResult.from_summary(_jsonable(summary), out)


def _check_files(settings: JobSettings, table, box: int) -> None:
    """What can be checked before the output directory is touched, beyond the stacks' headers
    (``ImageSource`` checks those: present, readable, square, one box, enough images): a box the
    model can take and CTF values for phase flipping. (Pixel values are checked as they are read.)"""
    import torch

    from cdae_em.core.prepare import BatchPreparer

    if settings.stages != "classify" and box < 8:
        raise InputError(settings.particles, f"images of {box} px are too small for the model (at least 8)")
    if settings.denoise.phase_flip or settings.average_phase_flipped:
        BatchPreparer(table, replace(settings.denoise, phase_flip=True), box, torch.device("cpu"))


def _resolve_phase_flip(settings: JobSettings, table) -> JobSettings:
    """Settings with phase flipping decided (auto: where the particles have CTF values); the class
    averages follow the particles unless asked otherwise."""
    from cdae_em.core.prepare import resolve_phase_flip

    flip = resolve_phase_flip(table, settings.denoise.phase_flip)
    average = flip if settings.average_phase_flipped is None else settings.average_phase_flipped
    return replace(settings, denoise=replace(settings.denoise, phase_flip=flip), average_phase_flipped=average)


def _resolve_working_box(settings: JobSettings, table, images) -> tuple[JobSettings, dict | None]:
    """Settings with the working box decided (``--scale auto``): particles larger than the weights
    were trained on are Fourier-cropped to their training scale; returns what was decided and why."""
    from cdae_em.core.prepare import estimate_particle_diameter, working_box
    from cdae_em.denoise.weights import trained_scale

    d = settings.denoise
    if settings.stages == "classify" or d.box is not None or d.scale != "auto":
        return settings, None
    trained_box, fill = trained_scale(d.weights)
    box = images.box
    if d.mask_diameter:
        diameter, source = d.mask_diameter / table.pixel_size(), "--mask-diameter"
    else:
        diameter, source = estimate_particle_diameter(images), "estimated from the particles"
    chosen = working_box(box, diameter, trained_box, fill)
    decided = {"native_box": box, "working_box": chosen, "particle_diameter_px": diameter, "diameter_from": source,
               "trained_diameter_px": [fill[0] * trained_box, fill[1] * trained_box]}
    if diameter is None:
        log.warning("working scale: the particles' diameter could not be estimated from %d particles; working at "
                    "their box, %d px (give --mask-diameter, or --box)", len(table), box)
    elif chosen != box:
        log.info("working scale: particles %.0f px across (%s) in a %d px box, larger than the weights were "
                 "trained on (%.0f-%.0f px): Fourier-cropped to a %d px box (--scale native keeps %d px)",
                 diameter, source, box, *decided["trained_diameter_px"], chosen, box)
    else:
        log.info("working scale: particles %.0f px across (%s) in a %d px box: at their box", diameter, source, box)
    if chosen == box:
        return settings, decided
    return replace(settings, denoise=replace(d, box=chosen)), decided


def _denoise_stage(settings: JobSettings, table, job_dir: Path, device, should_stop, progress: JobProgress,
                   timings: dict) -> dict:
    """1. optional pre-training on the user's reference map; 2. denoising (with fine-tuning),
    resumable per block; returns the denoising summary."""
    from cdae_em.denoise.stage import denoise

    out = Path(settings.out_dir)
    denoise_settings = settings.denoise
    if settings.reference_map:
        weights = job_dir / "pretrained" / "cdae_weights.pt"
        if not weights.exists():
            t = time.perf_counter()
            distributed.on_main(_pretrain_on_reference, settings, job_dir / "pretrained", device)  # rank 0 alone
            timings["pretrain"] = round(time.perf_counter() - t, 2)
        denoise_settings = replace(settings.denoise, weights=str(weights))

    progress.stage(1, "denoise")
    marker = job_dir / "denoise.json"
    if marker.exists() and (out / "denoised_particles.star").exists():
        log.info("stage 1/3 denoise: already done (resuming)")
        return json.loads(marker.read_text())
    log.info("stage 1/3 denoise: %d particles", len(table))
    t = time.perf_counter()
    result = denoise(settings.particles, out, denoise_settings, device, project_dir=settings.project_dir,
                     should_stop=should_stop, keep_work=settings.keep_work)
    timings["denoise"] = round(time.perf_counter() - t, 2)
    if distributed.world().main:
        atomic_text(marker, json.dumps(result, default=str))
    return result


def _pretrain_on_reference(settings: JobSettings, out: Path, device) -> None:
    """Pre-train a cascade on simulated particles of the reference map (``--ref``): the map projected
    at ``pretrain_particles`` views, ``pretrain_epochs`` passes' worth of optimiser steps for block 1
    and a third of that for blocks 2 and 3 (see ``cdae_em.denoise.train.pretrain``)."""
    import dataclasses

    from cdae_em.simulate.pretrain_data import PairSampler, PairSettings, ProjectionBank
    from cdae_em.simulate.simulator import load_source
    from cdae_em.denoise.train import PretrainSettings, pretrain

    with ImageSource(settings.particles, project_dir=settings.project_dir) as images:
        box = images.box
    log.info("pre-training on the reference map %s", settings.reference_map)
    source = load_source(settings.reference_map)
    pairs = dataclasses.replace(PairSettings(), box=settings.denoise.box or box,
                                views_per_structure=settings.pretrain_particles, seed=settings.seed)
    if source.kind == "atoms":
        bank = ProjectionBank({settings.reference_map: source.atoms}, pairs)
    else:
        bank = ProjectionBank({}, pairs, maps={settings.reference_map: (source.volume, source.pixel_size)})
    train = PretrainSettings(seed=settings.seed)
    first = max(1, settings.pretrain_particles * settings.pretrain_epochs // train.batch_size)
    train = dataclasses.replace(train, steps=(first, max(1, first // 3), max(1, first // 3)))
    pretrain(PairSampler(bank, pairs), out, train, device, metadata={"command": f"reference map {settings.reference_map}"})


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
