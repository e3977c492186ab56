"""Job progress as data: the callback and OUT/status.json (cdae_em.runtime.progress)."""

from __future__ import annotations

import json

import numpy as np

import pytest

from cdae_em.errors import InputError
from cdae_em.runtime.progress import STATUS_FILE, JobProgress, read_status, report, tracking


def test_status_file_follows_stages_and_counts(tmp_path):
    t = [0.0]
    seen = []
    progress = JobProgress(tmp_path, lambda s: seen.append((s.stage, s.done, s.eta_s)), clock=lambda: t[0])
    with tracking(progress):
        progress.stage(2, "classify")
        for done in range(4):
            report(done, 5, "round")  # reaches the job's progress from anywhere in the core
            t[0] += 4.0
        status = json.loads((tmp_path / STATUS_FILE).read_text())
        assert (status["state"], status["stage"], status["step"], status["done"]) == ("running", "classify", "round", 3)
        assert status["eta_s"] == pytest.approx(8.0)  # 4 s a round, 2 left
        assert status["fraction"] == pytest.approx((1 + 3 / 5) / 3, abs=1e-3)
        progress.finish()
    assert read_status(tmp_path).state == "done" and read_status(tmp_path).fraction == 1.0
    assert seen[0] == ("classify", 0, None) and seen[-1][0] == "done"
    assert not list(tmp_path.glob(".*.partial"))


def test_a_failure_is_recorded_as_one_line(tmp_path):
    with pytest.raises(InputError):
        with tracking(JobProgress(tmp_path)) as progress:
            progress.stage(1, "denoise")
            raise InputError(tmp_path / "p.star", "no rlnImageName\ncolumn", row=3)
    status = read_status(tmp_path)
    assert status.state == "failed" and status.stage == "denoise"
    assert status.error == f"{tmp_path / 'p.star'} (row 3): no rlnImageName column"


def test_no_status_without_a_directory_or_a_job(tmp_path):
    report(1, 2)  # outside a job: nothing happens
    progress = JobProgress(tmp_path / "not_yet")
    progress.stage(1, "denoise")
    assert not (tmp_path / "not_yet").exists()
    assert read_status(tmp_path / "not_yet") is None


def test_a_failing_callback_does_not_stop_the_job(tmp_path):
    def broken(status):
        raise RuntimeError("display gone")

    progress = JobProgress(tmp_path, broken)
    progress.stage(1, "denoise")
    progress.count(2, 2, "epoch")  # a finished count is always written
    assert read_status(tmp_path).done == 2


def test_denoising_reports_its_images_in_the_status(tmp_path):
    """Reading, denoising and writing the images count in status.json (a job of 10^5 particles
    spends minutes in each): every pass reports its images done, to the last."""
    import torch

    from cdae_em.denoise.cascade import Cascade
    from cdae_em.denoise.inference import run_cascade

    seen = []
    progress = JobProgress(tmp_path, callback=lambda s: seen.append((s.step, s.done, s.total)))
    progress.stage(1, "denoise")
    images = np.random.default_rng(0).normal(size=(10, 16, 16)).astype(np.float32)
    with tracking(progress):
        run_cascade(Cascade(channels=(4, 4, 4)), images, tmp_path / "x.npy", torch.device("cpu"), batch_size=4)
    for j in (1, 2, 3):
        counts = [(done, total) for step, done, total in seen if step == f"block {j}: denoise"]
        assert counts == [(4, 10), (8, 10), (10, 10)]
    assert read_status(tmp_path).step == "block 3: denoise" and read_status(tmp_path).done == 10


def test_the_first_classification_pass_reports_its_particles_in_the_status(tmp_path):
    """Before its first round the classification reads every particle twice (invariant features,
    then the alignment onto the class medoids): minutes at 10^5 particles, counted in status.json."""
    import torch

    from cdae_em.classify.stage import classify
    from cdae_em.settings import ClassifySettings

    seen = []
    progress = JobProgress(tmp_path, callback=lambda s: seen.append((s.step, s.done, s.total)))
    progress.stage(2, "classify")
    images = np.random.default_rng(0).normal(size=(40, 16, 16)).astype(np.float32)
    with tracking(progress):
        classify(images, ClassifySettings(n_classes=2, n_iter=0, batch_size=16), torch.device("cpu"),
                 work=tmp_path / "work")
    assert [(d, t) for step, d, t in seen if step == "invariant features"] == [(40, 40)]
    assert [(d, t) for step, d, t in seen if step == "alignment to the class medoids"] == [(16, 40), (32, 40), (40, 40)]
