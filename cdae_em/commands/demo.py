"""Run the whole job on a small simulated data set: the quickest way to see cdae-em work.

Simulates particles from the map that ships with cdae-em (--views views, random in-plane rotation
and shifts, CTF, SNR --snr), runs `cdae-em run` on them with the shipped weights, then scores the
result against the known truth (`cdae-em evaluate`). Everything goes under --o:
sim/ (particles.star, truth.star, ...) and job/ (the job's outputs; look at job/gallery.png).
Takes a few minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cdae_em.commands.common import add_seed_arg, add_threads_arg, apply_threads, at_least, positive_int

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--o", default="cdae_demo", metavar="DIR", help="output directory (default: cdae_demo)")
    parser.add_argument("--n", type=positive_int, default=800, help="particles (default: %(default)s)")
    parser.add_argument("--views", type=at_least(2), default=4, help="distinct views = classes (default: %(default)s)")
    parser.add_argument("--snr", type=float, default=0.1, help="(default: 0.1)")
    parser.add_argument("--epochs", type=at_least(0), default=2, help="fine-tuning epochs per block (default: %(default)s)")
    parser.add_argument("--gpu", metavar="ID", help="CUDA device, e.g. 0 (default: CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --o")
    add_threads_arg(parser)
    add_seed_arg(parser)


def main(args: argparse.Namespace) -> None:
    from cdae_em.commands.evaluate import evaluate, print_table
    from cdae_em.job.runner import run_job
    from cdae_em.settings import ClassifySettings, DenoiseSettings, JobSettings, TrainSettings
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

    apply_threads(args.j)
    out = Path(args.o)
    sim = out / "sim"
    settings = SimulationSettings(n_particles=args.n, n_views=args.views, in_plane=True, max_shift=2.0, ctf=True,
                                  snrs=[args.snr], seed=args.seed)
    simulate(load_source(None), settings, sim, overwrite=args.overwrite)
    job = JobSettings(particles=str(sim / "particles.star"), out_dir=str(out / "job"),
                      denoise=DenoiseSettings(train=TrainSettings(epochs=args.epochs, lr=1e-4, seed=args.seed),
                                              seed=args.seed),
                      classify=ClassifySettings(n_classes=args.views, seed=args.seed),
                      gpu=args.gpu, threads=args.j, overwrite=args.overwrite, seed=args.seed)
    run_job(job)
    result = evaluate(out / "job", sim / "truth.star")
    print_table(result)
    log.info("demo done: see %s (gallery.png, summary.json, evaluation.json)", out / "job")
