"""Denoise and classify particles in one job: STAR in, classes and STAR files out.

Stages: (1) denoise with the cascade, fine-tuned on your particles (see `cdae-em denoise -h`);
(2) 2D classification up to in-plane rotation and shift: initial classes from rotation/shift-
invariant features of the denoised particles (k-means or hierarchical), then rounds of alignment
of the original particles to the class averages and re-assignment (--align-on); (3) aligned class
averages of the original particles.

Writes to --o: particles.star (input rows + rlnClassNumber, rlnAnglePsi, rlnOriginX/YAngst in
RELION's conventions), denoised_particles.star + denoised/*.mrcs, class_averages.mrcs/.star
(classes ordered by size), class_averages_denoised.mrcs, summary.json and gallery.png.
A killed job rerun with the same arguments resumes from its finished stages.

example:
  cdae-em run --i Extract/job005/particles.star --o CDAE/job001 --K 20 --gpu 0
"""

from __future__ import annotations

import argparse
import logging

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads, at_least, positive_float
from cdae_em.commands.denoise import add_denoise_args, denoise_settings

log = logging.getLogger(__name__)


def add_classify_args(parser: argparse.ArgumentParser) -> None:
    """Classification options, shared with `cdae-em classify`; defaults are JobSettings'."""
    from cdae_em.job import JobSettings

    g = parser.add_argument_group("classification")
    g.add_argument("--K", type=int, required=True, help="number of classes")
    g.add_argument("--method", choices=["kmeans", "hierarchical"], default=JobSettings.method,
                   help="clustering of the invariant features that starts the classification (default: %(default)s)")
    g.add_argument("--iter", type=at_least(0), default=JobSettings.n_iter,
                   help="rounds of alignment and re-assignment (default: %(default)s)")
    g.add_argument("--split-merge", type=at_least(0), default=JobSettings.split_merge,
                   help="merge-and-split moves tried after the coarse rounds (and, for particles with CTF, again "
                        "after the fine rounds), to undo two views sharing a class while another is split; each "
                        "is kept only if it lowers the classes' squared error (default: %(default)s; 0: none)")
    g.add_argument("--psi-step", type=positive_float, default=JobSettings.psi_step,
                   help="in-plane angular step, degrees (default: %(default)s)")
    g.add_argument("--max-shift", type=float, default=JobSettings.max_shift,
                   help="largest shift searched, pixels (default: box / 8)")


def add_args(parser: argparse.ArgumentParser) -> None:
    from cdae_em.job import JobSettings

    parser.add_argument("--i", required=True, metavar="STAR", help="input particles STAR file")
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory")
    add_classify_args(parser)
    parser.add_argument("--align-on", choices=["original", "denoised"], default=JobSettings.align_on,
                        help="images the alignment rounds use: the original particles (classes still start from "
                             "the denoised ones, whose detail is smoothed away) or the denoised ones "
                             "(default: %(default)s)")
    parser.add_argument("--average-phase-flipped", dest="average_phase_flipped", action="store_true", default=None,
                        help="class averages from CTF phase-flipped originals (default: when the particles are "
                             "phase-flipped, see --phase-flip)")
    parser.add_argument("--no-average-phase-flipped", dest="average_phase_flipped", action="store_false",
                        help="class averages from the originals as they are")
    parser.add_argument("--ref", metavar="MAP", help="pre-train on this map (an initial model) before fine-tuning")
    parser.add_argument("--overwrite", action="store_true", help="replace a different job's outputs in --o")
    add_denoise_args(parser)
    add_threads_arg(parser)
    add_seed_arg(parser)


def job_settings(args: argparse.Namespace):
    from cdae_em.job import JobSettings

    return JobSettings(
        particles=args.i, out_dir=args.o, n_classes=args.K, denoise=denoise_settings(args), method=args.method,
        n_iter=args.iter, psi_step=args.psi_step, split_merge=args.split_merge, align_on=args.align_on,
        max_shift=args.max_shift, average_phase_flipped=args.average_phase_flipped, project_dir=args.project_dir,
        reference_map=args.ref, gpu=args.gpu, threads=args.j, overwrite=args.overwrite, seed=args.seed, keep_work=args.keep_work,
    )


def main(args: argparse.Namespace) -> None:
    from cdae_em.job import run_job

    apply_threads(args.j)
    summary = run_job(job_settings(args))
    log.info("class sizes: %s", summary["class_sizes"])
