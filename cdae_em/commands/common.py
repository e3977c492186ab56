"""Options shared by several commands (threads, seeds)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--j", type=int, default=1, metavar="N",
                        help="number of CPU threads, as RELION's --j (default: 1)")


def add_seed_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0); the same seed gives the same result")


def apply_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch (intra-op)."""
    import torch  # here, not at the top: ``cdae-em --help`` should not wait for torch

    torch.set_num_threads(max(1, int(n)))
    log.debug("using %d CPU threads", torch.get_num_threads())
