"""run.out for the RELION External job: progress lines a user watching the GUI understands (stage,
counts, ETA), stray stderr output routed into the log, repeated lines dropped."""

from __future__ import annotations

import logging
import re
import sys
import time

log = logging.getLogger("cdae_em.relion")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress(logging.Handler):
    """Watches the core's log records and adds an ETA where it can count: fine-tuning epochs
    (``block J ... epoch E/N``) and classification rounds (``round R/N``)."""

    _BLOCK = re.compile(r"^block (\d+)\b")
    _EPOCH = re.compile(r"epoch (\d+)/(\d+)")
    _ROUND = re.compile(r"round (\d+)/(\d+)")

    def __init__(self, n_blocks: int = 3):
        super().__init__(level=logging.INFO)
        self.n_blocks = n_blocks
        self.block = 1
        self.phase_start: float | None = None
        self.phase: str | None = None
        self.last = time.monotonic()
        self.stage = "starting"

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == log.name:
            return
        self.last = time.monotonic()
        try:
            msg = record.getMessage()
        except Exception:
            return
        if msg.startswith("stage "):
            self.stage = msg.split(":")[0]
        m = self._BLOCK.match(msg)
        if m:
            self.block = int(m.group(1))
        m = self._EPOCH.search(msg)
        if m and "pre-training" not in msg:
            self._eta("fine-tuning", (self.block - 1) * int(m.group(2)) + int(m.group(1)),
                      self.n_blocks * int(m.group(2)))
            return
        m = self._ROUND.search(msg)
        if m:
            self._eta("classification", int(m.group(1)), int(m.group(2)))

    def _eta(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.phase != phase or self.phase_start is None:
            # the first count of a phase starts its clock (its duration covers one step less)
            self.phase, self.phase_start, self.first_done = phase, now, done
            return
        steps = done - self.first_done
        if steps <= 0 or total <= done:
            return
        left = (now - self.phase_start) / steps * (total - done)
        log.info("  %s: %d of %d done, about %s left in this stage", phase, done, total, duration(left))


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
