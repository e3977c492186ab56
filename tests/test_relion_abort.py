"""RELION's "Abort running" when the core is inside a step that never polls ``should_stop``: the
wrapper's watchdog ends the job itself, with RELION_JOB_EXIT_ABORTED and nothing half-written; then
"Continue" resumes and finishes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from test_relion import (CONTRACT, EXE, JOB, abort_and_wait, exit_files, make_project, relion_args,  # noqa: F401
                         run_relion, sim)

from cdae_em.protocols import relion_files as rf
from cdae_em.io.star import read_particles

STUCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    import cdae_em.classify.stage
    from cdae_em.io.atomic_write import atomic_path
    from cdae_em.protocols import relion_external as rx

    rx.ABORT_GRACE_S = 1.0
    out = Path(sys.argv[sys.argv.index("--o") + 1])

    def stuck(*args, **kwargs):  # a long computation that never checks for an abort, mid-write
        with atomic_path(out / "particles.star") as tmp:
            tmp.write_text("half a STAR file")
            (out / "stuck").touch()
            time.sleep(300)

    cdae_em.classify.stage.classify = stuck
    sys.exit(rx.main(sys.argv[1:]))
""")


def test_watchdog_abort_of_a_step_without_checks_then_continue(sim, tmp_path):  # noqa: F811
    project = make_project(tmp_path, sim, "4")
    job = project / JOB
    args = relion_args(sim)[1:]  # without the executable
    with open(job / "run.out", "a") as out, open(job / "run.err", "a") as err:
        proc = subprocess.Popen([sys.executable, "-c", STUCK, *args], cwd=project, stdout=out, stderr=err)
        deadline = time.monotonic() + 180
        while not (job / "stuck").exists():
            assert proc.poll() is None, (job / "run.out").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (job / ".particles.star.partial").exists()
        abort_and_wait(job, proc)
    for name in [*CONTRACT, *rf.RELION_FILES]:  # the stage that was running left nothing
        if name != "denoised_particles.star":
            assert not (job / name).exists(), name
    # the finished denoising stage is kept, complete, for Continue to resume from
    assert len(read_particles(job / "denoised_particles.star")) == len(read_particles(project / args[3]))
    assert not list(job.rglob("*.partial*"))
    assert (job / "run.err").read_text().strip() == ""
    assert "stopping it now" in (job / "run.out").read_text()

    # Continue: the same command again resumes (the dead job's lock is taken over) and finishes
    (job / "stuck").unlink()
    assert run_relion(project, relion_args(sim)) == 0, (job / "run.err").read_text()
    assert exit_files(job) == {rf.EXIT_SUCCESS}
    log = (job / "run.out").read_text()
    assert "stage 1/3 denoise: already done (resuming)" in log and "no longer runs" in log
    for name in CONTRACT:
        assert (job / name).exists(), name
