"""cdae-em as a RELION External job (RELION 3.1, 4 and 5): ``cdae-em-relion``.

RELION runs it from the project directory as (pipeline_jobs.cpp ``getCommandsExternalJob``)::

    cdae-em-relion --o External/job012/ --in_parts Extract/job005/particles.star \\
        [--in_3dref map.mrc] [--<label> <value>]... --j <threads> <other args>

with stdout and stderr appended to ``External/job012/run.out`` / ``run.err``
(``RelionJob::prepareFinalCommand``). Parameters (Param label / value in the GUI;
``_`` and ``-`` are interchangeable, a label with an empty value counts as not given, and unknown
arguments are logged and ignored) are the options of ``cdae-em run``, made from the settings tree
(``cdae_em.settings``), with the same defaults and checks: the label is the option without its
dashes (``split_merge``, ``psi_step``, ``neighbours``, ``K``; also ``iterations`` for ``iter``),
Yes / No for switches, and Yes / No / auto for ``phase_flip`` and ``average_phase_flipped``. Also:

  gpu              CUDA devices, e.g. 0, or 0,1,2,3 (also "0:1:2:3"): several run the job as one
                   process per device (torchrun, this node); empty value = first GPU if there is
                   one; not given or "cpu" = CPU
  no_finetune      Yes: the opposite of finetune
  nodes_flavour    3.1, 4 or 5: output-node types of that RELION (default: detected)

``cdae-em-relion --write_template DIR`` writes DIR/job.star, an External job with the executable
and these parameters filled in, for the GUI's Jobs / Load job settings.

``--in_3dref`` pre-trains the cascade on projections of that map before fine-tuning.

Outputs in --o: the job's output contract (particles.star, denoised_particles.star + denoised/,
class_averages.mrcs/.star, the selected classes' particles_selected.star and
class_averages_selected.star, summary.json, gallery.png, status.json), plus run_it000_{optimiser,model,data}.star
and run_it000_classes.mrcs for Subset selection, RELION_OUTPUT_NODES.star, and one of
RELION_JOB_EXIT_SUCCESS / _FAILURE / _ABORTED. Creating RELION_JOB_ABORT_NOW in --o (the GUI's
"Abort running") stops the job within seconds. Rerunning the same command ("Continue") resumes
from the finished stages.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from cdae_em.protocols import relion_files as rf
from cdae_em.protocols.relion_args import ArgumentError, build_parser, given_settings, template_text
from cdae_em.protocols.relion_args import gpu_id as _gpu
from cdae_em.protocols.relion_progress import Progress, duration, setup_logging, StderrToLog

log = logging.getLogger("cdae_em.relion")

HEARTBEAT_S = 60.0  # a "still running" line at least this often while the core is quiet
ABORT_GRACE_S = 15.0  # how long an abort waits for the core's next should_stop check
_REAL_STDERR = sys.stderr


def job_settings(args: argparse.Namespace):
    """RELION's arguments -> the core JobSettings (the settings tree's defaults for the rest)."""
    from cdae_em.settings import build

    if not args.in_parts:
        raise ArgumentError("no input particles: set 'Input particles' (--in_parts) in the External job's I/O tab")
    values = given_settings(args)
    if values.get("classify.n_classes") is None:
        raise ArgumentError("no number of classes: add a parameter with label K and a value, e.g. 20")
    values.update({"particles": args.in_parts, "out_dir": args.o, "reference_map": args.in_3dref or None,
                   "gpu": _gpu(args.gpu), "threads": max(1, args.j), "overwrite": True})
    return build(values)


# ------------------------------------------------------------------------------------------------
# run.out: progress a user watching the GUI understands
# ------------------------------------------------------------------------------------------------
class StopCheck:
    """The ``should_stop`` hook the core calls between batches: raises JobAborted once an abort
    was asked for (RELION_JOB_ABORT_NOW in the job directory, or SIGTERM)."""

    def __init__(self, out_dir: Path, progress: Progress, t0: float):
        self.abort_file = out_dir / rf.ABORT_NOW
        self.progress = progress
        self.t0 = t0
        self.terminated = False

    def requested(self) -> bool:
        return self.terminated or self.abort_file.exists()

    def __call__(self) -> None:
        from cdae_em.errors import JobAborted

        if self.requested():
            raise JobAborted("stopped by SIGTERM" if self.terminated else "aborted by the user (RELION_JOB_ABORT_NOW)")


class Watchdog(threading.Thread):
    """Once a second: a "still running" line when the core has been quiet for HEARTBEAT_S, and,
    if an abort was asked for but the core has not reached a ``should_stop`` check within
    ABORT_GRACE_S (a long computation without one), the abort is done from here: partial files
    removed, RELION_JOB_EXIT_ABORTED written, the process ended with exit code 2."""

    def __init__(self, out_dir: Path, stop: StopCheck):
        super().__init__(name="cdae-em-relion-watchdog", daemon=True)
        self.out, self.stop_check = out_dir, stop
        self.finished = threading.Event()
        self.abort_seen: float | None = None

    def run(self) -> None:
        while not self.finished.wait(1.0):
            now = time.monotonic()
            progress = self.stop_check.progress
            if now - progress.last > HEARTBEAT_S:
                progress.last = now
                log.info("still running (%s), %s elapsed", progress.stage, duration(now - self.stop_check.t0))
            if not self.stop_check.requested():
                continue
            self.abort_seen = self.abort_seen or now
            if now - self.abort_seen > ABORT_GRACE_S and not self.finished.is_set():
                log.info("abort: the current step does not check for aborts; stopping it now")
                for partial in self.out.rglob("*.partial*"):
                    partial.unlink(missing_ok=True)
                rf.remove_relion_files(self.out)
                (self.out / rf.ABORT_NOW).unlink(missing_ok=True)
                _touch(self.out / rf.EXIT_ABORTED)
                logging.shutdown()
                os._exit(2)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def write_template(path: str) -> int:
    """``cdae-em-relion --write_template PATH``: the job.star template at PATH (a .star file) or
    PATH/job.star (RELION 4/5's Jobs / Load job settings lists files named job.star; RELION 3.1
    loads the hidden .gui_externaljob.star of the project directory instead)."""
    target = Path(path)
    if target.suffix != ".star":
        target = target / "job.star"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        rf.atomic_write(target, template_text())
    except OSError as exc:
        print(f"cdae-em-relion: cannot write {target}: {exc.strerror}", file=_REAL_STDERR)
        return 1
    print(f"wrote {target}: in the RELION GUI use Jobs / Load job settings and pick it")
    return 0


def _job_name(o: str) -> str:
    """The job directory as RELION names nodes: project-relative, ending in '/'."""
    path = Path(o)
    if path.is_absolute():
        try:
            o = os.path.relpath(path, os.getcwd())
        except ValueError:
            o = str(path)
        if o.startswith(".."):
            o = str(path)
    o = o.replace(os.sep, "/")
    return o if o.endswith("/") else o + "/"


def _touch(path: Path) -> None:
    """Create an (exit) file; a failure is reported on the real stderr, not raised."""
    try:
        path.touch()
    except OSError as exc:
        print(f"cdae-em-relion: cannot create {path}: {exc.strerror}", file=_REAL_STDERR, flush=True)


def _out_dir_only(argv: list[str]) -> str | None:
    """--o, found without the full parser (so that a bad argument can still be reported there)."""
    for i, a in enumerate(argv):
        if a == "--o" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--o="):
            return a[4:]
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the job as RELION does; returns 0 (success), 1 (failure) or 2 (aborted), the exit
    codes of RELION's own programs (pipeline_control.cpp ``pipeline_control_relion_exit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    if argv and argv[0] in ("--write_template", "--write-template"):
        return write_template(argv[1] if len(argv) > 1 else ".")
    o = _out_dir_only(argv)
    if o is None:
        if any(a in ("-h", "--help") for a in argv):
            build_parser().print_help()
            return 0
        print("cdae-em-relion: no --o job directory given (RELION passes --o External/jobNNN/)", file=sys.stderr)
        return 1
    out = Path(o)
    from cdae_em.runtime import distributed

    if distributed.env_rank() != 0:  # a further process of a multi-GPU job: rank 0 does the RELION files
        return _worker(argv)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"cdae-em-relion: cannot create the job directory {out}: {exc.strerror}", file=sys.stderr)
        return 1
    # a rerun ("Continue") starts clean: RELION's pipeliner does the same before it launches a job
    # (pipeliner.cpp PipeLine::runJob removes the exit files); RELION_JOB_ABORT_NOW is left: if it
    # is there now, the user asked for an abort after the launch
    for name in (rf.EXIT_SUCCESS, rf.EXIT_FAILURE, rf.EXIT_ABORTED):
        (out / name).unlink(missing_ok=True)
    rf.remove_relion_files(out)

    progress = setup_logging("INFO")
    try:
        args, unknown = build_parser().parse_known_args(argv)
    except ArgumentError as exc:
        return _fail(out, f"bad arguments: {exc}")
    logging.getLogger().setLevel(getattr(logging, args.log_level, logging.INFO))
    from cdae_em import __version__

    log.info("cdae-em %s: RELION External job in %s", __version__, out)
    log.info("command: %s", " ".join(["cdae-em-relion", *argv]))
    if unknown:
        log.warning("ignoring arguments cdae-em-relion does not know: %s", " ".join(unknown))
    for name in ("in_movies", "in_mics", "in_coords", "in_mask"):
        if getattr(args, name):
            log.warning("--%s %s is not used by cdae-em (it classifies particles)", name, getattr(args, name))

    from cdae_em.errors import CdaeError

    try:  # gpu "0,1,2,3": the same command as one process per device (torchrun); rank 0 writes
        code = distributed.relaunch_on_gpus(_gpu(args.gpu), "cdae_em.protocols.relion_external", argv)
    except (ArgumentError, CdaeError) as exc:
        return _fail(out, str(exc))
    if code is not None:
        if code != 0 and not any((out / n).exists() for n in (rf.EXIT_SUCCESS, rf.EXIT_FAILURE, rf.EXIT_ABORTED)):
            return _fail(out, f"a process of the multi-GPU run failed (exit code {code}); see run.out")
        return code
    stop = StopCheck(out, progress, t0)

    def on_term(signum, frame):
        stop.terminated = True

    previous = signal.signal(signal.SIGTERM, on_term)
    sys.stderr = StderrToLog()
    watchdog = Watchdog(out, stop)
    watchdog.start()
    try:
        return _run(args, out, stop, t0)
    finally:
        watchdog.finished.set()
        sys.stderr = _REAL_STDERR
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, out: Path, stop: StopCheck, t0: float) -> int:
    """The job and the RELION files; every outcome ends in its exit file and exit code."""
    from cdae_em.errors import CdaeError, is_out_of_memory
    from cdae_em.errors import JobAborted
    from cdae_em.job.runner import run_job
    from cdae_em.core.metrics import HalfSetStats
    from cdae_em.core.preprocess import default_mask_diameter
    from cdae_em.protocols.relion_class2d import write_classification_files

    job = _job_name(args.o)
    try:
        settings = job_settings(args)
        if args.nodes_flavour:
            flavour = str(args.nodes_flavour).strip()
            flavour = {"3": "3.1", "3.1": "3.1", "4": "4", "4.0": "4", "5": "5", "5.0": "5"}.get(flavour, flavour)
            if flavour not in rf.FLAVOURS:
                raise ArgumentError(f"--nodes_flavour {args.nodes_flavour!r}: expected 3.1, 4 or 5")
            why = "--nodes_flavour"
        else:
            flavour, why = rf.detect_flavour(out, args.in_parts)
        log.info("output nodes for RELION %s (%s)", flavour, why)
        log.info("input %s, K=%d, %s, %d thread(s)%s", settings.particles, settings.n_classes,
                 f"GPU {settings.gpu}" if settings.gpu else "CPU", settings.threads,
                 f", pre-training on {settings.reference_map}" if settings.reference_map else "")
        stop()
        result = run_job(settings, should_stop=stop, on_progress=stop.progress)

        log.info("writing RELION files (Subset selection, output nodes)")
        box, pixel = int(result.box), float(result.pixel_size)
        diameter = settings.denoise.mask_diameter or default_mask_diameter(box) * pixel
        flipped = result.averages_phase_flipped  # as the job decided it
        write_classification_files(out, job, settings.n_classes, pixel, box, diameter, flipped,
                                   rf.star_version(flavour), HalfSetStats.from_json(result.half_sets),
                                   psi_step=settings.classify.psi_step)
        nodes = rf.write_output_nodes(out, job, flavour, selected=(out / "particles_selected.star").exists())
        sizes = result.class_sizes
        log.info("done in %s: %d particles in %d classes%s", duration(time.monotonic() - t0),
                 result.particles, settings.n_classes, f" (sizes {sizes})" if sizes else "")
        for name, kind in nodes:
            log.info("  output node %s (%s)", name, kind)
        _touch(out / rf.EXIT_SUCCESS)
        return 0
    except JobAborted as exc:
        rf.remove_relion_files(out)
        (out / rf.ABORT_NOW).unlink(missing_ok=True)
        log.info("%s after %s; rerun the job (Continue) to resume from its finished stages",
                 exc, duration(time.monotonic() - t0))
        _touch(out / rf.EXIT_ABORTED)
        return 2
    except (CdaeError, ArgumentError) as exc:
        rf.remove_relion_files(out)
        return _fail(out, str(exc))
    except Exception as exc:
        rf.remove_relion_files(out)
        if is_out_of_memory(exc):
            return _fail(out, "out of memory: use a smaller --batch_size or --box, or fewer --neighbours")
        # a bug: keep the traceback in run.out, the one-line reason in run.err
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        return _fail(out, f"internal error ({type(exc).__name__}: {exc}); the traceback is in run.out")


def _worker(argv: list[str]) -> int:
    """Rank > 0 of a multi-GPU job: the same job, no RELION files and no exit files (rank 0's);
    stops when rank 0 does (torchrun ends the others) or on RELION_JOB_ABORT_NOW."""
    from cdae_em.errors import JobAborted
    from cdae_em.job.runner import run_job

    setup_logging("WARNING")
    args, _ = build_parser().parse_known_args(argv)
    abort = Path(args.o) / rf.ABORT_NOW

    def stop() -> None:
        if abort.exists():
            raise JobAborted("aborted by the user (RELION_JOB_ABORT_NOW)")

    try:
        run_job(job_settings(args), should_stop=stop)
    except JobAborted:
        return 2
    return 0


def _fail(out: Path, reason: str) -> int:
    """A failure: one line in run.err (and run.out), RELION_JOB_EXIT_FAILURE, exit code 1."""
    reason = " ".join(str(reason).split())  # one line
    log.error("ERROR: %s", reason)
    print(f"ERROR: {reason}", file=_REAL_STDERR, flush=True)
    _touch(out / rf.EXIT_FAILURE)
    return 1


if __name__ == "__main__":
    sys.exit(main())
