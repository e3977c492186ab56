"""Denoise the particles of a STAR file with the cascade (CDAE).

Loads pre-trained weights (default: those shipped with cdae-em, pre-trained on simulated particles
of many structures), CTF phase-flips the particles where they have CTF values, picks the protein
contrast (bright or dark) the model explains better, and denoises every particle. With --finetune
it first fine-tunes block 1, 2, 3 in turn on your particles (the paper's step) with targets = the
mean of each particle's k nearest neighbours, found with rotation/shift-invariant features and
aligned (in-plane rotation + shift) before averaging, and checks on held-out particles that
fine-tuning helped (blind-spot loss; otherwise the pre-trained cascade's output is written). The
denoised images keep the input's contrast and scale; --equalise writes them histogram-equalised.

Writes --o/denoised/*.mrcs and --o/denoised_particles.star: every input row and column kept,
rlnImageName pointing at the denoised images, rlnImageOriginalName at the input ones, optics pixel
size and image size matching the written stacks; --o/denoised_pairs.png, raw / denoised pairs to
look at; and --o/summary.json. Blank images (all pixels equal) are passed through unchanged and
left out of fine-tuning. A killed run rerun with the same arguments resumes from its finished
stages; different settings into the same --o are refused unless --overwrite.

example:
  cdae-em denoise --i Extract/job005/particles.star --o Denoise/ --gpu 0 --j 4
"""

from __future__ import annotations

import argparse
import json
import logging

from cdae_em.commands.common import (add_seed_arg, add_threads_arg, apply_threads, at_least, positive_float,
                                     positive_int)

log = logging.getLogger(__name__)


def add_denoise_args(parser: argparse.ArgumentParser) -> None:
    """Denoising options, shared with `cdae-em run`; defaults are DenoiseSettings'."""
    from cdae_em.denoise import DenoiseSettings

    d = DenoiseSettings()
    g = parser.add_argument_group("denoising")
    g.add_argument("--weights", metavar="FILE", default=d.weights,
                   help="cascade weights (default: the shipped pre-trained weights)")
    g.add_argument("--finetune", dest="finetune", action="store_true", default=d.finetune,
                   help="fine-tune the weights on these particles first (the paper's step; off by default: with the "
                        "shipped weights it did not help on held-out data, see docs/denoiser.md)")
    g.add_argument("--no-finetune", dest="finetune", action="store_false",
                   help="use the weights as they are (the default)")
    g.add_argument("--neighbours", "--k", dest="k", type=positive_int, default=d.k, metavar="N",
                   help="neighbours per particle for the fine-tuning targets (default: %(default)s; --k is an alias)")
    g.add_argument("--max-distance", type=positive_float, metavar="D", default=d.max_distance,
                   help="ignore neighbours farther than this in feature space (default: no threshold)")
    g.add_argument("--epochs", type=at_least(0), default=d.train.epochs,
                   help="fine-tuning epochs per block (default: %(default)s; the paper used 20)")
    g.add_argument("--finetune-subset", type=positive_int, default=d.finetune_subset, metavar="N",
                   help="particles that fine-tune each block (default: %(default)s; all if fewer)")
    g.add_argument("--lr", type=positive_float, default=d.train.lr, help="fine-tuning learning rate (default: %(default)s)")
    g.add_argument("--optimizer", choices=["rmsprop", "adam"], default=d.train.optimizer, help="(default: %(default)s)")
    g.add_argument("--equalise", action="store_true",
                   help="write histogram-equalised denoised stacks (the paper's enhancement step; default: faithful "
                        "images; classification equalises for its own use either way)")
    g.add_argument("--no-equalise", action="store_true", help=argparse.SUPPRESS)  # the default since 0.2
    g.add_argument("--contrast", choices=["auto", "bright", "dark"], default=d.contrast,
                   help="protein bright (RELION extraction with inverted contrast) or dark (raw micrographs); auto "
                        "picks the one the model explains better (blind-spot loss); the output keeps the input's "
                        "contrast (default: %(default)s)")
    g.add_argument("--no-check", action="store_true",
                   help="skip the blind-spot check of fine-tuning on held-out particles (and its fallback to the "
                        "pre-trained cascade)")
    g.add_argument("--mask-diameter", type=positive_float, metavar="A", default=d.mask_diameter,
                   help="particle mask diameter, Angstrom (default: 90%% of the box)")
    add_phase_flip_args(g)
    g.add_argument("--box", type=at_least(8), default=d.box,
                   help="working box: Fourier-crop (bin) or pad the particles to this size (default: the particles' box)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="images per batch; smaller needs less (GPU) memory (default: %(default)s)")
    g.add_argument("--gpu", metavar="IDS", help="CUDA device, e.g. 0 (default: CPU); several, e.g. 0,1,2,3: one "
                                                 "process per device (torchrun), the work shared between them")
    g.add_argument("--keep-work", action="store_true",
                   help="keep the intermediate arrays in --o/.cdae_work (default: removed when denoising has "
                        "finished; their size is logged)")
    g.add_argument("--project-dir", metavar="DIR", help="directory that image paths are relative to (default: the working directory)")


def add_phase_flip_args(group) -> None:
    """--phase-flip / --no-phase-flip (default: auto), shared by denoise, run and classify."""
    group.add_argument("--phase-flip", dest="phase_flip", action="store_true", default=None,
                       help="CTF phase-flip the particles before denoising and alignment (default: when every particle "
                            "has CTF values and rlnCtfDataArePhaseFlipped is not 1)")
    group.add_argument("--no-phase-flip", dest="phase_flip", action="store_false", help="never phase-flip")


def denoise_settings(args: argparse.Namespace):
    from cdae_em.denoise import DenoiseSettings
    from cdae_em.train import TrainSettings

    return DenoiseSettings(
        weights=args.weights, finetune=args.finetune, k=args.k, max_distance=args.max_distance,
        finetune_subset=args.finetune_subset,
        train=TrainSettings(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, seed=args.seed),
        equalise=args.equalise, contrast=args.contrast, check=not args.no_check, mask_diameter=args.mask_diameter, phase_flip=args.phase_flip,
        box=args.box, batch_size=args.batch_size, seed=args.seed,
    )


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="STAR", help="input particles STAR file")
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--ref", metavar="MAP", help="pre-train on this map (an initial model) before fine-tuning")
    parser.add_argument("--overwrite", action="store_true", help="replace a different job's outputs in --o")
    add_denoise_args(parser)
    add_threads_arg(parser)
    add_seed_arg(parser)


def main(args: argparse.Namespace) -> None:
    from cdae_em.job import JobSettings, run_job

    apply_threads(args.j)
    settings = JobSettings(particles=args.i, out_dir=args.o, n_classes=0, denoise=denoise_settings(args),
                           project_dir=args.project_dir, reference_map=args.ref, gpu=args.gpu, threads=args.j,
                           overwrite=args.overwrite, seed=args.seed, stages="denoise", keep_work=args.keep_work)
    summary = run_job(settings)
    log.info("summary: %s", json.dumps({k: v for k, v in summary["denoise"].items() if k != "finetune"}))
