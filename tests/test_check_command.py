"""`cdae-em check` as users run it: a subprocess, one line per problem, inputs left untouched."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cdae_em import cli


def _names(n: int, stack: str = "Extract/a.mrcs") -> list[str]:
    return [f"{i + 1:06d}@{stack}" for i in range(n)]


def _non_finite_stack(p, value: float) -> None:
    images = np.stack([p.image(0, i) for i in range(4)])
    images[2, 3, 3] = value
    with warnings.catch_warnings():  # mrcfile warns about the values it is asked to write
        warnings.simplefilter("ignore")
        with mrcfile.new(p.root / "Extract/bad.mrcs", data=images) as mrc:
            mrc.set_image_stack()


def _build(name: str, p) -> tuple[Path, str, list[str]]:
    """Make one broken project; return the STAR to check, the file the error must name, and more."""
    p.add_stack("Extract/a.mrcs", 0, 20)
    if name == "missing_star":
        return p.root / "nope.star", "nope.star", ["file not found"]
    if name == "not_star":
        star = p.root / "notes.star"
        star.write_text("These are not particles.\n")
        return star, "notes.star", ["not a STAR file"]
    if name == "no_particle_table":
        star = p.write_star("p.star", [])
        star.write_text(star.read_text().split("# version 30001\n\ndata_particles")[0])
        return star, "p.star", ["no particle table: no block has an rlnImageName column"]
    if name == "missing_image_name":
        star = p.root / "p.star"
        star.write_text("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n10.0 20.0\n")
        return star, "p.star", ["no particle table"]
    if name == "empty_table":
        return p.write_star("p.star", []), "p.star", ["empty particle table"]
    if name == "missing_stack":
        star = p.write_star("p.star", _names(3) + ["000001@Extract/gone.mrcs"])
        return star, "p.star (row 4)", ["Extract/gone.mrcs not found"]
    if name == "index_beyond_stack":
        star = p.write_star("p.star", _names(4) + ["000021@Extract/a.mrcs"])
        return star, "p.star (row 5)", ["image 21 of", "a.mrcs requested but the stack holds 20"]
    if name == "mixed_box":
        p.add_stack("Extract/b.mrcs", 1, 2, box=24)
        star = p.write_star("p.star", _names(2) + _names(2, "Extract/b.mrcs"))
        return star, "p.star", ["mixed box sizes", "a.mrcs is 16x16 but", "b.mrcs is 24x24"]
    if name == "non_square":
        p.add_stack("Extract/r.mrcs", 1, 2, box=(16, 12))
        return p.write_star("p.star", _names(2, "Extract/r.mrcs")), "r.mrcs", ["not square"]
    if name in ("nan_pixels", "inf_pixels"):
        _non_finite_stack(p, np.nan if name == "nan_pixels" else np.inf)
        star = p.write_star("p.star", _names(5) + _names(4, "Extract/bad.mrcs"))
        return star, "bad.mrcs (row 8)", ["image 3 has NaN or infinite"]
    if name == "corrupt_header":
        (p.root / "Extract/c.mrcs").write_bytes(b"\x07" * 4096)
        return p.write_star("p.star", _names(2, "Extract/c.mrcs")), "c.mrcs", ["not a readable MRC file"]
    if name == "truncated_stack":
        data = (p.root / "Extract/a.mrcs").read_bytes()
        (p.root / "Extract/t.mrcs").write_bytes(data[: len(data) // 2])
        return p.write_star("p.star", _names(2, "Extract/t.mrcs")), "t.mrcs", ["not a readable MRC file"]
    if name == "unknown_optics_group":
        groups = [1, 2] * 8 + [3, 1, 2, 1]
        return p.write_star("p.star", _names(20), groups=groups), "p.star (row 17)", ["unknown optics group 3"]
    if name == "no_optics_group_column":
        star = p.root / "p.star"
        star.write_text(
            "\n# version 30001\n\ndata_optics\n\nloop_ \n_rlnOpticsGroup #1 \n_rlnImagePixelSize #2 \n"
            "           1     1.770000 \n           2     1.770000 \n \n\n# version 30001\n\n"
            "data_particles\n\nloop_ \n_rlnImageName #1 \n000001@Extract/a.mrcs \n \n"
        )
        return star, "p.star", ["no rlnOpticsGroup column but data_optics has 2 groups"]
    raise AssertionError(name)


CASES = [
    "missing_star", "not_star", "no_particle_table", "missing_image_name", "empty_table",
    "missing_stack", "index_beyond_stack", "mixed_box", "non_square", "nan_pixels", "inf_pixels",
    "corrupt_header", "truncated_stack", "unknown_optics_group", "no_optics_group_column",
]
# Every case runs through the CLI entry point in-process and, as a user would run it, as a real
# subprocess (`cdae-em check` does not import torch, so a start costs ~0.3 s).
SUBPROCESS_CASES = CASES


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(f.relative_to(root)): (f.read_bytes(), f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()}


def _check(star: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cdae_em", "check", "--i", str(star), *extra],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _assert_one_line_error(code: int, err: str, names_file: str, problems: list[str]) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "ERROR" in lines[0]
    assert names_file in lines[0], lines[0]
    for problem in problems:
        assert problem in lines[0], lines[0]


@pytest.fixture
def restore_logging():
    """cli.main reconfigures the root logger; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_naming_the_file(case, particle_project, monkeypatch, capsys, restore_logging):
    star, names_file, problems = _build(case, particle_project)
    before = _snapshot(particle_project.root)
    monkeypatch.chdir(particle_project.root)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "--i", str(star)])
    _assert_one_line_error(exit_info.value.code, capsys.readouterr().err, names_file, problems)
    assert _snapshot(particle_project.root) == before  # nothing changed, nothing written


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory, make_particle_project):
    """`cdae-em check` as a subprocess on several broken projects at once."""
    runs = {}
    for name in SUBPROCESS_CASES:
        project = make_particle_project(tmp_path_factory.mktemp(name) / "project")
        star, names_file, problems = _build(name, project)
        runs[name] = (_check(star, project.root), project.root, _snapshot(project.root), names_file, problems)
    results = {}
    for name, (proc, root, before, names_file, problems) in runs.items():
        _, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, err, root, before, names_file, problems)
    return results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_subprocess(subprocess_runs, case):
    code, err, root, before, names_file, problems = subprocess_runs[case]
    _assert_one_line_error(code, err, names_file, problems)
    assert _snapshot(root) == before


def test_good_project_summary(particle_project, tmp_path, capsys, restore_logging):
    star, expected = particle_project.standard()
    proc = _check(star, particle_project.root)  # stacks relative to the working directory
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    cli.main(["check", "--i", str(star), "--project-dir", str(particle_project.root), "--batch-size", "5"])
    for log in (err, capsys.readouterr().err):
        assert "Traceback" not in log
        assert f"all {len(expected)} images read, no problems found" in log
        assert "flavour       RELION 3.1" in log and "optics groups 2" in log
        assert "stacks        5" in log and "box           16 x 16" in log
        assert "pixel size    1.77 A" in log
        assert f"min {expected.min():.4g}, max {expected.max():.4g}" in log
