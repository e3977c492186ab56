"""Options shared by several commands (threads, seeds)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (so that --batch-size 0 is a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


positive_int = at_least(1)


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--j", type=positive_int, default=1, metavar="N",
                        help="number of CPU threads, as RELION's --j (default: %(default)s)")


def add_seed_arg(parser: argparse.ArgumentParser) -> None:
    from cdae_em.job import JobSettings

    parser.add_argument("--seed", type=int, default=JobSettings.seed,
                        help="random seed (default: %(default)s); the same seed gives the same result")


def apply_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch (intra-op)."""
    import torch  # here, not at the top: ``cdae-em --help`` should not wait for torch

    torch.set_num_threads(max(1, int(n)))
    log.debug("using %d CPU threads", torch.get_num_threads())
