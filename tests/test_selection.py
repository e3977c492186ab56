"""Automatic class selection: every class scored (rlnClassScore), the selected classes' particles
in particles_selected.star with every input column and block, `cdae-em select` to select again."""

import numpy as np
import pytest
import starfile
from conftest import run_cli

from cdae_em.job.result import CONTRACT
from cdae_em.job.selection import CROWDING_Z, THRESHOLD
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
    chosen = set(classes.loc[classes["rlnClassScore"] >= THRESHOLD.default, "rlnClassNumber"])
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


def test_compactness_counts_the_signal_not_the_noise_left_in_small_classes():
    """A centred particle's average with as much noise again as signal: the noise, estimated
    from the two half-set averages, is taken out of the power, so the particle's compactness is
    ~1 as for a clean average; without it the noise spread over the box pulls it far down."""
    from cdae_em.job.selection import average_noise, class_scores

    box, n = 48, 10
    c = np.arange(box) - box // 2
    r = np.hypot(c[:, None], c[None, :])
    particle = np.exp(-(r / 6.0) ** 2)
    rng = np.random.default_rng(0)
    sigma = 1.0  # per image
    half_a = particle + rng.normal(0, sigma / np.sqrt(n / 2), (box, box))
    half_b = particle + rng.normal(0, sigma / np.sqrt(n / 2), (box, box))
    average = (half_a + half_b) / 2
    noise = average_noise(half_a[None], half_b[None], np.array([n // 2]), np.array([n // 2]))
    assert abs(float(noise.std()) - sigma / np.sqrt(n)) < 0.1 * sigma / np.sqrt(n)
    ssnr = np.ones((1, box // 2))
    _, noisy = class_scores(average[None], ssnr, np.array([n]), diameter_px=24)
    _, cleaned = class_scores(average[None], ssnr, np.array([n]), diameter_px=24, noise=noise)
    _, clean = class_scores(particle[None], ssnr, np.array([n]), diameter_px=24)
    assert clean["compactness"][0] > 0.99
    assert cleaned["compactness"][0] > 0.9 > 0.7 > noisy["compactness"][0]  # the test can fail: noise matters


def test_one_small_noisy_class_does_not_set_the_consistency_of_all():
    """Full consistency is a typical good class's member SSNR (the particle-weighted 85% quantile),
    not the best class's: one small class with an inflated estimate leaves the others' scores."""
    from cdae_em.job.selection import class_scores

    box = 32
    averages = np.zeros((5, box, box))
    averages[:, box // 2, box // 2] = 1.0
    counts = np.array([300, 300, 300, 100, 20])
    member = np.array([0.2, 0.2, 0.2, 0.05, 2.0])  # class 5: 20 particles, a noisy high estimate
    ssnr = np.repeat((member * counts)[:, None], box // 2, axis=1)
    score, parts = class_scores(averages, ssnr, counts)
    assert np.allclose(parts["consistency"][:3], 1.0) and abs(parts["consistency"][3] - 0.25) < 1e-3
    assert parts["consistency"][4] == 1.0  # clipped


def test_classes_from_another_program_are_scored_and_selected_as_the_jobs_own(junk_job, tmp_path):
    """`--classes-from` takes each particle's class, psi and origin from another classification's
    STAR file (rows matched by rlnImageName, its class numbers kept) and scores and selects those
    classes as the job does its own: the job's own particles.star, shuffled and renumbered, gives
    back its class averages and scores."""
    import mrcfile

    sim, out = junk_job
    own = starfile.read(out / "particles.star", always_dict=True)
    k = 6
    given = {**own, "particles": own["particles"].sample(frac=1.0, random_state=0).reset_index(drop=True)}
    given["particles"]["rlnClassNumber"] = k + 1 - given["particles"]["rlnClassNumber"]  # renumbered
    starfile.write(given, tmp_path / "given.star")
    r = run_cli("classify", "--i", sim / "particles.star", "--o", tmp_path / "o", "--K", k, "--j", 2,
                "--classes-from", tmp_path / "given.star")
    assert r.returncode == 0, r.stderr
    mine, theirs = own["particles"], starfile.read(tmp_path / "o" / "particles.star", always_dict=True)["particles"]
    assert (theirs["rlnImageName"] == mine["rlnImageName"]).all()  # the input's order
    assert (theirs["rlnClassNumber"] == k + 1 - mine["rlnClassNumber"]).all()  # the given numbers
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(theirs[column], mine[column], atol=1e-3)
    averages = mrcfile.read(out / "class_averages.mrcs")
    again = mrcfile.read(tmp_path / "o" / "class_averages.mrcs")[::-1]
    assert np.abs(again - averages).max() < 1e-3 * np.abs(averages).max()
    scores = starfile.read(out / "class_averages.star")["rlnClassScore"].to_numpy()
    rescored = starfile.read(tmp_path / "o" / "class_averages.star")["rlnClassScore"].to_numpy()[::-1]
    # the random half-set split follows the class numbering, so the scores differ by its noise
    assert np.abs(rescored - scores).max() < 0.2 and ((rescored >= 0.5) == (scores >= 0.5)).all()
    assert np.corrcoef(theirs["cdaeClassFit"], mine["cdaeClassFit"])[0, 1] > 0.8  # the fit, measured again
    assert "cdaeCrowding" in theirs and (tmp_path / "o" / "particles_selected.star").exists()


@pytest.mark.parametrize("fault", ["a particle missing", "a class above K"])
def test_classes_from_a_file_that_does_not_match_is_refused_before_any_work(junk_job, tmp_path, fault):
    sim, out = junk_job
    own = starfile.read(out / "particles.star", always_dict=True)
    p = own["particles"]
    p = p.iloc[1:] if fault == "a particle missing" else p.assign(rlnClassNumber=p["rlnClassNumber"] + 6)
    starfile.write({**own, "particles": p}, tmp_path / "given.star")
    r = run_cli("classify", "--i", sim / "particles.star", "--o", tmp_path / "o", "--K", 6,
                "--classes-from", tmp_path / "given.star")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "given.star" in r.stderr
    assert ("no row for 1 of" if fault == "a particle missing" else "not within 1..K=6") in r.stderr
    assert not (tmp_path / "o").exists()
