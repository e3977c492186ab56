"""Job progress as data: a callback and ``OUT/status.json``, not log text.

``run_job`` owns a :class:`JobProgress`: it marks each stage, and long loops anywhere in the core
call :func:`report` (``report(epoch, n_epochs, "epoch")``) without being handed anything. Every
change is passed to the front end's callback (the RELION wrapper logs an ETA from it) and written
atomically to ``status.json`` in the output directory (what the Scipion protocol reads)::

    {"state": "running", "stage": "classify", "stage_number": 2, "n_stages": 3,
     "step": "round", "done": 2, "total": 5, "fraction": 0.47, "eta_s": 31.0,
     "elapsed_s": 80.2, "error": null, "warnings": [], "updated": "2026-12-01T04:00:00+00:00"}

``state`` is running, done, failed or aborted; ``error`` the one-line reason of a failure;
``warnings`` what the user must know about the result (e.g. the denoiser's self-check chose a
reference filter over the model);
``eta_s`` the seconds left in the current count (null until two counts were seen); ``fraction``
the share of the whole job done, counting every stage as equal (coarse; it never goes back).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from cdae_em.io.atomic_write import write_text
from cdae_em.errors import CdaeError, JobAborted

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
MIN_WRITE_INTERVAL_S = 1.0  # counts closer together than this update the file once


@dataclass
class Status:
    """What a front end needs to show how far a job is."""

    state: str = "running"  # running, done, failed, aborted
    stage: str = "starting"
    stage_number: int = 0
    n_stages: int = 3
    step: str | None = None  # what is being counted ("epoch", "round"), None between counts
    done: int = 0
    total: int = 0
    fraction: float = 0.0  # of the whole job
    eta_s: float | None = None  # seconds left in the current count
    elapsed_s: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the user must know about the result
    updated: str = ""


ProgressCallback = Callable[[Status], None]


class JobProgress:
    """Tracks a job's stage and counts; hands every change to ``callback`` and to ``status.json``
    in ``out_dir`` (only once that directory exists: the job creates it)."""

    def __init__(self, out_dir: str | Path | None, callback: ProgressCallback | None = None, n_stages: int = 3,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(out_dir) / STATUS_FILE if out_dir is not None else None
        self.callback = callback
        self.clock = clock
        self.status = Status(n_stages=n_stages)
        self.t0 = clock()
        self._count_start: tuple[float, int] | None = None  # (time, done) of a count's first report
        self._written = float("-inf")

    def stage(self, number: int, name: str) -> None:
        """Stage ``number`` (1-based) of ``n_stages`` begins."""
        s = self.status
        s.stage, s.stage_number = name, number
        s.step, s.done, s.total, s.eta_s = None, 0, 0, None
        self._count_start = None
        self._update(force=True)

    def count(self, done: int, total: int, step: str = "step") -> None:
        """``done`` of ``total`` ``step``s of the current stage are finished. A count that starts
        again (``done`` lower than before, e.g. the next block's epochs) restarts the ETA clock."""
        s = self.status
        now = self.clock()
        if self._count_start is None or step != s.step or done < s.done:
            # the first report of a count starts its clock: its duration covers one step less
            self._count_start = (now, done)
            s.eta_s = None
        else:
            t_start, d_start = self._count_start
            steps = done - d_start
            s.eta_s = round((now - t_start) / steps * max(total - done, 0), 1) if steps > 0 else s.eta_s
        s.step, s.done, s.total = step, done, total
        self._update(force=done >= total)

    def warn(self, message: str) -> None:
        """Something about the result the user must know (one line), kept to the end of the job."""
        self.status.warnings.append(" ".join(str(message).split()))
        self._update(force=True)

    def finish(self) -> None:
        """The job completed."""
        self.status.state, self.status.eta_s = "done", 0.0
        self.status.stage = "done"
        self._update(force=True)

    def fail(self, message: str, aborted: bool = False) -> None:
        """The job stopped: ``message`` as one line."""
        self.status.state = "aborted" if aborted else "failed"
        self.status.error = " ".join(str(message).split())
        self.status.eta_s = None
        self._update(force=True)

    def _update(self, force: bool = False) -> None:
        """Derive fraction and elapsed time; tell the callback; write status.json (throttled)."""
        s = self.status
        within = min(s.done / s.total, 1.0) if s.total else 0.0
        if s.state == "done":
            s.fraction = 1.0
        elif s.stage_number:  # never backwards: a stage may count several things in turn
            s.fraction = max(s.fraction, round((s.stage_number - 1 + within) / s.n_stages, 4))
        now = self.clock()
        s.elapsed_s = round(now - self.t0, 1)
        s.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self.callback is not None:
            try:
                self.callback(s)
            except Exception:  # a front end's display must never stop the job
                log.debug("progress callback failed", exc_info=True)
        if self.path is not None and (force or now - self._written >= MIN_WRITE_INTERVAL_S):
            self._write(now)

    def _write(self, now: float) -> None:
        """status.json, atomically; skipped while the output directory does not exist."""
        if not self.path.parent.is_dir():
            return  # the job has not created its output directory (yet)
        try:
            write_text(self.path, json.dumps(asdict(self.status), indent=1) + "\n")
            self._written = now
        except OSError as exc:
            log.debug("cannot write %s: %s", self.path, exc)


_current: ContextVar[JobProgress | None] = ContextVar("cdae_em_progress", default=None)


@contextmanager
def tracking(progress: JobProgress) -> Iterator[JobProgress]:
    """Make ``progress`` the one :func:`report` feeds, and record how the block ends: done by the
    caller (:meth:`JobProgress.finish`), or failed/aborted with the exception's message."""
    token = _current.set(progress)
    try:
        yield progress
    except CdaeError as exc:
        progress.fail(str(exc), aborted=isinstance(exc, JobAborted))
        raise
    except KeyboardInterrupt:
        progress.fail("interrupted", aborted=True)
        raise
    except MemoryError:
        progress.fail("out of memory")
        raise
    except Exception as exc:
        progress.fail(f"internal error ({type(exc).__name__}: {exc})")
        raise
    finally:
        _current.reset(token)


def report(done: int, total: int, step: str = "step") -> None:
    """Called by long loops in the core: ``done`` of ``total`` ``step``s finished (a no-op
    outside a job)."""
    progress = _current.get()
    if progress is not None:
        progress.count(done, total, step)


def warn(message: str) -> None:
    """Record a warning about the job's result in its status (a no-op outside a job)."""
    progress = _current.get()
    if progress is not None:
        progress.warn(message)


def read_status(out_dir: str | Path) -> Status | None:
    """The ``status.json`` of a job directory, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(out_dir) / STATUS_FILE).read_text())
        return Status(**{k: v for k, v in data.items() if k in Status.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None
