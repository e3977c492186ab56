"""The arguments of ``cdae-em-relion`` as RELION passes them: the parser (RELION's I/O options,
the user's ``--<label> <value>`` parameters, ``_``/``-`` spelt either way, an empty value meaning
"not given") and the conversion of RELION-style values (Yes/No, GPU ids)."""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any, Callable

log = logging.getLogger("cdae_em.relion")


class ArgumentError(Exception):
    """A RELION argument could not be used (reported as the job's failure reason)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # never exit from inside argparse: the job must write its exit file
        raise ArgumentError(message)


def _names(*names: str) -> list[str]:
    """--a_b and --a-b for each name (RELION users type labels either way)."""
    out = []
    for n in names:
        for v in (n, n.replace("_", "-"), n.replace("-", "_")):
            if f"--{v}" not in out:
                out.append(f"--{v}")
    return out


def yes_no(text: str) -> bool:
    """RELION's Yes/No (and true/false, 1/0, on/off); an empty value is Yes (a bare --flag)."""
    t = str(text).strip().lower()
    if t in ("", "yes", "y", "true", "1", "on"):
        return True
    if t in ("no", "n", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected Yes or No, got {text!r}")


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A value converter for which an empty value means "not given" (RELION passes a parameter
    whose value field is empty as a bare --label)."""
    def parse(text: str):
        return None if str(text).strip() in ("", '""', "''") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The parser of every argument RELION may pass (unknown ones are left to the caller)."""
    p = _Parser(prog="cdae-em-relion", description="cdae-em as a RELION External job (RELION 3.1, 4 and 5)",
                allow_abbrev=False, add_help=True)
    # what RELION passes
    p.add_argument("--o", required=True, help="job directory, e.g. External/job012/")
    p.add_argument("--in_parts", "--in-parts", dest="in_parts", help="input particles STAR file")
    p.add_argument("--in_3dref", "--in-3dref", dest="in_3dref", help="3D reference map: pre-train the cascade on it")
    for unused in ("in_movies", "in_mics", "in_coords", "in_mask"):
        p.add_argument(f"--{unused}", dest=unused, help=argparse.SUPPRESS)
    p.add_argument("--j", type=int, default=1, help="CPU threads (RELION's 'Number of threads')")
    # user parameters: nargs="?" so that a label with an empty value does not swallow the next option
    opt = dict(nargs="?", default=None, const=None)
    p.add_argument(*_names("K", "classes", "n_classes"), dest="K", type=_or_none(int), **opt, help="number of classes")
    p.add_argument(*_names("epochs"), dest="epochs", type=_or_none(int), **opt)
    p.add_argument(*_names("neighbours", "neighbors", "k"), dest="k", type=_or_none(int), **opt)
    p.add_argument(*_names("finetune", "fine_tune"), dest="finetune", type=_or_none(yes_no), **opt)
    p.add_argument(*_names("no_finetune"), dest="no_finetune", nargs="?", const="yes", default=None, type=str)
    p.add_argument(*_names("weights"), dest="weights", type=_or_none(str), **opt)
    p.add_argument(*_names("gpu"), dest="gpu", nargs="?", const="auto", default=None)
    p.add_argument(*_names("method"), dest="method", type=_or_none(str.lower), **opt)
    p.add_argument(*_names("iterations", "iter", "n_iter"), dest="n_iter", type=_or_none(int), **opt)
    p.add_argument(*_names("box"), dest="box", type=_or_none(int), **opt)
    p.add_argument(*_names("phase_flip"), dest="phase_flip", type=_or_none(yes_no), nargs="?", const=True, default=None)
    p.add_argument(*_names("average_phase_flipped"), dest="average_phase_flipped", type=_or_none(yes_no), nargs="?",
                   const=True, default=None)
    p.add_argument(*_names("psi_step"), dest="psi_step", type=_or_none(float), **opt)
    p.add_argument(*_names("split_merge"), dest="split_merge", type=_or_none(int), **opt)
    p.add_argument(*_names("max_shift"), dest="max_shift", type=_or_none(float), **opt)
    p.add_argument(*_names("batch_size"), dest="batch_size", type=_or_none(int), **opt)
    p.add_argument(*_names("finetune_subset"), dest="finetune_subset", type=_or_none(int), **opt)
    p.add_argument(*_names("mask_diameter"), dest="mask_diameter", type=_or_none(float), **opt)
    p.add_argument(*_names("lr"), dest="lr", type=_or_none(float), **opt)
    p.add_argument(*_names("seed"), dest="seed", type=_or_none(int), **opt)
    p.add_argument(*_names("pretrain_particles"), dest="pretrain_particles", type=_or_none(int), **opt)
    p.add_argument(*_names("pretrain_epochs"), dest="pretrain_epochs", type=_or_none(int), **opt)
    p.add_argument(*_names("nodes_flavour", "nodes_flavor"), dest="nodes_flavour", type=_or_none(str), **opt)
    p.add_argument("--log_level", "--log-level", dest="log_level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def gpu_id(value: str | None) -> str | None:
    """RELION-style GPU ids ("0", "0:1", "0,1", empty = any) -> CUDA device ids ("0", "0,1") or None
    (CPU). Several devices: the job runs as one process per device (torchrun)."""
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("cpu", "no", "none", "-1", "false"):
        return None
    if v in ("", "auto", "yes", "true"):
        import torch

        if torch.cuda.is_available():
            return "0"
        log.info("gpu: no CUDA device on this machine; running on the CPU")
        return None
    ids = [i for i in re.split(r"[:,\s]+", v) if i]
    if not ids or not all(i.isdigit() for i in ids):
        raise ArgumentError(f"--gpu {value!r}: expected device numbers such as 0 or 0,1 (or cpu)")
    return ",".join(dict.fromkeys(ids))
