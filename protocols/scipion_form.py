"""The Scipion form's parameters and the settings tree (``cdae_em.settings``): each form parameter
that sets a setting (its ``scipion`` name) takes its default and help from it, and its value
becomes ``cdae-em run`` arguments. Imports nothing of Scipion."""

from __future__ import annotations

import os

from cdae_em.settings import RUN, Setting, settings_tree

PHASE_FLIP = ["auto", "yes", "no"]  # the form's choices for a Yes / No / auto setting
UNSET = {"maxShift": -1, "workingBox": 0}  # what the form holds where the setting is unset (None)


def form_default(s: Setting):
    """A setting's default (or suggested value) as the form holds it: an index for choices, a
    sentinel for "unset"."""
    value = s.option.suggested if s.option.required else s.default
    if s.tristate:
        return PHASE_FLIP.index("auto" if value is None else "yes" if value else "no")
    if s.option.choices:
        return s.option.choices.index(value)
    if value is None:
        return UNSET.get(s.option.scipion)
    return value


def tree(name: str) -> dict:
    """``default`` and ``help`` of the form parameter ``name``, from the setting it sets."""
    s = next(s for s in settings_tree(RUN) if s.option.scipion == name)
    unset = f" {UNSET[name]}: {s.option.unset}." if name in UNSET else ""
    return dict(default=form_default(s), help=s.option.help[0].upper() + s.option.help[1:] + "." + unset)


def form_args(s: Setting, value) -> list:
    """The command-line arguments that set setting ``s`` to the form's ``value``."""
    flag, negated = s.option.name, f"--no-{s.option.name[2:]}"
    if s.tristate:
        choice = PHASE_FLIP[value]
        return [] if choice == "auto" else [flag if choice == "yes" else negated]
    if s.type is bool:
        return [flag if value else negated]
    if s.option.choices:
        return [flag, s.option.choices[value]]
    if value is None or value == "" or value == UNSET.get(s.option.scipion):
        return []
    if s.type is str:
        value = os.path.abspath(value)  # a file: the job runs in another directory
    return [flag, value]
