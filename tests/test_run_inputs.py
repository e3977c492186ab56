"""`cdae-em run` on a matrix of broken or odd inputs, in-process through the CLI entry point: each
ends in one ERROR line naming the file (and row) and the problem, no traceback and no output, or
in a clean run where the input is valid (RELION 3.0 table, int16 stack, duplicate rows, a blank
image)."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from test_check_command import CASES, _build, restore_logging  # noqa: F401

from cdae_em import cli
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
from cdae_em.io.star import read_particles, write_star

CONTRACT = ["particles.star", "denoised_particles.star", "class_averages.mrcs", "class_averages.star",
            "summary.json", "gallery.png"]
READ_PASS = {"nan_pixels", "inf_pixels"}  # found while reading pixels: the job had started


def run(star, out, *extra, weights=None, k=2) -> int:
    args = ["run", "--i", str(star), "--o", str(out), "--K", str(k), "--no-finetune", "--iter", "1", "--j", "1",
            *map(str, extra)]
    if weights is not None:
        args += ["--weights", str(weights)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
        raise SystemExit(0)
    return exit_info.value.code


def assert_refused(code: int, err: str, out: Path, names: str, problems: list[str], started: bool = False) -> None:
    assert code == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert names in errors[0], errors[0]
    for problem in problems:
        assert problem in errors[0], errors[0]
    if started:  # the output directory holds no outputs and nothing half-written
        assert not any((out / name).exists() for name in CONTRACT) and not (out / "denoised").exists()
        assert not list(out.rglob("*.partial")) and not (out / ".cdae_lock").exists()
    else:  # refused before anything was written
        assert not out.exists()


@pytest.mark.parametrize("case", CASES)
def test_broken_particles_are_refused_by_run(case, particle_project, small_weights, tmp_path, monkeypatch, capsys,
                                             restore_logging):  # noqa: F811
    star, names, problems = _build(case, particle_project)
    monkeypatch.chdir(particle_project.root)
    out = tmp_path / "out"
    code = run(star, out, weights=small_weights)
    assert_refused(code, capsys.readouterr().err, out, names, problems, started=case in READ_PASS)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate(load_source(None, box=32), SimulationSettings(n_particles=24, n_views=2, in_plane=True, ctf=True,
                                                           snrs=[0.5], seed=4), out)
    return out


def _copy(sim: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in sim.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest / "particles.star"


def _odd(case: str, sim: Path, tmp: Path, weights: Path) -> tuple[Path, list, str, list[str], bool]:
    """(star, extra arguments, file named, problems, started) for the run-specific cases."""
    star = _copy(sim, tmp / "in")
    table = read_particles(star)
    if case == "index_zero":
        names = table.particles["rlnImageName"].to_numpy().copy()
        names[5] = "000000@" + names[5].split("@")[1]
        write_star(table.with_columns(particles={"rlnImageName": names}), star)
        return star, [], "particles.star (row 6)", ["expected N@stack with N >= 1"], False
    if case == "random_bytes_star":
        star.write_bytes(np.random.default_rng(0).bytes(3000))
        return star, [], "particles.star", [], False
    if case == "complex_mrc":
        with mrcfile.new(tmp / "in" / "particles.mrcs", data=np.ones((24, 32, 32), np.complex64), overwrite=True):
            pass
        return star, [], "particles.mrcs", ["unsupported MRC mode 4"], False
    if case == "unwritable_output":
        (tmp / "a_file").write_text("x")
        return star, ["--o", tmp / "a_file" / "job"], "a_file", ["cannot create the output directory"], False
    if case == "k_too_large":
        return star, ["--K", 30], "particles.star", ["K=30 classes but only 24 particles"], False
    if case == "k_zero":
        return star, ["--K", 0], "input", ["K=0 must be at least 2"], False
    if case == "phase_flip_without_ctf":
        for label in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
            del table.particles[label]
        write_star(table, star)
        return star, ["--phase-flip"], "particles.star", ["--phase-flip needs CTF values; missing rlnDefocusU"], False
    if case == "missing_weights":
        return star, ["--weights", tmp / "nope.pt"], "nope.pt", ["--weights: file not found"], False
    if case == "pickle_weights":
        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {tmp / 'pwned'}",))
        torch.save({"format": "cdae-em-weights", "payload": Exploit()}, tmp / "evil.pt")
        return star, ["--weights", tmp / "evil.pt"], "evil.pt", [], True
    if case == "zero_pixel_size":
        table.blocks["optics"]["rlnImagePixelSize"] = 0.0
        write_star(table, star)
        return star, [], "particles.star", ["pixel size of optics group 1 is 0"], False
    raise AssertionError(case)


ODD = ["index_zero", "random_bytes_star", "complex_mrc", "unwritable_output", "k_too_large", "k_zero",
       "phase_flip_without_ctf", "missing_weights", "pickle_weights", "zero_pixel_size"]


@pytest.mark.parametrize("case", ODD)
def test_bad_job_inputs_are_refused(case, sim, small_weights, tmp_path, capsys, restore_logging):  # noqa: F811
    star, extra, names, problems, started = _odd(case, sim, tmp_path, small_weights)
    out = tmp_path / "out"
    args = list(extra)
    if "--o" in args:
        out = args.pop(args.index("--o") + 1)
        args.remove("--o")
    k = args.pop(args.index("--K") + 1) if "--K" in args else 2
    if "--K" in args:
        args.remove("--K")
    weights = None if "--weights" in args else small_weights
    code = run(star, out, *args, weights=weights, k=k)
    assert_refused(code, capsys.readouterr().err, Path(out), names, problems,
                   started=started or case == "unwritable_output")
    assert not (tmp_path / "pwned").exists()


VALID = ["relion30_table", "int16_stack", "duplicate_rows", "blank_image"]


@pytest.mark.parametrize("case", VALID)
def test_odd_but_valid_inputs_run_cleanly(case, sim, small_weights, tmp_path, capsys, restore_logging):  # noqa: F811
    star = _copy(sim, tmp_path / "in")
    table = read_particles(star)
    n = len(table)
    if case == "relion30_table":
        per = table.per_particle()
        flat = table.particles.drop(columns="rlnOpticsGroup").assign(
            rlnImagePixelSize=per["rlnImagePixelSize"], rlnVoltage=per["rlnVoltage"],
            rlnSphericalAberration=per["rlnSphericalAberration"], rlnAmplitudeContrast=per["rlnAmplitudeContrast"])
        from cdae_em.io.star import write_table

        write_table(flat, star)
    elif case == "int16_stack":
        data = mrcfile.read(tmp_path / "in" / "particles.mrcs")
        with mrcfile.new(tmp_path / "in" / "particles.mrcs", data=np.round(data * 1000).astype(np.int16),
                         overwrite=True) as m:
            m.set_image_stack()
            m.voxel_size = float(table.pixel_size())
    elif case == "duplicate_rows":
        names = table.particles["rlnImageName"].to_numpy().copy()
        names[1] = names[0]
        write_star(table.with_columns(particles={"rlnImageName": names}), star)
    elif case == "blank_image":
        with mrcfile.open(tmp_path / "in" / "particles.mrcs", mode="r+") as m:
            m.data[3] = 0.25
    out = tmp_path / "out"
    code = run(star, out, weights=small_weights)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err and " ERROR " not in err
    parts = read_particles(out / "particles.star")
    assert len(parts) == n and parts.flavour == read_particles(star).flavour
    assert parts.particles["rlnClassNumber"].between(1, 2).all()
    assert len(read_particles(out / "denoised_particles.star")) == n
    if case == "blank_image":
        assert "1 blank image(s)" in err and "row(s) 4" in err
