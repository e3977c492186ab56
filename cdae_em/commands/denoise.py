"""Denoise the particles of a STAR file with the cascade (CDAE), fine-tuned on them.

Loads pre-trained weights (default: those shipped with cdae-em, pre-trained on simulated
projections of the embedded map), fine-tunes block 1, 2, 3 in turn on your particles with targets =
the mean of each particle's k nearest neighbours, found with rotation/shift-invariant features and
aligned (in-plane rotation + shift) before averaging, then denoises every particle and applies
histogram equalisation inside the particle mask.

Writes --o/denoised/*.mrcs and --o/denoised_particles.star: every input row and column kept,
rlnImageName pointing at the denoised images, rlnImageOriginalName at the input ones, optics pixel
size and image size matching the written stacks; and --o/denoised_pairs.png, raw / denoised
pairs to look at.

example:
  cdae-em denoise --i Extract/job005/particles.star --o Denoise/ --gpu 0 --j 4
"""

from __future__ import annotations

import argparse
import json
import logging

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads

log = logging.getLogger(__name__)


def add_denoise_args(parser: argparse.ArgumentParser) -> None:
    """Denoising options, shared with `cdae-em run`."""
    g = parser.add_argument_group("denoising")
    g.add_argument("--weights", metavar="FILE", help="cascade weights (default: the shipped pre-trained weights)")
    g.add_argument("--no-finetune", action="store_true", help="use the weights as they are, without fine-tuning")
    g.add_argument("--k", type=int, default=30, help="neighbours per particle for fine-tuning targets (default: 30)")
    g.add_argument("--max-distance", type=float, metavar="D",
                   help="ignore neighbours farther than this in feature space (default: no threshold)")
    g.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per block (default: 3; the paper used 20)")
    g.add_argument("--finetune-subset", type=int, default=4000, metavar="N",
                   help="particles that fine-tune each block (default: 4000; all if fewer)")
    g.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default: 1e-4)")
    g.add_argument("--optimizer", choices=["rmsprop", "adam"], default="rmsprop", help="(default: rmsprop)")
    g.add_argument("--no-equalise", action="store_true", help="skip histogram equalisation of the output")
    g.add_argument("--mask-diameter", type=float, metavar="A", help="particle mask diameter, Angstrom (default: 90%% of the box)")
    g.add_argument("--phase-flip", action="store_true", help="CTF phase-flip the particles first (needs CTF columns)")
    g.add_argument("--box", type=int, help="working box: Fourier-crop (bin) or pad the particles to this size")
    g.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    g.add_argument("--gpu", metavar="ID", help="CUDA device, e.g. 0 (default: CPU)")
    g.add_argument("--project-dir", metavar="DIR", help="directory that image paths are relative to (default: the working directory)")


def denoise_settings(args: argparse.Namespace):
    from cdae_em.denoise import DenoiseSettings
    from cdae_em.train import TrainSettings

    return DenoiseSettings(
        weights=args.weights, finetune=not args.no_finetune, k=args.k, max_distance=args.max_distance,
        finetune_subset=args.finetune_subset,
        train=TrainSettings(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, seed=args.seed),
        equalise=not args.no_equalise, mask_diameter=args.mask_diameter, phase_flip=args.phase_flip,
        box=args.box, batch_size=args.batch_size, seed=args.seed,
    )


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="STAR", help="input particles STAR file")
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--keep-work", action="store_true", help="keep the intermediate arrays in --o/.cdae_work")
    add_denoise_args(parser)
    add_threads_arg(parser)
    add_seed_arg(parser)


def main(args: argparse.Namespace) -> None:
    from cdae_em.denoise import denoise, resolve_device

    apply_threads(args.j)
    summary = denoise(args.i, args.o, denoise_settings(args), resolve_device(args.gpu),
                      project_dir=args.project_dir, keep_work=args.keep_work)
    log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if k != "finetune"}))
