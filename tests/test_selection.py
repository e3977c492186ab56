"""Automatic class selection: every class scored (rlnClassScore), the selected classes' particles
in particles_selected.star with every input column and block, `cdae-em select` to select again."""

import numpy as np
import pytest
import starfile
from conftest import run_cli

from cdae_em.job.result import CONTRACT
from cdae_em.job.selection import CROWDING_Z
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate


@pytest.fixture(scope="module")
def junk_job(tmp_path_factory):
    """`cdae-em classify` (K = 6) on 2 views x ~60 particles among as many junk picks (ice,
    carbon edges, aggregates, fragments), SNR 0.5, 48 px."""
    sim = tmp_path_factory.mktemp("junk")
    simulate(load_source(None, box=48), SimulationSettings(n_particles=240, n_views=2, in_plane=True, ctf=True,
                                                          snrs=[0.5], junk_fraction=0.5, seed=5), sim)
    out = sim / "job"
    r = run_cli("classify", "--i", sim / "particles.star", "--o", out, "--K", 6, "--iter", 4, "--j", 2)
    assert r.returncode == 0, r.stderr
    return sim, out


def _kinds(sim, particles):
    truth = starfile.read(sim / "truth.star")["particles"]
    kind = dict(zip(truth["rlnImageName"].str.replace("clean.mrcs", "particles.mrcs"), truth["cdaeTrueKind"]))
    return np.array([kind[n] for n in particles["rlnImageName"]])


def test_selection_keeps_the_particles_and_leaves_the_junk(junk_job):
    sim, out = junk_job
    classes = starfile.read(out / "class_averages.star")
    assert classes["rlnClassScore"].between(0, 1).all()
    everything = starfile.read(out / "particles.star")
    selected = starfile.read(out / "particles_selected.star")
    # every block and column of the input, the rows of the selected classes only
    assert set(selected) == set(everything) == {"optics", "particles"}
    assert list(selected["particles"].columns) == list(everything["particles"].columns)
    assert selected["optics"].equals(everything["optics"])
    chosen = set(classes.loc[classes["rlnClassScore"] >= 0.3, "rlnClassNumber"])
    assert set(selected["particles"]["rlnClassNumber"]) == chosen
    p = everything["particles"]
    # members of the chosen classes, less those fitting their class far worse than the others
    fit, labels = p["cdaeClassFit"].to_numpy(), p["rlnClassNumber"].to_numpy()
    poor = np.zeros(len(p), dtype=bool)
    for c in chosen:
        m = labels == c
        mad = 1.4826 * np.median(np.abs(fit[m] - np.median(fit[m])))
        poor[m] = fit[m] < np.median(fit[m]) - 2 * mad
    crowded = p["cdaeCrowding"].to_numpy() > CROWDING_Z  # another particle just outside: an aggregate
    expected = p["rlnImageName"][p["rlnClassNumber"].isin(chosen).to_numpy() & ~poor & ~crowded]
    assert list(selected["particles"]["rlnImageName"]) == list(expected)
    assert list(starfile.read(out / "class_averages_selected.star")["rlnClassNumber"]) == sorted(chosen)
    kinds = _kinds(sim, p)
    picked = p["rlnImageName"].isin(expected).to_numpy()
    good = kinds == "particle"
    junk_recall = float((~picked & ~good).sum() / (~good).sum())
    good_kept = float((picked & good).sum() / good.sum())
    # measured: junk recall 0.89, good particles kept 1.00 (all in one class of junk: 0, all kept: 0)
    assert junk_recall > 0.7 and good_kept > 0.9, (junk_recall, good_kept)
    assert -1 <= p["cdaeClassFit"].min() and p["cdaeClassFit"].max() <= 1
    crowding = p["cdaeCrowding"].to_numpy()
    assert np.median(crowding[kinds == "aggregate"]) > np.median(crowding[good]) + 2, \
        {k: np.median(crowding[kinds == k]) for k in set(kinds)}


def test_select_again_with_another_threshold(junk_job, tmp_path):
    sim, out = junk_job
    classes = starfile.read(out / "class_averages.star")
    r = run_cli("select", "--job", out, "--threshold", 0)
    assert r.returncode == 0, r.stderr
    every = set(starfile.read(out / "particles.star")["particles"]["rlnClassNumber"])
    assert set(starfile.read(out / "particles_selected.star")["particles"]["rlnClassNumber"]) == every
    best = float(classes["rlnClassScore"].max())
    r = run_cli("select", "--job", out, "--threshold", best)
    assert r.returncode == 0, r.stderr
    top = classes.loc[classes["rlnClassScore"] >= best, "rlnClassNumber"]
    assert set(starfile.read(out / "particles_selected.star")["particles"]["rlnClassNumber"]) == set(top)
    # a threshold no class reaches: nothing selected, no empty file for a pipeline to pick up
    r = run_cli("select", "--job", out, "--threshold", min(1.0, best + 0.001))
    assert r.returncode == 0 and "nothing selected" in r.stderr
    assert not (out / "particles_selected.star").exists()
    run_cli("select", "--job", out)  # back to the default for the other tests


@pytest.mark.parametrize("threshold", ["1.5", "-0.1"])
def test_threshold_outside_0_1_is_refused(junk_job, threshold):
    _, out = junk_job
    r = run_cli("select", "--job", out, "--threshold", threshold)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "threshold" in r.stderr


def test_select_needs_a_finished_classification(tmp_path):
    r = run_cli("select", "--job", tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "class_averages.star" in r.stderr and "not found" in r.stderr


def test_a_job_refuses_a_threshold_outside_0_1_before_it_starts(junk_job, tmp_path):
    sim, _ = junk_job
    r = run_cli("classify", "--i", sim / "particles.star", "--o", tmp_path / "o", "--K", 2, "--select-threshold", 2)
    assert r.returncode != 0 and "--select-threshold" in r.stderr and "Traceback" not in r.stderr
    assert not any((tmp_path / "o" / name).exists() for name in CONTRACT)
