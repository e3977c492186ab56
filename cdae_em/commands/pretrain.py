"""Pre-train the cascade on simulated particles of many structures, block by block.

Training pairs are drawn on the fly (nothing is written to disk): projections of the atomic models
that ship with cdae-em (or of your own maps/models, --map), at random views, with particles
spanning 45-90% of the box, random in-plane rotation and shifts, CTFs (defocus 0.5-3.5 um, some
phase-flipped), a random blur and B-factor, ice gradients and carbon edges, and noise at SNR
0.01-0.5: white on a quarter of the pairs, on the rest coloured like a real detector's, each with
its own random power spectrum. Protein is bright, as after RELION
extraction with inverted contrast: `cdae-em denoise` detects dark-protein stacks and flips them.
Block 1 learns noisy -> clean, block 2 block 1's outputs -> clean, block 3 block 2's -> clean.
Writes --o/cdae_weights.pt (usable with `cdae-em denoise --weights`) and --o/pretrain.json
(settings, validation losses and PSNR gains). The default weights were made with the defaults.

example:
  cdae-em pretrain --o weights --j 2
  cdae-em pretrain --map my_initial_model.mrc --o weights --gpu 0
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads, positive_int

log = logging.getLogger(__name__)


def _defaults():
    from cdae_em.simulate.pretrain_data import PairSettings
    from cdae_em.denoise.train import PretrainSettings

    return PairSettings(), PretrainSettings()


def add_args(parser: argparse.ArgumentParser) -> None:
    pairs, train = _defaults()
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory for the weights")
    parser.add_argument("--map", nargs="+", metavar="FILE",
                        help="3D maps (.mrc) or models (.pdb/.cif) to train on (default: the shipped structures)")
    parser.add_argument("--box", type=positive_int, default=pairs.box, help="box size (default: %(default)s)")
    parser.add_argument("--fill", type=float, nargs=2, default=pairs.fill, metavar=("MIN", "MAX"),
                        help="particle diameter / box (default: %(default)s)")
    parser.add_argument("--snr", type=float, nargs=2, default=pairs.snr, metavar=("MIN", "MAX"),
                        help="SNR range, drawn log-uniformly (default: %(default)s)")
    parser.add_argument("--dark-fraction", type=float, default=pairs.dark_fraction,
                        help="fraction of pairs with dark protein (default: %(default)s)")
    real = parser.add_argument_group("real-data conditions")
    real.add_argument("--white-fraction", type=float, default=pairs.white_fraction,
                      help="fraction of pairs with white noise; the rest get detector-like coloured noise with "
                           "random spectra (default: %(default)s)")
    real.add_argument("--bfactor", type=float, nargs=2, default=pairs.bfactor, metavar=("MIN", "MAX"),
                      help="B-factor range damping the signal, A^2 (default: %(default)s)")
    real.add_argument("--background-fraction", type=float, default=pairs.background_fraction,
                      help="fraction of pairs with an ice gradient in the box (default: %(default)s)")
    real.add_argument("--carbon-fraction", type=float, default=pairs.carbon_fraction,
                      help="fraction of those with a carbon edge (default: %(default)s)")
    parser.add_argument("--views", type=positive_int, default=pairs.views_per_structure,
                        help="projections per structure (default: %(default)s)")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", default=",".join(map(str, train.steps)), metavar="LIST",
                       help="optimiser steps per block; the count sets the number of blocks (default: %(default)s)")
    group.add_argument("--batch-size", type=positive_int, default=train.batch_size, help="(default: %(default)s)")
    group.add_argument("--lr", type=float, default=train.lr, help="learning rate (default: %(default)s)")
    group.add_argument("--optimizer", choices=["rmsprop", "adam"], default=train.optimizer,
                       help="(default: %(default)s)")
    group.add_argument("--channels", default="32,64,128",
                       help="channels of the 3 encoder modules (default: %(default)s, the paper's)")
    group.add_argument("--dropout", type=float, default=0.1,
                       help="dropout in encoder and decoder (default: %(default)s; the paper: 0.5)")
    group.add_argument("--decoder", choices=["transpose", "upsample"], default="transpose",
                       help="upsampling layers of the decoder (default: %(default)s, the paper's)")
    group.add_argument("--init", metavar="WEIGHTS",
                       help="start from these weights (their channels and decoder; default: random initialisation)")
    parser.add_argument("--gpu", metavar="ID", help="CUDA device to use, e.g. 0 (default: CPU)")
    add_threads_arg(parser)
    add_seed_arg(parser)


def _ints(text: str, what: str, count: int | None = None) -> tuple[int, ...]:
    from cdae_em.errors import InputError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(None, f"{what}: expected whole numbers separated by commas, got {text!r}") from None
    if any(v < 1 for v in values) or (count is not None and len(values) != count):
        raise InputError(None, f"{what}: expected {count or 'one or more'} positive whole numbers, got {text!r}")
    return values


def main(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from cdae_em import __version__
    from cdae_em.runtime.distributed import resolve_device
    from cdae_em.errors import InputError
    from cdae_em.simulate.pretrain_data import PairSampler, PairSettings, ProjectionBank, load_structures
    from cdae_em.denoise.train import PretrainSettings, pretrain

    apply_threads(args.j)
    device = resolve_device(args.gpu)
    steps = _ints(args.steps, "--steps")
    channels = _ints(args.channels, "--channels", count=3)
    if not (0 < args.fill[0] <= args.fill[1] <= 1):
        raise InputError(None, f"--fill {args.fill[0]} {args.fill[1]}: expected 0 < MIN <= MAX <= 1")
    if not (0 < args.snr[0] <= args.snr[1]):
        raise InputError(None, f"--snr {args.snr[0]} {args.snr[1]}: expected 0 < MIN <= MAX")
    for name in ("dark_fraction", "white_fraction", "background_fraction", "carbon_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            raise InputError(None, f"--{name.replace('_', '-')} {getattr(args, name)}: expected a fraction from 0 to 1")
    if not 0 <= args.bfactor[0] <= args.bfactor[1]:
        raise InputError(None, f"--bfactor {args.bfactor[0]} {args.bfactor[1]}: expected 0 <= MIN <= MAX")
    pairs = dataclasses.replace(PairSettings(), box=args.box, fill=tuple(args.fill), snr=tuple(args.snr),
                                dark_fraction=args.dark_fraction, views_per_structure=args.views,
                                white_fraction=args.white_fraction, bfactor=tuple(args.bfactor),
                                background_fraction=args.background_fraction, carbon_fraction=args.carbon_fraction,
                                seed=args.seed)
    structures, maps = {}, {}
    if args.map:
        from cdae_em.simulate.simulator import load_source

        for path in args.map:
            source = load_source(path)
            if source.kind == "atoms":
                structures[path] = source.atoms
            else:
                maps[path] = (source.volume, source.pixel_size)
    else:
        structures = load_structures()
    sampler = PairSampler(ProjectionBank(structures, pairs, maps), pairs)
    settings = PretrainSettings(steps=steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                                seed=args.seed)
    meta = {"command": "cdae-em " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "cdae_em_version": __version__,
            "seed": args.seed, "torch": torch.__version__, "numpy": np.__version__}
    init = None
    if args.init:
        from cdae_em.denoise.weights import load_weights

        init, init_meta = load_weights(args.init)
        meta["init"] = {"path": args.init, "command": init_meta.get("command"), "version": init_meta.get("cdae_em_version")}
    pretrain(sampler, args.o, settings, device, channels=channels, dropout=args.dropout, decoder=args.decoder,
             metadata=meta, init=init)
