"""The ``cdae-em`` command: one subcommand per module in ``cdae_em.commands``.

Each command module provides ``add_args(parser)`` and ``main(args)`` (the cryoDRGN/Topaz layout).
Errors the user can fix (``CdaeError``) are reported as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cdae_em import __version__
from cdae_em.errors import CdaeError

#: subcommand name -> module under cdae_em.commands
COMMANDS = {
    "demo": "demo",
    "run": "run",
    "simulate": "simulate",
    "check": "check",
    "pretrain": "pretrain",
    "denoise": "denoise",
    "classify": "classify",
    "select": "select",
    "evaluate": "evaluate",
}

log = logging.getLogger("cdae_em")


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps, the way long-running cryo-EM jobs are read in run logs."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``cdae-em`` parser. With ``only``, that command alone gets its options (the others just
    their name and help line): option defaults come from the settings dataclasses, which import
    torch, and `cdae-em check` or `cdae-em --help` should not wait for that."""
    parser = argparse.ArgumentParser(
        prog="cdae-em",
        allow_abbrev=False,  # --j must never be taken for --job
        description="Denoise single-particle cryo-EM images with a cascade of denoising "
        "autoencoders and sort them into 2D classes (STAR in, STAR out).",
    )
    parser.add_argument("--version", action="version", version=f"cdae-em {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"cdae_em.commands.{module_name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        p.add_argument(
            "--log-level",
            default="INFO",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="how much to log (default: INFO)",
        )
        if only is None or name == only:
            module.add_args(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=command if command in COMMANDS else "").parse_args(argv)
    setup_logging(args.log_level)
    try:
        if command in ("run", "denoise", "classify"):  # --gpu 0,1,2,3: one process per device (torchrun)
            from cdae_em.runtime.distributed import relaunch_on_gpus

            code = relaunch_on_gpus(args.gpu, "cdae_em", argv)
            if code is not None:
                sys.exit(code)
        args.func(args)
    except CdaeError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
