"""Options shared by several commands (threads, seeds)."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from cdae_em.settings import bound_problem, setting

log = logging.getLogger(__name__)


def bounded(kind: type, minimum: float | None = None, above: bool = False,
            maximum: float | None = None) -> Callable[[str], Any]:
    """A value parser for ``kind`` (int or float) that refuses values below ``minimum`` (or equal
    to it, with ``above``) or above ``maximum`` with a message naming the bound."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        problem = bound_problem(value, minimum, above, maximum)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = kind.__name__
    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (so that --batch-size 0 is a usage error)."""
    return bounded(int, minimum)


positive_int = at_least(1)
positive_float = bounded(float, 0, above=True)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--j", type=positive_int, default=1, metavar="N",
                        help="number of CPU threads, as RELION's --j (default: %(default)s)")


def add_seed_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=setting("seed").default,
                        help="random seed (default: %(default)s); the same seed gives the same result")


def apply_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch (intra-op)."""
    import torch  # here, not at the top: ``cdae-em --help`` should not wait for torch

    torch.set_num_threads(max(1, int(n)))
    log.debug("using %d CPU threads", torch.get_num_threads())
