"""Simulate particle images with known truth from a 3D map or atomic model.

Projects a density map (MRC) or an atomic model (PDB/mmCIF, Gaussian atoms) at N orientations
(a fixed set of views, or random), with optional random in-plane rotation, shifts, CTF and
B-factor, and adds Gaussian noise at the requested SNR: white, or coloured like a real detector's
(--noise coloured), optionally normalised as RELION's Extract does (--normalise). With no --map,
the map embedded in cdae-em is used.

SNR = variance of the clean image over the box / variance of the added noise, per image. Clean
images are scaled to zero mean and unit variance, so the noise standard deviation is 1/sqrt(SNR).

Writes to --o: particles.star + particles.mrcs (RELION 3.1; one file pair per level with
--snr-ladder), clean.mrcs, truth.star (same rows: clean images, true rlnAngleRot/Tilt/Psi,
rlnOriginX/YAngst, defocus, view id as rlnClassNumber) and simulation.json.

examples:
  cdae-em simulate --o sim --n 2000 --views 8 --in-plane --max-shift 3 --ctf --snr 0.05
  cdae-em simulate --o ladder --n 4000 --ctf --in-plane --snr-ladder 0.1,0.4,0.6,clean
  cdae-em simulate --o real --n 2000 --views 8 --in-plane --ctf --snr 0.03 --noise coloured \
      --bfactor 150 --normalise
"""

from __future__ import annotations

import argparse
import logging

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads, positive_int
from cdae_em.errors import InputError

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--o", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--map", metavar="FILE",
                        help="3D map (.mrc) or atomic model (.pdb/.cif); default: the embedded map")
    parser.add_argument("--n", type=positive_int, default=1000, help="number of particles (default: %(default)s)")
    parser.add_argument("--views", type=positive_int, metavar="K",
                        help="use K fixed views spread over the sphere (view id = class); default: random orientations")
    parser.add_argument("--in-plane", action="store_true", help="random in-plane rotation (psi)")
    parser.add_argument("--max-shift", type=float, default=0.0, metavar="PX",
                        help="random shifts up to this many pixels in x and y (default: 0)")
    snr = parser.add_mutually_exclusive_group()
    snr.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (default: 0.1)")
    snr.add_argument("--snr-ladder", metavar="LIST",
                     help="write the same projections at several SNRs, e.g. 0.1,0.4,0.6,clean")
    ctf = parser.add_argument_group("CTF")
    ctf.add_argument("--ctf", action="store_true", help="apply a CTF to every particle")
    ctf.add_argument("--defocus", type=float, nargs=2, default=(1.0, 3.0), metavar=("MIN", "MAX"),
                     help="defocus range in micrometres (default: 1 3)")
    ctf.add_argument("--astigmatism", type=float, default=0.0, metavar="A",
                     help="largest |defocusU - defocusV| in Angstrom (default: 0)")
    ctf.add_argument("--voltage", type=float, default=300.0, help="kV (default: 300)")
    ctf.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default: 2.7)")
    ctf.add_argument("--amplitude-contrast", type=float, default=0.1, help="(default: 0.1)")
    real = parser.add_argument_group("real-data conditions")
    real.add_argument("--noise", choices=["white", "coloured"], default="white",
                      help="noise power spectrum: white, or coloured like a real detector's (power falling with "
                           "frequency, neighbouring pixels correlated 0.2; default: %(default)s)")
    real.add_argument("--bfactor", type=float, default=0.0, metavar="A2",
                      help="B-factor damping the signal, A^2 (real data: 100-200; default: 0)")
    real.add_argument("--junk", type=float, default=0.0, metavar="FRACTION",
                      help="this fraction of the picks are junk: empty boxes of ice, carbon-film edges, aggregates "
                           "and fragments, equally often (truth.star names each row's kind in cdaeTrueKind; "
                           "default: 0)")
    real.add_argument("--normalise", action="store_true",
                      help="normalise each noisy image as RELION's Extract does (background mean 0, std 1)")
    parser.add_argument("--dark", action="store_true",
                        help="protein dark, as in raw micrographs (default: bright, as RELION extracts with "
                             "inverted contrast)")
    geo = parser.add_argument_group("sampling")
    geo.add_argument("--box", type=int, help="box size in pixels (default: the map's box, or 64 for a model)")
    geo.add_argument("--pixel-size", type=float, metavar="A",
                     help="pixel size in Angstrom (default: the map header's; for a model, fit to the box)")
    geo.add_argument("--resolution", type=float, metavar="A",
                     help="model only: resolution of the Gaussian atoms (default: 2 x pixel size)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per batch (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier simulation in --o")
    add_threads_arg(parser)
    add_seed_arg(parser)


def main(args: argparse.Namespace) -> None:
    from cdae_em.simulate.realism import REAL_NOISE, WHITE
    from cdae_em.simulate.simulator import SimulationSettings, load_source, parse_snrs, simulate

    apply_threads(args.j)
    if args.n < 1:
        raise InputError(None, f"--n must be at least 1, got {args.n}")
    if args.box is not None and args.box < 8:
        raise InputError(None, f"--box must be at least 8 pixels, got {args.box}")
    try:
        snrs = parse_snrs(args.snr_ladder) if args.snr_ladder else parse_snrs(str(args.snr))
    except ValueError as exc:
        raise InputError(None, f"--snr/--snr-ladder: {exc}") from None
    if not 0 <= args.junk < 1:
        raise InputError(None, f"--junk must be a fraction in [0, 1), got {args.junk}")
    if args.bfactor < 0:
        raise InputError(None, f"--bfactor must be at least 0, got {args.bfactor}")
    source = load_source(args.map, box=args.box, pixel_size=args.pixel_size, resolution=args.resolution)
    settings = SimulationSettings(
        n_particles=args.n,
        n_views=args.views,
        in_plane=args.in_plane,
        max_shift=args.max_shift,
        ctf=args.ctf,
        defocus_range=(args.defocus[0] * 1e4, args.defocus[1] * 1e4),
        astigmatism=args.astigmatism,
        voltage=args.voltage,
        cs=args.cs,
        amplitude_contrast=args.amplitude_contrast,
        snrs=snrs,
        dark=args.dark,
        noise=REAL_NOISE if args.noise == "coloured" else WHITE,
        bfactor=args.bfactor,
        normalise=args.normalise,
        junk_fraction=args.junk,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    simulate(source, settings, args.o, overwrite=args.overwrite,
             single_name=None if args.snr_ladder else "particles")
