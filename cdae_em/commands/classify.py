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

from cdae_em.commands.common import apply_threads
from cdae_em.commands.options import add_job_options, job_settings

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_job_options(parser, "classify")


def main(args: argparse.Namespace) -> None:
    from cdae_em.job.runner import run_job

    settings = job_settings(args, "classify", stages="classify")
    apply_threads(settings.threads)
    result = run_job(settings)
    log.info("class sizes: %s", result.class_sizes)
