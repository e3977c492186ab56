"""The options of ``cdae-em run``, ``denoise`` and ``classify``, generated from the settings tree
(``cdae_em.settings``): the parser of each command and the ``JobSettings`` its arguments give."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from cdae_em.commands.common import bounded
from cdae_em.settings import JobSettings, Setting, build, settings_tree

def value_parser(s: Setting) -> Callable[[str], Any]:
    if s.type in (int, float):
        return bounded(s.type, s.option.minimum, s.option.above, s.option.maximum)
    return s.type


def default_text(s: Setting) -> str:
    """How the help shows a setting's default."""
    if s.default is None:
        return s.option.unset
    if s.type is bool:
        return "yes" if s.default else "no"
    return str(s.default)


def _help(s: Setting) -> str:
    text = s.option.help.replace("%", "%%")
    if s.option.required:
        return text
    return f"{text} (default: {default_text(s).replace('%', '%%')})"


def dest(s: Setting) -> str:
    return s.path.replace(".", "__")


def add_job_options(parser: argparse.ArgumentParser, kind: str) -> None:
    """Every option of job kind ``kind`` (run, denoise, classify), grouped as the tree says."""
    groups: dict[str, Any] = {}
    for s in settings_tree(kind):
        o = s.option
        group = parser if o.group == "job" else groups.setdefault(
            o.group, parser.add_argument_group(o.group))
        if s.type is bool:
            # --x / --no-x; a tri-state (yes / no / auto) leaves None when neither is given
            group.add_argument(*o.flags, dest=dest(s), action="store_true", default=s.default, help=_help(s))
            group.add_argument(*(f"--no-{f[2:]}" for f in o.flags), dest=dest(s), action="store_false",
                               help=f"the opposite of {o.name}")
            continue
        kwargs: dict[str, Any] = dict(dest=dest(s), help=_help(s), metavar=o.metavar or ("N" if s.type is int else "X"))
        if o.choices:
            kwargs.update(choices=list(o.choices), metavar=None)
        if o.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = s.default
        group.add_argument(*o.flags, type=value_parser(s), **kwargs)


def job_settings(args: argparse.Namespace, kind: str, **job: Any) -> JobSettings:
    """The ``JobSettings`` that parsed arguments of job kind ``kind`` give (tree defaults for the
    rest); ``job`` sets fields that are not options (``stages``)."""
    values = {s.path: getattr(args, dest(s)) for s in settings_tree(kind) if hasattr(args, dest(s))}
    return build(values, **job)
