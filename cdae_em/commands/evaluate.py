"""Score a finished job against simulated ground truth (from `cdae-em simulate`).

Denoising: PSNR of the denoised particles against the clean projections (both standardised per
image; peak = the clean image's range) and of the noisy input, and the FRC-based resolution (0.5
threshold) of the mean FRC. Clustering: Hungarian-matched precision/recall/F1 (classes paired one
to one with true views), pair-counting precision/recall/F1 (over all particle pairs), ARI and NMI.
Writes --job/evaluation.json and prints a table.

example:
  cdae-em evaluate --job CDAE/job001 --truth sim/truth.star
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cdae_em.commands.common import positive_int

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", required=True, metavar="DIR", help="output directory of `cdae-em run`")
    parser.add_argument("--truth", required=True, metavar="STAR", help="truth.star written by `cdae-em simulate`")
    parser.add_argument("--max-images", type=positive_int, default=2000,
                        help="images used for PSNR/FRC (default: %(default)s)")


def evaluate(job: Path, truth_star: Path, max_images: int = 2000) -> dict:
    import numpy as np

    from cdae_em.io.atomic_write import write_text
    from cdae_em.errors import InputError
    from cdae_em.core.metrics import clustering_scores, frc, frc_resolution, psnr
    from cdae_em.io.images import ImageSource
    from cdae_em.io.star import read_particles

    summary_path = job / "summary.json"
    if not job.is_dir():
        raise InputError(job, "not a directory: --job takes the output directory of `cdae-em run`")
    if not summary_path.exists():
        raise InputError(summary_path, "not found: --job must be the output directory of a finished `cdae-em run` "
                         "(or denoise/classify)")
    try:
        settings = json.loads(summary_path.read_text())["settings"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(summary_path, f"not a cdae-em summary ({type(exc).__name__}: {exc})") from None
    truth = read_particles(truth_star)
    result: dict = {"job": str(job), "truth": str(truth_star)}
    parts_path = job / "particles.star"
    if parts_path.exists():
        parts = read_particles(parts_path)
        if len(parts) != len(truth):
            raise InputError(parts_path, f"{len(parts)} particles but the truth has {len(truth)}")
        views = truth.particles["rlnClassNumber"].to_numpy()
        if (views > 0).all():
            result["clustering"] = clustering_scores(views, parts.particles["rlnClassNumber"].to_numpy())
    den_path = job / "denoised_particles.star"
    if den_path.exists():
        den = read_particles(den_path)
        pick = np.linspace(0, len(den) - 1, min(max_images, len(den))).astype(int)
        with ImageSource(den) as d, ImageSource(truth, project_dir=truth_star.parent) as c:
            denoised, clean = d.read(pick), c.read(pick)
        if denoised.shape[-1] != clean.shape[-1]:  # denoised at a working box: scored at the input's
            import torch

            from cdae_em.core.preprocess import fourier_resize

            denoised = fourier_resize(torch.from_numpy(denoised), clean.shape[-1]).numpy()
        with ImageSource(settings["particles"], project_dir=settings["project_dir"]) as n:
            noisy = n.read(pick)
        if noisy.shape != clean.shape:
            raise InputError(truth_star, f"the truth's box {clean.shape[-1]} differs from the particles' {noisy.shape[-1]}")
        pixel = float(truth.per_particle()["rlnImagePixelSize"].iloc[0])
        result["denoising"] = {
            "images": len(pick),
            "psnr_noisy_db": float(psnr(noisy, clean).mean()),
            "psnr_denoised_db": float(psnr(denoised, clean).mean()),
            "frc_resolution_noisy_A": frc_resolution(frc(noisy, clean), pixel),
            "frc_resolution_denoised_A": frc_resolution(frc(denoised, clean), pixel),
        }
    if "clustering" not in result and "denoising" not in result:
        raise InputError(job, "nothing to evaluate: no particles.star with classes of simulated views, and no "
                         "denoised_particles.star")
    write_text(job / "evaluation.json", json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    """The scores as a Markdown table on stdout (the command's output)."""
    print("| measure | value |\n|---|---|")
    for section in ("denoising", "clustering"):
        for key, value in result.get(section, {}).items():
            print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


def main(args: argparse.Namespace) -> None:
    job = Path(args.job)
    result = evaluate(job, Path(args.truth), args.max_images)
    print_table(result)
