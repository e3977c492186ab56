"""Pre-train the cascade on simulated projections of a map (an SNR ladder), block by block.

Simulates the same projections at SNR 0.1, 0.4, 0.6 and clean (--snr-ladder), with CTF and random
in-plane rotation and shifts as real particles have, then trains block 1 on 0.1 -> 0.4, block 2 on
0.4 -> 0.6 and block 3 on 0.6 -> clean (MSE, RMSprop as in the paper; Adam selectable), with a
held-out 10% giving a validation loss per epoch. Writes --o/cdae_weights.pt (usable with
`cdae-em denoise --weights`) and --o/pretrain.json (settings and losses).

example:
  cdae-em pretrain --map my_initial_model.mrc --o weights --n 4000 --epochs 20 --gpu 0
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory for the weights")
    parser.add_argument("--map", metavar="FILE", help="3D map (.mrc) or model (.pdb/.cif); default: the embedded map")
    parser.add_argument("--n", type=int, default=4000, help="simulated particles per SNR level (default: 4000)")
    parser.add_argument("--snr-ladder", default="0.1,0.4,0.6,clean", metavar="LIST",
                        help="SNR levels, one more than blocks (default: 0.1,0.4,0.6,clean)")
    parser.add_argument("--box", type=int, help="box size (default: the map's)")
    parser.add_argument("--pixel-size", type=float, metavar="A", help="pixel size (default: the map's)")
    parser.add_argument("--no-ctf", action="store_true", help="simulate without CTF")
    parser.add_argument("--max-shift", type=float, default=3.0, metavar="PX", help="random shifts (default: 3 px)")
    parser.add_argument("--defocus", type=float, nargs=2, default=(1.0, 3.0), metavar=("MIN", "MAX"),
                        help="defocus range in micrometres (default: 1 3)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=20, help="epochs per block (default: 20, as the paper)")
    train.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    train.add_argument("--optimizer", choices=["rmsprop", "adam"], default="rmsprop", help="(default: rmsprop)")
    train.add_argument("--channels", default="32,64,128", help="channels of the 3 encoder modules (default: 32,64,128)")
    train.add_argument("--dropout", type=float, default=0.5, help="dropout in encoder and decoder (default: 0.5)")
    parser.add_argument("--gpu", metavar="ID", help="CUDA device to use, e.g. 0 (default: CPU)")
    parser.add_argument("--keep-ladder", action="store_true", help="keep the simulated ladder in --o/ladder")
    add_threads_arg(parser)
    add_seed_arg(parser)


def main(args: argparse.Namespace) -> None:
    from cdae_em import __version__
    from cdae_em.denoise import resolve_device
    from cdae_em.errors import InputError
    from cdae_em.simulate import SimulationSettings, load_source, parse_snrs
    from cdae_em.train import TrainSettings, pretrain

    apply_threads(args.j)
    device = resolve_device(args.gpu)
    try:
        levels = parse_snrs(args.snr_ladder)
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError as exc:
        raise InputError(None, f"--snr-ladder/--channels: {exc}") from None
    if len(levels) < 2:
        raise InputError(None, "--snr-ladder needs at least two levels (one more than blocks)")
    if args.n < 10:
        raise InputError(None, f"--n {args.n}: too few particles to train on (at least 10)")
    source = load_source(args.map, box=args.box, pixel_size=args.pixel_size)
    sim = SimulationSettings(n_particles=args.n, in_plane=True, max_shift=args.max_shift, ctf=not args.no_ctf,
                             defocus_range=(args.defocus[0] * 1e4, args.defocus[1] * 1e4), snrs=levels, seed=args.seed)
    train = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          seed=args.seed)
    meta = {"command": "cdae-em " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "cdae_em_version": __version__,
            "seed": args.seed}
    pretrain(source, args.o, sim, train, device, channels=channels, dropout=args.dropout, metadata=meta,
             keep_ladder=args.keep_ladder)
