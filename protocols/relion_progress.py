"""run.out for the RELION External job: progress lines a user watching the GUI understands (stage,
counts, ETA, from the core's progress callback), stray stderr output routed into the log,
repeated lines dropped."""

from __future__ import annotations

import logging
import sys
import time

from cdae_em.runtime.progress import Status

log = logging.getLogger("cdae_em.relion")

ETA_EVERY_S = 30.0  # at most one "time left" line per counted step this often


def duration(seconds: float) -> str:
    """Seconds as a person reads them: "45 s", "3 min 05 s", "2 h 07 min"."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress(logging.Handler):
    """The job's progress callback (``run_job(on_progress=...)``): logs how far the current count
    is (whatever the core counts: neighbour means, classification rounds) with an ETA, and keeps
    the stage for the heartbeat. As a log handler on the core's logger it only notes *when* the
    core last spoke, so that the heartbeat stays quiet while the core is talking."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.last = time.monotonic()
        self.stage = "starting"
        self._eta_logged: tuple[str | None, float] = (None, float("-inf"))  # (step, when)

    def __call__(self, status: Status) -> None:
        now = self.last = time.monotonic()
        if status.stage_number:
            self.stage = f"stage {status.stage_number}/{status.n_stages} {status.stage}"
        if not (status.step and status.eta_s is not None and 0 < status.done < status.total):
            return
        step, when = self._eta_logged
        if step == status.step and now - when < ETA_EVERY_S:
            return  # counts may come every batch: one line per ETA_EVERY_S
        self._eta_logged = (status.step, now)
        log.info("  %s: %s %d of %d done, about %s left", status.stage, status.step, status.done,
                 status.total, duration(status.eta_s))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != log.name:
            self.last = time.monotonic()


class StderrToLog:
    """sys.stderr while the job runs: RELION shows run.err as the job's errors, so progress-bar
    redraws (text with a carriage return) are dropped and any other line (warnings) goes to
    run.out through the log; the failure reason alone is written to the real stderr."""

    def __init__(self):
        self.buffer = ""

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.buffer += text
            while "\n" in self.buffer:
                line, self.buffer = self.buffer.split("\n", 1)
                if line.strip():
                    log.info("%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _NoRepeats(logging.Filter):
    """Drop a line identical to the one before it (per-batch messages would flood run.out)."""

    def __init__(self):
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        repeat = msg == self.last
        self.last = msg
        return not repeat


def setup_logging(level: str) -> Progress:
    """Log lines to stdout (run.out), without repeats; returns the progress callback."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)  # RELION appends stdout to run.out
    handler.addFilter(_NoRepeats())
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))
    progress = Progress()
    logging.getLogger("cdae_em").addHandler(progress)
    return progress
