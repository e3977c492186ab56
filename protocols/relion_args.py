"""The arguments of ``cdae-em-relion`` as RELION passes them: the parser (RELION's I/O options,
the user's ``--<label> <value>`` parameters, ``_``/``-`` spelt either way, an empty value meaning
"not given") and the conversion of RELION-style values (Yes/No, GPU ids)."""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any, Callable

from cdae_em.commands.common import bounded
from cdae_em.settings import RUN, Setting, settings_tree

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


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"expected {' or '.join(choices)}, got {text!r}")
        return value
    parse.__name__ = "choice"
    return parse


def yes_no_auto(text: str) -> bool | None:
    """Yes / No / auto (None)."""
    return None if str(text).strip().lower() == "auto" else yes_no(text)


def _converter(s: Setting) -> Callable[[str], Any]:
    """RELION's text -> the setting's value, checked as the command line checks it."""
    if s.option.choices:
        return _choice(s.option.choices)
    if s.tristate:
        return yes_no_auto
    if s.type is bool:
        return yes_no
    if s.type in (int, float):
        return bounded(s.type, s.option.minimum, s.option.above, s.option.maximum)
    return s.type


def relion_settings() -> list[Setting]:
    """The settings of a ``cdae-em run`` that a RELION parameter may set (``--<label> <value>``)."""
    return [s for s in settings_tree(RUN) if s.option.relion_labels]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every argument RELION may pass (unknown ones are left to the caller): RELION's
    own, and one ``--<label>`` for each label of each setting in ``relion_settings()``."""
    p = _Parser(prog="cdae-em-relion", description="cdae-em as a RELION External job (RELION 3.1, 4 and 5)",
                allow_abbrev=False, add_help=True)
    # what RELION passes
    p.add_argument("--o", required=True, help="job directory, e.g. External/job012/")
    p.add_argument("--in_parts", "--in-parts", dest="in_parts", help="input particles STAR file")
    p.add_argument("--in_3dref", "--in-3dref", dest="in_3dref", help="3D reference map: pre-train the cascade on it")
    for unused in ("in_movies", "in_mics", "in_coords", "in_mask"):
        p.add_argument(f"--{unused}", dest=unused, help=argparse.SUPPRESS)
    p.add_argument("--j", type=int, default=1, help="CPU threads (RELION's 'Number of threads')")
    # the user's parameters, from the settings tree. nargs="?": a label with an empty value does not
    # swallow the next option, and counts as not given
    for s in relion_settings():
        p.add_argument(*_names(*s.option.relion_labels), dest=s.path.replace(".", "__"), nargs="?", default=None,
                       const=None, type=_or_none(_converter(s)), help=s.option.help.replace("%", "%%"))
    # RELION-only parameters
    p.add_argument(*_names("no_finetune"), dest="no_finetune", nargs="?", const="yes", default=None, type=str,
                   help="Yes: the opposite of finetune")
    p.add_argument(*_names("gpu"), dest="gpu", nargs="?", const="auto", default=None,
                   help=GPU_HELP)
    p.add_argument(*_names("nodes_flavour", "nodes_flavor"), dest="nodes_flavour", type=_or_none(str), nargs="?",
                   default=None, const=None, help=FLAVOUR_HELP)
    p.add_argument("--log_level", "--log-level", dest="log_level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """{path: value} of the settings the RELION arguments gave (the tree's defaults for the rest)."""
    values = {}
    for s in relion_settings():
        value = getattr(args, s.path.replace(".", "__"))
        if value is not None:
            values[s.path] = value
    if args.no_finetune is not None:
        values["denoise.finetune"] = not yes_no(args.no_finetune)
    return values


GPU_HELP = "CUDA devices, e.g. 0 or 0,1,2,3 (empty = the first GPU if there is one; cpu = CPU)"
FLAVOUR_HELP = "3.1, 4 or 5: output-node types of that RELION (empty = detected)"
# the parameters of the External job template (RELION's GUI shows ten): setting paths, then the
# RELION-only ones
TEMPLATE_PARAMS = ("classify.n_classes", "denoise.finetune", "denoise.train.epochs", "gpu", "classify.method",
                   "classify.n_iter", "denoise.phase_flip", "denoise.box", "denoise.weights", "nodes_flavour")
TEMPLATE_THREADS = 4


def relion_value(s: Setting) -> str:
    """A setting's default (or suggested value) as the template's text."""
    value = s.option.suggested if s.option.required else s.default
    if s.tristate and value is None:
        return "auto"
    if value is None:
        return ""
    if s.type is bool:
        return "Yes" if value else "No"
    return str(value)


def template_params() -> list[tuple[str, str, str]]:
    """(label, value, help) of each parameter of the External job template."""
    tree = {s.path: s for s in relion_settings()}
    params = []
    for name in TEMPLATE_PARAMS:
        if name == "gpu":
            params.append(("gpu", "", GPU_HELP))
        elif name == "nodes_flavour":
            params.append(("nodes_flavour", "", FLAVOUR_HELP))
        else:
            s = tree[name]
            unset = f" (empty: {s.option.unset})" if s.option.unset and not s.tristate else ""
            auto = " (auto: " + s.option.unset.removeprefix("auto: ") + ")" if s.tristate else ""
            params.append((s.option.relion_labels[0], relion_value(s), s.option.help + unset + auto))
    return params


def _star_value(text: str) -> str:
    return f'"{text}"' if text == "" or any(c.isspace() for c in text) else text


def template_text() -> str:
    """The External job.star for RELION's Jobs / Load job settings, made from the settings tree."""
    head = [
        "# cdae-em as a RELION External job. Put it where the RELION GUI loads it from, in the project directory:",
        "#   RELION 4/5:  cdae-em-relion --write_template CdaeEm     then Jobs / Load job settings: CdaeEm/job.star",
        "#   RELION 3.1:  cdae-em-relion --write_template .gui_externaljob.star",
        "#                then choose \"External\" in the job list and Jobs / Load job settings",
        "# then set \"Input particles\" on the Input tab and check the Params tab. RELION 3.1 reads _rlnJobType",
        "# (and warns about the labels it does not know), 4 and 5 read _rlnJobTypeLabel.",
        "# Made from cdae-em's settings (cdae_em/settings.py); every option of `cdae-em run` can be a",
        "# parameter (label = the option without dashes, e.g. split_merge). Parameters here:",
    ]
    rows = {"fn_exe": "cdae-em-relion", "in_3dref": "", "in_coords": "", "in_mask": "", "in_mic": "", "in_mov": "",
            "in_part": "", "nr_threads": str(TEMPLATE_THREADS), "other_args": ""}
    for i, (label, value, text) in enumerate(template_params(), start=1):
        head.append(f"#   {label}: {text}")
        rows[f"param{i}_label"] = label
        rows[f"param{i}_value"] = value
    width = max(len(k) for k in rows)
    body = [f"{k:<{width}} {_star_value(v)}" for k, v in sorted(rows.items())]
    return "\n".join(head + [
        "", "# version 30001", "", "data_job", "",
        "_rlnJobTypeLabel             relion.external", "_rlnJobType                  99",
        "_rlnJobIsContinue            0", "_rlnJobIsTomo                0", "", "",
        "# version 30001", "", "data_joboptions_values", "", "loop_",
        "_rlnJobOptionVariable #1", "_rlnJobOptionValue #2", *body, "", ""])


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
