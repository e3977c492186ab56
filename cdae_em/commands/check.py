"""Check a particle STAR file and its stacks; print a summary.

Reads the STAR file (RELION 3.0 or 3.1/4/5), finds every image stack it refers to, checks their
headers (present, valid, square images of one box size, enough images), then reads every image
to check for NaN/infinite values. Any problem is reported as one line naming the file and row.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from cdae_em.commands.common import positive_int
from cdae_em.errors import InputError
from cdae_em.io.images import ImageSource
from cdae_em.io.star import read_particles

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", dest="input", required=True, metavar="STAR", help="particle STAR file")
    parser.add_argument(
        "--project-dir",
        default=None,
        metavar="DIR",
        help="directory that relative image paths start from (default: the working directory, "
        "then the STAR file's directory)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=1024, help="images read at a time (default: %(default)s)")


def _describe(values: np.ndarray, unit: str = "") -> str:
    """'1.77 A', or '1.06-1.77 A' when the values differ, or 'unknown' when all are missing."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return "unknown"
    lo, hi = float(values.min()), float(values.max())
    text = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    return f"{text} {unit}".rstrip()


def main(args: argparse.Namespace) -> None:
    table = read_particles(args.input)
    try:
        table.pixel_size()  # zero, negative or mixed pixel sizes: a problem, as `cdae-em run` says
    except InputError as exc:
        if not exc.problem.startswith("no pixel size"):
            raise
        log.warning("%s: `cdae-em run` will need one", exc)
    info = table.per_particle()
    with ImageSource(table, project_dir=args.project_dir) as source:
        lo, hi, total, total_sq = np.inf, -np.inf, 0.0, 0.0
        for _, images in source.batches(batch_size=args.batch_size, progress=True):
            lo, hi = min(lo, float(images.min())), max(hi, float(images.max()))
            as64 = images.astype(np.float64)
            total += as64.sum()
            total_sq += np.square(as64).sum()
        count = source.n * source.box * source.box
        mean = total / count
        std = np.sqrt(max(total_sq / count - mean**2, 0.0))
        n_groups = len(table.optics) if table.optics is not None else 1
        pixel = _describe(info["rlnImagePixelSize"].to_numpy(), "A")
        if pixel == "unknown" and source.voxel_size > 0:
            pixel = f"unknown in STAR ({source.voxel_size:g} A in the stack header)"
        log.info("%s: all %d images read, no problems found", table.path, source.n)
        log.info("  particles     %d", len(table))
        log.info("  flavour       RELION %s", table.flavour)
        log.info("  optics groups %d", n_groups)
        log.info("  stacks        %d", len(source.stacks))
        log.info("  box           %d x %d", source.box, source.box)
        log.info("  pixel size    %s", pixel)
        log.info("  defocus       %s", _describe(info["rlnDefocusU"].to_numpy(), "A"))
        log.info("  values        min %.4g, max %.4g, mean %.4g, std %.4g", lo, hi, mean, std)
