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

from cdae_em.commands.common import apply_threads
from cdae_em.commands.options import add_job_options
from cdae_em.commands.options import job_settings as settings_from_args

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_job_options(parser, "run")


def job_settings(args: argparse.Namespace):
    return settings_from_args(args, "run")


def main(args: argparse.Namespace) -> None:
    from cdae_em.job.runner import run_job

    settings = job_settings(args)
    apply_threads(settings.threads)
    result = run_job(settings)
    log.info("class sizes: %s", result.class_sizes)
