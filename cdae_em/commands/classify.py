"""Classify particles of a STAR file (typically already denoised) into 2D classes.

The classification stage of `cdae-em run` on its own: initial classes from rotation/shift-
invariant features (k-means or hierarchical), rounds of alignment to the class averages and
re-assignment. Writes --o/particles.star (input rows + rlnClassNumber, rlnAnglePsi,
rlnOriginX/YAngst), class_averages.mrcs/.star (averages of the input STAR's images, classes by
size) and summary.json. A killed run rerun with the same arguments resumes; different settings into
the same --o are refused unless --overwrite.

example:
  cdae-em classify --i CDAE/job001/denoised_particles.star --o Classes/ --K 10
"""

from __future__ import annotations

import argparse
import logging

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads, positive_int
from cdae_em.commands.denoise import add_phase_flip_args
from cdae_em.commands.run import add_classify_args

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    from cdae_em.classify import ClassifySettings

    parser.add_argument("--i", required=True, metavar="STAR", help="particles STAR file")
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory")
    add_classify_args(parser)
    add_phase_flip_args(parser)
    parser.add_argument("--gpu", metavar="IDS", help="CUDA device, e.g. 0 (default: CPU); several, e.g. 0,1: one "
                                                      "process per device (torchrun)")
    parser.add_argument("--batch-size", type=positive_int, default=ClassifySettings.batch_size,
                        help="images per batch; smaller needs less (GPU) memory (default: %(default)s)")
    parser.add_argument("--project-dir", metavar="DIR", help="directory image paths are relative to (default: cwd)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different job's outputs in --o")
    add_threads_arg(parser)
    add_seed_arg(parser)


def main(args: argparse.Namespace) -> None:
    from cdae_em.denoise import DenoiseSettings
    from cdae_em.job import JobSettings, run_job

    apply_threads(args.j)
    settings = JobSettings(particles=args.i, out_dir=args.o, n_classes=args.K,
                           denoise=DenoiseSettings(batch_size=args.batch_size, phase_flip=args.phase_flip), method=args.method,
                           n_iter=args.iter, psi_step=args.psi_step, split_merge=args.split_merge, max_shift=args.max_shift,
                           project_dir=args.project_dir, gpu=args.gpu, threads=args.j, overwrite=args.overwrite,
                           seed=args.seed, stages="classify")
    summary = run_job(settings)
    log.info("class sizes: %s", summary["class_sizes"])
