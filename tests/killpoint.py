"""Run ``cdae-em ARGS`` in this process and SIGKILL it at a named point of the job (a test helper).

    python tests/killpoint.py POINT run --i ... --o ...
    python tests/killpoint.py --stop POINT run --i ... --o ...
    python tests/killpoint.py --stop POINT --relion --o External/job001/ --in_parts ...

POINT is one of KILL_POINTS: a stage boundary (the stage before it is finished, the next one not
started) or the middle of a stage. The kill is a real ``kill -9`` of the job's own process: no
``finally``, no atexit, nothing cleaned up, as when a cluster scheduler or the OOM killer ends a job.
With ``--stop`` the process stops itself there (SIGSTOP) instead, so that a test can act on a job
held at a known point (kill it from outside, start a second job, ask for an abort) and then
continue it (SIGCONT) or not: no test depends on how fast the job runs. ``--relion`` runs the RELION
External job wrapper (``cdae-em-relion``) instead of ``cdae-em``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys


MODE = {"signal": signal.SIGKILL}


def _die() -> None:
    """At the point: SIGKILL (the default), or SIGSTOP with --stop (the job goes on if continued)."""
    sys.stderr.flush()
    sys.stdout.flush()
    os.kill(os.getpid(), MODE["signal"])


def wait_stopped(pid: int, timeout: float = 300.0) -> None:
    """Wait until process ``pid`` is stopped (state T): it reached its --stop point."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        if state in ("T", "t"):
            return
        if state == "Z":
            raise RuntimeError(f"process {pid} ended before its stop point")
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} did not reach its stop point in {timeout} s")


def _kill_when(module, name: str, when) -> None:
    """Wrap ``module.name`` so that the process is killed when ``when(args, kwargs)`` is true."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if when(args, kwargs):
            _die()
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def _nth_call(n: int):
    calls = {"n": 0}

    def when(args, kwargs) -> bool:
        calls["n"] += 1
        return calls["n"] == n
    return when


def _arg_name(position: int, keyword: str, name: str):
    """True when a path argument (by position or keyword) has this file name."""
    def when(args, kwargs) -> bool:
        value = kwargs.get(keyword, args[position] if len(args) > position else None)
        return value is not None and os.path.basename(str(value)) == name
    return when


def _block_desc(block: int):
    def when(args, kwargs) -> bool:
        return str(kwargs.get("desc", "")).startswith(f"block {block}:")
    return when


def install(point: str) -> None:
    import cdae_em.classify.stage as classify
    import cdae_em.denoise.stage as denoise
    import cdae_em.denoise.finetune as finetune
    import cdae_em.job.runner as job
    import cdae_em.job.outputs as outputs

    points = {
        "prepare-mid": lambda: _kill_when(denoise.BatchPreparer, "__call__", _nth_call(2)),
        "prepared": lambda: _kill_when(finetune, "finetune", lambda a, k: True),
        "block1-mid": lambda: _kill_when(finetune, "train_block", _block_desc(1)),
        "block1-done": lambda: _kill_when(finetune, "shared_work_array", _arg_name(0, "path", "block2_before.npy")),
        "block2-mid": lambda: _kill_when(finetune, "train_block", _block_desc(2)),
        "block2-done": lambda: _kill_when(finetune, "shared_work_array", _arg_name(0, "path", "block3_before.npy")),
        "block3-mid": lambda: _kill_when(finetune, "train_block", _block_desc(3)),
        "block3-done": lambda: _kill_when(denoise, "write_denoised", lambda a, k: True),
        "write-mid": lambda: _kill_when(denoise.StackWriter, "write", _nth_call(2)),
        "denoised": lambda: _kill_when(classify, "classify", _nth_call(1)),
        "classify-mid": lambda: _kill_when(classify, "classify", _nth_call(2)),
        "classified": lambda: _kill_when(outputs, "write_outputs", lambda a, k: True),
        "averages-mid": lambda: _kill_when(outputs, "write_star", _nth_call(1)),
        "summary": lambda: _kill_when(job, "atomic_text", _arg_name(0, "path", "summary.json")),
    }
    points[point]()


KILL_POINTS = ["prepare-mid", "prepared", "block1-mid", "block1-done", "block2-mid", "block2-done", "block3-mid",
               "block3-done", "write-mid", "denoised", "classify-mid", "classified", "averages-mid", "summary"]

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[0] == "--stop":
        MODE["signal"] = signal.SIGSTOP
        argv = argv[1:]
    install(argv[0])
    if argv[1] == "--relion":
        from cdae_em.protocols.relion_external import main as relion_main

        sys.exit(relion_main(argv[2:]))
    from cdae_em.cli import main

    main(argv[1:])
