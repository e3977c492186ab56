"""Denoise the particles of a STAR file with the cascade (CDAE).

Loads pre-trained weights (default: those shipped with cdae-em, pre-trained on simulated particles
of many structures), CTF phase-flips the particles where they have CTF values, picks the protein
contrast (bright or dark) the model explains better, and denoises every particle. With --finetune
it first fine-tunes block 1, 2, 3 in turn on your particles (the paper's step) with targets = the
mean of each particle's k nearest neighbours, found with rotation/shift-invariant features and
aligned (in-plane rotation + shift) before averaging, and checks on held-out particles that
fine-tuning helped (otherwise the pre-trained cascade's output is written). A self-check (each output's
correlation with the clean images, estimated by Stein's lemma with the noise's covariance measured
on the particles' background) then
compares the model with plain filters (ring mean, Gaussian blurs): where one of them does better,
its output is written and classified instead, with a warning (--force-model keeps the model's).
The denoised images keep the input's contrast and scale; --equalise writes them histogram-equalised.

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

from cdae_em.commands.common import apply_threads
from cdae_em.commands.options import add_job_options, job_settings

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_job_options(parser, "denoise")


def main(args: argparse.Namespace) -> None:
    from cdae_em.job.runner import run_job

    settings = job_settings(args, "denoise", stages="denoise")
    apply_threads(settings.threads)
    result = run_job(settings)
    log.info("summary: %s", json.dumps({k: v for k, v in result.denoise.items() if k != "finetune"}))
