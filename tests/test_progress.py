"""Job progress as data: the callback and OUT/status.json (cdae_em.runtime.progress)."""

from __future__ import annotations

import json

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
