"""The settings tree is the one place options live: the command line, the RELION External job and
its template are made from it (the Scipion form is checked against it in test_scipion.py)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from cdae_em.cli import build_parser
from cdae_em.commands.options import job_settings
from cdae_em.protocols import relion_args
from cdae_em.protocols import relion_external as rx
from cdae_em.settings import ClassifySettings, JobSettings, build, get, setting, settings_tree

REQUIRED = {"run": ["--i", "p.star", "--o", "o/", "--K", "3"], "denoise": ["--i", "p.star", "--o", "o/"],
            "classify": ["--i", "p.star", "--o", "o/", "--K", "3"]}
GIVEN = {"particles": "p.star", "out_dir": "o/"}


def _parse(kind: str, *extra: str) -> JobSettings:
    return job_settings(build_parser(only=kind).parse_args([kind, *REQUIRED[kind], *extra]), kind)


def _help(kind: str) -> str:
    sub = next(a for a in build_parser(only=kind)._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices[kind].format_help().split())
    return text[text.index("options:"):]  # the options, not the usage line


@pytest.mark.parametrize("kind", ["run", "denoise", "classify"])
def test_each_command_takes_its_options_with_the_tree_defaults(kind):
    given = {**GIVEN, **({"classify.n_classes": 3} if kind != "denoise" else {})}
    assert _parse(kind) == build(given)
    text = _help(kind)
    for s in settings_tree(kind):
        assert s.option.name in text, s.path
        if not s.option.required:
            after = text[text.index(s.option.name + " "):]
            shown = (s.option.unset if s.default is None else ("yes" if s.default else "no") if s.type is bool
                     else str(s.default))
            assert f"(default: {shown})" in after[:600], (s.path, after[:600])
    others = {s.option.name for s in settings_tree()} - {s.option.name for s in settings_tree(kind)}
    for name in others:  # e.g. `classify` has no --epochs: argparse refuses it
        assert f"{name} " not in text, name


def test_one_seed_and_one_batch_size_for_every_stage():
    s = _parse("run", "--seed", "7", "--batch-size", "32")
    assert (s.seed, s.denoise.seed, s.denoise.train.seed, s.classify.seed) == (7, 7, 7, 7)
    assert (s.denoise.batch_size, s.classify.batch_size) == (32, 32)


def test_switches_and_auto():
    assert _parse("run").denoise.phase_flip is None  # auto
    assert _parse("run", "--phase-flip").denoise.phase_flip is True
    assert _parse("classify", "--no-phase-flip").denoise.phase_flip is False
    assert _parse("run", "--no-check").denoise.check is False
    assert _parse("denoise", "--finetune", "--epochs", "0").denoise.finetune is True
    with pytest.raises(SystemExit):
        _parse("classify", "--epochs", "2")  # not a classify option


@pytest.mark.parametrize("flag, value, problem", [("--psi-step", "0", "must be positive, got 0.0"),
                                                  ("--iter", "-1", "must be 0 or more, got -1"),
                                                  ("--box", "4", "must be at least 8, got 4"),
                                                  ("--select-threshold", "1.5", "must be at most 1, got 1.5"),
                                                  ("--method", "pca", "invalid choice: 'pca'")])
def test_bounds_and_choices_are_usage_errors(flag, value, problem, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse("run", flag, value)
    assert exit_.value.code == 2 and problem in capsys.readouterr().err


def test_every_tree_option_is_a_field_of_the_tree():
    paths = [s.path for s in settings_tree()]
    assert len(paths) == len(set(paths))
    flags = [f for s in settings_tree() for f in s.option.flags]
    assert len(flags) == len(set(flags))
    for s in settings_tree():
        get(JobSettings(), s.path)
        for other in s.option.also:
            assert type(get(JobSettings(), other)) is type(s.default), other


def test_changing_a_default_in_the_tree_changes_every_front_end(monkeypatch):
    """The default of classify.n_iter moved from 10 to 7 in the tree alone: the CLI, its help, the
    RELION parameters and the RELION template all follow."""
    init = ClassifySettings.__init__
    names = list(inspect.signature(init).parameters)[1:]
    defaults = list(init.__defaults__)
    defaults[names.index("n_iter") - (len(names) - len(defaults))] = 7
    monkeypatch.setattr(init, "__defaults__", tuple(defaults))
    assert setting("classify.n_iter").default == 7
    assert _parse("run").classify.n_iter == 7
    text = _help("run")
    assert "(default: 7)" in text[text.index("--iter "):][:200]
    args, _ = rx.build_parser().parse_known_args(["--o", "o/", "--in_parts", "p.star", "--K", "3"])
    assert rx.job_settings(args).classify.n_iter == 7
    params = dict((label, value) for label, value, _ in relion_args.template_params())
    assert params["iterations"] == "7"
    assert "iterations" in relion_args.template_text() and " 7\n" in relion_args.template_text()


def test_the_core_takes_the_settings_it_is_given():
    """What the job does is what the tree says: nothing in the core re-declares a default."""
    s = build({**GIVEN, "classify.n_classes": 4, "classify.split_merge": 0})
    assert dataclasses.replace(s.classify, n_classes=4) == s.classify and s.classify.split_merge == 0
