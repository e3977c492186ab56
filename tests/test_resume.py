"""Kill -9 anywhere, rerun, same result; one stage runner for run/denoise/classify (settings
signature, lock, output guard). Tiny data (36 particles of 32 px) and untrained small weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from conftest import run_cli

from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from killpoint import KILL_POINTS, wait_stopped  # noqa: E402

CONTRACT = ["particles.star", "denoised_particles.star", "class_averages.mrcs", "class_averages.star",
            "summary.json", "gallery.png"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    simulate(load_source(None, box=32), SimulationSettings(n_particles=36, n_views=3, in_plane=True, max_shift=1.0,
                                                           ctf=True, snrs=[0.5], seed=5), out)
    return out / "particles.star"


def denoise_args(star, weights) -> list:
    return ["--i", star, "--weights", weights, "--finetune", "--neighbours", 3, "--epochs", 1, "--finetune-subset", 16,
            "--batch-size", 16, "--j", 1]


def job_args(star, weights) -> list:
    return [*denoise_args(star, weights), "--K", 3, "--iter", 1]


@pytest.fixture(scope="module")
def whole(tiny, small_weights, tmp_path_factory):
    """The uninterrupted run everything is compared with."""
    out = tmp_path_factory.mktemp("whole") / "job"
    r = run_cli("run", "--o", out, *job_args(tiny, small_weights))
    assert r.returncode == 0, r.stderr
    return out


def run_killed_at(point: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "killpoint.py"), point, *map(str, args)], capture_output=True,
                          text=True)


def assert_same_result(a: Path, b: Path) -> None:
    pa, pb = starfile.read(a / "particles.star")["particles"], starfile.read(b / "particles.star")["particles"]
    assert (pa["rlnClassNumber"] == pb["rlnClassNumber"]).all()
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(pa[col], pb[col], atol=1e-4), col
    assert_same_denoised(a, b)
    assert np.allclose(mrcfile.read(a / "class_averages.mrcs"), mrcfile.read(b / "class_averages.mrcs"), atol=1e-5)


def assert_same_denoised(a: Path, b: Path) -> None:
    da = mrcfile.read(a / "denoised" / "particles_00001.mrcs")
    db = mrcfile.read(b / "denoised" / "particles_00001.mrcs")
    assert np.allclose(da, db, atol=1e-5), np.abs(da - db).max()


def test_killed_at_every_stage_boundary_and_mid_stage_resumes_to_the_same_result(tiny, small_weights, whole,
                                                                                 tmp_path):
    """One job killed with SIGKILL at each point in turn (each rerun resumes what the kills before
    left: prepared inputs, blocks 1-3 with the earlier blocks' arrays already removed, the denoised
    stacks, the classification, the averages), then run to the end: the same result as ``whole``."""
    out = tmp_path / "job"
    args = ["run", "--o", out, *job_args(tiny, small_weights)]
    logs = {}
    for point in KILL_POINTS:
        r = run_killed_at(point, *args)
        assert r.returncode == -9, f"{point}: not killed (rc {r.returncode}): {r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, r.stderr
        assert not (out / "summary.json").exists()
        assert not list(out.glob("*.partial"))  # hidden temporaries may be left by a kill ...
        logs[point] = r.stderr
    assert "block 1: already fine-tuned (resuming)" in logs["block2-mid"]
    # the case: block1.npy is gone once block 2 is done; the rerun must not need it
    assert "block 2: already fine-tuned (resuming)" in logs["block3-mid"]
    assert "stage 1/3 denoise: already done (resuming)" in logs["classify-mid"]
    assert "stage 2/3 classify: already done (resuming)" in logs["averages-mid"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob(".*.partial"))  # ... and removed by the rerun
    assert not (out / ".cdae_work").exists() and not (out / ".cdae_lock").exists()
    assert_same_result(whole, out)


def stopped_at(point: str, *args, log: Path | None = None) -> subprocess.Popen:
    """``cdae-em ARGS`` started in another process and held (SIGSTOP) at the named kill point."""
    with open(log or os.devnull, "w") as err:  # a file, not a pipe: a full pipe would block the job
        proc = subprocess.Popen([sys.executable, str(HERE / "killpoint.py"), "--stop", point, *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=err)
    wait_stopped(proc.pid)
    return proc


def test_killed_from_outside_after_block2_resumes(tiny, small_weights, whole, tmp_path):
    """The issue's report as a user sees it: `kill -9` from another process once block 2 is
    fine-tuned (the job held there, whatever the machine's speed), then the same command again."""
    out = tmp_path / "job"
    args = job_args(tiny, small_weights)
    proc = stopped_at("block2-done", "run", "--o", out, *args)
    assert (out / ".cdae_work" / "block2.done").exists()
    proc.kill()
    proc.wait()
    assert (out / ".cdae_lock").exists()  # left by the killed job: a stale lock, taken over below
    r = run_cli("run", "--o", out, *args)
    assert r.returncode == 0, r.stderr
    assert "no longer runs" in r.stderr
    assert_same_result(whole, out)


def test_denoise_command_resumes_and_never_reuses_other_settings(tiny, small_weights, whole, tmp_path):
    """`cdae-em denoise` goes through the same stage runner: killed after block 2 it resumes; with
    other settings into the same --o it is refused, and with --overwrite nothing old is reused."""
    out = tmp_path / "den"
    args = denoise_args(tiny, small_weights)
    r = run_killed_at("block2-done", "denoise", "--o", out, *args, "--keep-work")
    assert r.returncode == -9
    assert (out / ".cdae_work" / "block2.done").exists()
    other = [str(a) for a in args]
    other[other.index("--epochs") + 1] = "2"
    r = run_cli("denoise", "--o", out, *other)
    assert r.returncode == 1 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("denoise", "--o", out, *args)
    assert r.returncode == 0, r.stderr
    assert "block 2: already fine-tuned (resuming)" in r.stderr
    assert_same_denoised(whole, out)  # the run's denoising stage and the denoise command agree
    assert json.loads((out / "summary.json").read_text())["settings"]["stages"] == "denoise"
    r = run_cli("denoise", "--o", out, *other, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stderr and "fine-tune epoch 2/2" in r.stderr


def test_denoise_work_of_other_settings_is_not_reused(tiny, small_weights, tmp_path):
    """The work directory itself is stamped with its settings: core callers that bypass the job's
    signature (benchmarks, notebooks) do not resume from another setting's blocks either."""
    import torch

    from cdae_em.denoise.stage import denoise

    from cdae_em.settings import DenoiseSettings
    from cdae_em.settings import TrainSettings

    s1 = DenoiseSettings(weights=str(small_weights), finetune=True, k=3, finetune_subset=16, batch_size=16,
                         train=TrainSettings(epochs=1))
    denoise(tiny, tmp_path, s1, torch.device("cpu"), keep_work=True)
    assert (tmp_path / ".cdae_work" / "block3.done").exists()
    s2 = DenoiseSettings(**{**s1.__dict__, "k": 4})
    summary = denoise(tiny, tmp_path, s2, torch.device("cpu"), keep_work=True)
    assert all("resumed" not in block for block in summary["finetune"])
    summary = denoise(tiny, tmp_path, s2, torch.device("cpu"))
    assert all(block.get("resumed") for block in summary["finetune"])


def test_classify_command_uses_the_stage_runner(tiny, tmp_path):
    out = tmp_path / "cls"
    r = run_cli("classify", "--i", tiny, "--o", out, "--K", 3, "--iter", 1, "--j", 1)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["stages"] == "classify" and len(summary["class_sizes"]) == 3
    stamp = (out / "particles.star").read_bytes()
    r = run_cli("classify", "--i", tiny, "--o", out, "--K", 3, "--iter", 2, "--j", 1)
    assert r.returncode == 1 and "different job" in r.stderr and "Traceback" not in r.stderr
    assert (out / "particles.star").read_bytes() == stamp
    r = run_cli("classify", "--i", tiny, "--o", out, "--K", 3, "--iter", 1, "--j", 1)
    assert r.returncode == 0 and "stage 2/3 classify: already done (resuming)" in r.stderr
    assert (out / "particles.star").read_bytes() == stamp  # crowding and all, from classes.npz
    assert "cdaeCrowding" in starfile.read(out / "particles.star")["particles"]


def test_classes_saved_by_an_earlier_version_resume_without_what_it_did_not_save(tiny, tmp_path):
    """classes.npz of a version before noise whitening and crowding: the job resumes from it and
    writes particles.star without cdaeCrowding; the selection goes on without that rule."""
    from cdae_em.job.runner import JOB_DIR

    out = tmp_path / "cls"
    assert run_cli("classify", "--i", tiny, "--o", out, "--K", 3, "--iter", 1, "--j", 1).returncode == 0
    saved = out / JOB_DIR / "classes.npz"
    earlier = {k: v for k, v in np.load(saved).items() if k not in ("crowding", "whitening")}
    with open(saved, "wb") as f:
        np.savez(f, **earlier)
    (out / "particles.star").unlink()
    r = run_cli("classify", "--i", tiny, "--o", out, "--K", 3, "--iter", 1, "--j", 1)
    assert r.returncode == 0 and "already done (resuming)" in r.stderr, r.stderr
    particles = starfile.read(out / "particles.star")["particles"]
    assert "cdaeCrowding" not in particles and "cdaeClassFit" in particles


def test_second_job_into_the_same_directory_is_refused(tiny, small_weights, tmp_path):
    """Two jobs started into one --o: the second is refused at once, the first finishes untouched."""
    out = tmp_path / "job"
    args = ["run", "--o", out, *job_args(tiny, small_weights)]
    first = stopped_at("prepared", *args, log=tmp_path / "first.log")  # held with its lock taken
    assert (out / ".cdae_job" / "signature").exists()
    lock = (out / ".cdae_lock").read_text()
    assert lock.startswith(f"{first.pid}@")
    second = run_cli(*args)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert "another cdae-em job" in second.stderr and str(first.pid) in second.stderr
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    err = (tmp_path / "first.log").read_text()
    assert "no longer runs" not in err
    assert all((out / name).exists() for name in CONTRACT)
    assert not (out / ".cdae_lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from cdae_em.errors import OutputError
    from cdae_em.job.runner import LOCK_FILE, job_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / LOCK_FILE).write_text(f"{dead.pid}@{socket.gethostname()}\n")
    with job_lock(tmp_path) as lock:
        assert lock.read_text().strip() == f"{os.getpid()}@{socket.gethostname()}"
        with pytest.raises(OutputError, match=f"another cdae-em job \\({os.getpid()}@"):
            with job_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text("1@some-other-host\n")  # cannot tell if it runs: refused
    with pytest.raises(OutputError, match="some-other-host"):
        with job_lock(tmp_path):
            pass


def test_particles_rewritten_in_place_are_a_new_job_not_a_resume(small_weights, tmp_path):
    """A STAR file replaced by other particles under the same name (a rerun of the step before) is
    never resumed from the old particles' stages: refused without --overwrite, rerun afresh with it."""
    sim = tmp_path / "sim"

    def simulated(n: int, seed: int) -> Path:
        simulate(load_source(None, box=32), SimulationSettings(n_particles=n, n_views=3, snrs=[0.5], seed=seed),
                 sim, overwrite=True)
        return sim / "particles.star"

    star = simulated(30, 1)
    out = tmp_path / "job"
    args = ["classify", "--i", star, "--o", out, "--K", 3, "--iter", 1, "--j", 1]
    assert run_cli(*args).returncode == 0
    simulated(24, 2)
    refused = run_cli(*args)
    assert refused.returncode == 1 and "different job" in refused.stderr
    again = run_cli(*args, "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" not in again.stderr
    assert len(starfile.read(out / "particles.star")["particles"]) == 24
