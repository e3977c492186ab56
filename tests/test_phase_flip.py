"""CTF phase flipping by default: where every particle has CTF values and is not flipped already."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile

from cdae_em.core.prepare import resolve_phase_flip
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
from cdae_em.io.star import read_particles
from conftest import run_cli


@pytest.fixture(scope="module")
def ctf_stack(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctf")
    simulate(load_source(None, box=32), SimulationSettings(n_particles=24, n_views=2, in_plane=True, ctf=True,
                                                           snrs=[0.5], seed=3), out)
    return out


def _with(star_in, star_out, change) -> None:
    d = starfile.read(star_in, always_dict=True)
    change(d)
    starfile.write(d, star_out, overwrite=True)


def test_auto_flips_only_unflipped_particles_with_ctf(ctf_stack, tmp_path):
    star = ctf_stack / "particles.star"
    assert resolve_phase_flip(read_particles(star), None) is True
    assert resolve_phase_flip(read_particles(star), False) is False  # --no-phase-flip wins
    flipped = tmp_path / "flipped.star"
    _with(star, flipped, lambda d: d["optics"].__setitem__("rlnCtfDataArePhaseFlipped", 1))
    assert resolve_phase_flip(read_particles(flipped), None) is False
    no_ctf = tmp_path / "no_ctf.star"
    _with(star, no_ctf, lambda d: d.__setitem__("particles", d["particles"].drop(columns=["rlnDefocusU"])))
    assert resolve_phase_flip(read_particles(no_ctf), None) is False


def test_classify_phase_flips_by_default_and_averages_flipped_particles(ctf_stack, tmp_path):
    """`cdae-em classify` as a user runs it: the job records the resolved choice, and flipping
    changes the class averages (they average the phase-flipped particles)."""
    star = ctf_stack / "particles.star"
    common = ["--i", star, "--K", 2, "--iter", 1, "--j", 1]
    r = run_cli("classify", *common, "--o", tmp_path / "auto", cwd=ctf_stack)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["settings"]["denoise"]["phase_flip"] is True and summary["settings"]["average_phase_flipped"] is True
    assert [r["ctf"] for r in summary["classify"]] == [r["search"] == "fine" for r in summary["classify"]]  # CTF-aware
    r = run_cli("classify", *common, "--o", tmp_path / "off", "--no-phase-flip", cwd=ctf_stack)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert summary["settings"]["denoise"]["phase_flip"] is False and summary["settings"]["average_phase_flipped"] is False
    assert not any(r["ctf"] for r in summary["classify"])
    averages = {name: mrcfile.read(tmp_path / name / "class_averages.mrcs") for name in ("auto", "off")}
    assert all(np.isfinite(a).all() for a in averages.values())
    assert not np.allclose(averages["auto"], averages["off"])
