"""`cdae-em run` / `classify` / `evaluate`: the job's output contract, alignment conventions, resume,
bad input. Small data (32 px); untrained small weights where only the plumbing is tested."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from conftest import run_cli
from killpoint import wait_stopped

from cdae_em.core.align import apply_alignment
from cdae_em.classify.stage import classify
from cdae_em.settings import ClassifySettings
from cdae_em.core.metrics import clustering_scores
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

CONTRACT = ["particles.star", "denoised_particles.star", "class_averages.mrcs", "class_averages.star",
            "summary.json", "gallery.png"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """4 views, random psi and shifts, CTF, SNR 0.5: 120 particles of 32 px."""
    out = tmp_path_factory.mktemp("sim")
    settings = SimulationSettings(n_particles=120, n_views=4, in_plane=True, max_shift=2.0, ctf=True,
                                  snrs=[0.5], seed=21)
    simulate(load_source(None, box=32), settings, out)
    return out


def test_classification_recovers_views_up_to_rotation_and_shift(sim):
    """The classifier alone on the noisy particles (SNR 0.5, random psi and shifts)."""
    images = mrcfile.read(sim / "particles.mrcs")
    truth = starfile.read(sim / "truth.star")["particles"]["rlnClassNumber"].to_numpy()
    result = classify(images, ClassifySettings(n_classes=4, n_iter=4, seed=0), torch.device("cpu"))
    scores = clustering_scores(truth, result.labels)
    # measured: Hungarian F1 1.00 at this SNR
    assert scores["hungarian_f1"] > 0.9, scores
    assert list(np.bincount(result.labels)) == sorted(np.bincount(result.labels), reverse=True)


def test_written_alignments_bring_particles_onto_their_class_average(sim):
    """Applying each particle's psi/origin (RELION convention) to its *clean* image reproduces the
    class's orientation: aligned clean images of one class agree with each other and with the
    class average."""
    images = mrcfile.read(sim / "particles.mrcs")
    clean = torch.as_tensor(mrcfile.read(sim / "clean.mrcs"))
    result = classify(images, ClassifySettings(n_classes=4, n_iter=4, seed=0), torch.device("cpu"))
    aligned = apply_alignment(clean, torch.as_tensor(result.psi), torch.as_tensor(result.origin)).numpy()
    for c in range(4):
        members = aligned[result.labels == c]
        mean = members.mean(axis=0)
        corr = [np.corrcoef(m.ravel(), mean.ravel())[0, 1] for m in members]
        assert np.median(corr) > 0.9, (c, np.median(corr))
        ref = result.references[c]
        assert np.corrcoef(mean.ravel(), ref.ravel())[0, 1] > 0.8


def test_run_writes_the_output_contract(sim, small_weights, tmp_path):
    out = tmp_path / "job"
    before = (sim / "particles.star").read_bytes()
    r = run_cli("run", "--i", sim / "particles.star", "--o", out, "--K", 4, "--weights", small_weights,
                "--no-finetune", "--iter", 2, "--j", 2)
    assert r.returncode == 0, r.stderr
    assert (sim / "particles.star").read_bytes() == before
    for name in CONTRACT:
        assert (out / name).exists(), name
    star_in = starfile.read(sim / "particles.star")
    parts = starfile.read(out / "particles.star")
    assert set(parts) == {"optics", "particles"}
    p = parts["particles"]
    assert set(star_in["particles"].columns) <= set(p.columns)
    assert (p["rlnImageName"] == star_in["particles"]["rlnImageName"]).all()  # the original images
    assert p["rlnClassNumber"].between(1, 4).all()
    assert {"rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"} <= set(p.columns)
    classes = starfile.read(out / "class_averages.star")
    assert list(classes["rlnClassNumber"]) == [1, 2, 3, 4]
    assert np.isclose(classes["rlnClassDistribution"].sum(), 1.0)
    counts = np.bincount(p["rlnClassNumber"], minlength=5)[1:]
    assert list(classes["cdaeParticleCount"]) == list(counts)
    assert list(counts) == sorted(counts, reverse=True)
    with mrcfile.open(out / "class_averages.mrcs") as m:
        assert m.data.shape == (4, 32, 32) and m.voxel_size.x > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_sizes"] == list(counts) and "timings" in summary
    for stage in ("stage 1/3", "stage 2/3", "stage 3/3"):
        assert stage in r.stderr
    # evaluate against the truth
    ev = run_cli("evaluate", "--job", out, "--truth", sim / "truth.star")
    assert ev.returncode == 0, ev.stderr
    result = json.loads((out / "evaluation.json").read_text())
    truth = starfile.read(sim / "truth.star")["particles"]["rlnClassNumber"].to_numpy()
    assert result["clustering"] == pytest.approx(clustering_scores(truth, p["rlnClassNumber"].to_numpy()))
    # measured 0.63 with these untrained weights and 2 rounds; random labels score about 0.3
    assert result["clustering"]["hungarian_f1"] > 0.5
    assert result["denoising"]["images"] == 120 and np.isfinite(result["denoising"]["psnr_denoised_db"])
    assert "| hungarian_f1 |" in ev.stdout


def test_classify_command_on_a_denoised_star(sim, tmp_path):
    out = tmp_path / "cls"
    r = run_cli("classify", "--i", sim / "particles.star", "--o", out, "--K", 4, "--iter", 3)
    assert r.returncode == 0, r.stderr
    p = starfile.read(out / "particles.star")["particles"]
    truth = starfile.read(sim / "truth.star")["particles"]["rlnClassNumber"].to_numpy()
    assert clustering_scores(truth, p["rlnClassNumber"].to_numpy())["hungarian_f1"] > 0.9
    assert (out / "class_averages.mrcs").exists() and (out / "class_averages.star").exists()


def test_refuses_another_jobs_outputs_unless_overwrite(sim, small_weights, tmp_path):
    out = tmp_path / "job"
    args = ["run", "--i", sim / "particles.star", "--o", out, "--weights", small_weights, "--no-finetune", "--iter", 1]
    assert run_cli(*args, "--K", 3).returncode == 0
    stamp = (out / "particles.star").read_bytes()
    r = run_cli(*args, "--K", 2)
    assert r.returncode != 0 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert (out / "particles.star").read_bytes() == stamp  # nothing touched
    r = run_cli(*args, "--K", 2, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert starfile.read(out / "particles.star")["particles"]["rlnClassNumber"].max() == 2


@pytest.mark.parametrize("k, words", [(1, "at least 2"), (500, "only 120 particles")])
def test_bad_number_of_classes(sim, small_weights, tmp_path, k, words):
    r = run_cli("run", "--i", sim / "particles.star", "--o", tmp_path / "o", "--K", k, "--weights", small_weights)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr
    assert not any((tmp_path / "o" / name).exists() for name in CONTRACT)


def test_unusable_output_directory(sim, small_weights, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run_cli("run", "--i", sim / "particles.star", "--o", blocker / "job", "--K", 2, "--weights", small_weights)
    assert r.returncode != 0 and "a_file" in r.stderr and "Traceback" not in r.stderr


def test_killed_job_resumes_to_the_same_classes(sim, small_weights, tmp_path):
    args = ["--i", sim / "particles.star", "--K", 3, "--weights", small_weights, "--k", 5, "--epochs", 1,
            "--finetune", "--finetune-subset", 40, "--iter", 2, "--j", 1]
    assert run_cli("run", "--o", tmp_path / "whole", *args).returncode == 0
    out = tmp_path / "killed"
    # held once block 1 is fine-tuned (a named point, whatever the machine's speed), killed from outside
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "killpoint.py"), "--stop", "block1-done",
                             "run", "--o", str(out), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_stopped(proc.pid)
    assert (out / ".cdae_work" / "block1.done").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "particles.star").exists()
    r = run_cli("run", "--o", out, *args)
    assert r.returncode == 0, r.stderr
    assert "already fine-tuned (resuming)" in r.stderr
    a = starfile.read(tmp_path / "whole" / "particles.star")["particles"]
    b = starfile.read(out / "particles.star")["particles"]
    assert (a["rlnClassNumber"] == b["rlnClassNumber"]).all()
    assert np.allclose(a["rlnAnglePsi"], b["rlnAnglePsi"], atol=1e-3)


def test_run_job_returns_what_it_did(sim, small_weights, tmp_path):
    """The typed result: settings as the job ran them (phase flip decided), the files it wrote,
    class sizes; the same as a front end in another process loads from the job directory."""
    from cdae_em.job.result import CONTRACT as FILES
    from cdae_em.job.result import SELECTION, JobResult
    from cdae_em.job.runner import run_job
    from cdae_em.settings import build

    settings = build({"particles": str(sim / "particles.star"), "out_dir": str(tmp_path / "job"),
                      "classify.n_classes": 4, "classify.n_iter": 1, "denoise.weights": str(small_weights)})
    assert settings.denoise.phase_flip is None  # auto
    result = run_job(settings)
    assert isinstance(result, JobResult)
    assert result.phase_flipped and result.averages_phase_flipped  # the particles have CTF values
    assert result.settings.classify == settings.classify and result.settings.denoise.weights == str(small_weights)
    # the selection's files where a class was selected (at SNR 0.5 every class of a view is)
    assert set(result.files) == set(FILES) | set(SELECTION) and result.out_dir == tmp_path / "job"
    assert sum(result.class_sizes) == result.particles == 120 and result.box == 32
    assert "selfcheck" in result.denoise and result.timings["total"] > 0
    assert JobResult.load(tmp_path / "job") == result
