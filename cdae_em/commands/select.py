"""Select classes again, with another threshold, without rerunning the job.

Reads --job/class_averages.star (each class's rlnClassScore) and --job/particles.star, and
rewrites --job/particles_selected.star and class_averages_selected.star with the classes
scoring at least --threshold (0-1), less their members that fit their class poorly or are crowded
(cdaeClassFit, cdaeCrowding). The score's recipe: ``cdae_em.job.selection``. gallery.png
keeps the job's own selection (green frames); summary.json too.

example:
  cdae-em select --job CDAE/job001 --threshold 0.5
"""

from __future__ import annotations

import argparse
import logging

from cdae_em.commands.common import bounded

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    from cdae_em.settings import setting

    parser.add_argument("--job", required=True, metavar="DIR",
                        help="output directory of a finished `cdae-em run` or `cdae-em classify`")
    threshold = setting("select_threshold")
    parser.add_argument("--threshold", type=bounded(float, threshold.option.minimum, maximum=threshold.option.maximum),
                        default=threshold.default, metavar="X",
                        help="select the classes scoring at least this (0-1; default: %(default)s)")


def main(args: argparse.Namespace) -> None:
    from cdae_em.job.lock import refuse_if_locked
    from cdae_em.job.selection import write_selection

    refuse_if_locked(args.job)
    write_selection(args.job, args.threshold)
