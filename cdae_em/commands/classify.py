"""Classify particles of a STAR file (typically already denoised) into 2D classes.

The classification stage of `cdae-em run` on its own: initial classes from rotation/shift-
invariant features (k-means or hierarchical), rounds of alignment to the class averages and
re-assignment. Writes --o/particles.star (input rows + rlnClassNumber, rlnAnglePsi,
rlnOriginX/YAngst), class_averages.mrcs/.star (averages of the input STAR's images, classes by
size) and summary.json.

example:
  cdae-em classify --i CDAE/job001/denoised_particles.star --o Classes/ --K 10
"""

from __future__ import annotations

import argparse
import json
import logging

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads
from cdae_em.commands.run import add_classify_args

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="STAR", help="particles STAR file")
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory")
    add_classify_args(parser)
    parser.add_argument("--gpu", metavar="ID", help="CUDA device, e.g. 0 (default: CPU)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument("--project-dir", metavar="DIR", help="directory image paths are relative to (default: cwd)")
    add_threads_arg(parser)
    add_seed_arg(parser)


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    from cdae_em.classify import ClassifySettings, classify
    from cdae_em.denoise import DenoiseSettings, resolve_device
    from cdae_em.errors import InputError
    from cdae_em.atomic import write_text as atomic_text
    from cdae_em.job import JobSettings, StarImages
    from cdae_em.outputs import write_outputs
    from cdae_em.star import read_particles

    apply_threads(args.j)
    device = resolve_device(args.gpu)
    table = read_particles(args.i)
    if not 2 <= args.K <= len(table):
        raise InputError(args.i, f"K={args.K} must be between 2 and the number of particles ({len(table)})")
    settings = JobSettings(particles=args.i, out_dir=args.o, n_classes=args.K,
                           denoise=DenoiseSettings(batch_size=args.batch_size), method=args.method,
                           n_iter=args.iter, psi_step=args.psi_step, max_shift=args.max_shift,
                           project_dir=args.project_dir, seed=args.seed)
    Path(args.o).mkdir(parents=True, exist_ok=True)
    with StarImages(Path(args.i), args.project_dir) as images:
        result = classify(images, ClassifySettings(
            n_classes=args.K, method=args.method, n_iter=args.iter, psi_step=args.psi_step,
            max_shift=args.max_shift, batch_size=args.batch_size, seed=args.seed), device)
        box = images.shape[-1]
    summary = write_outputs(settings, table, result.labels, result.psi, result.origin, result.score,
                            result.references, box, device)
    summary["classify"] = result.history
    atomic_text(Path(args.o) / "summary.json", json.dumps(summary, indent=2, default=str))
    log.info("class sizes: %s", summary["class_sizes"])
