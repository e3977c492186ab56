"""The job lock: ``OUT/.cdae_lock`` holds ``pid@host`` while a job runs in ``OUT``, so a second
job started into the same directory is refused instead of interleaving its files with the first's;
a lock left by a process of this host that no longer runs is taken over."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cdae_em.errors import OutputError

log = logging.getLogger(__name__)

LOCK_FILE = ".cdae_lock"


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: output directory is not writable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def job_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``OUT/.cdae_lock`` (holding ``pid@host``) while a job runs there: a second job started
    into the same directory is refused; a lock left by a dead process of this host is taken over."""
    out = Path(out_dir)
    make_out_dir(out)
    lock = out / LOCK_FILE
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = lock.read_text().strip()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if _stale(owner):
                log.warning("%s: taking over the lock of process %s, which no longer runs", out, owner)
                lock.unlink(missing_ok=True)
                continue
            raise _locked(out, owner) from None
        except OSError as exc:
            raise OutputError(f"{out}: cannot create the lock file {LOCK_FILE} ({exc.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    else:
        raise OutputError(f"{out}: could not take the job lock {lock}")
    try:
        yield lock
    finally:
        try:
            if lock.read_text().strip() == me:
                lock.unlink()
        except OSError:
            pass


def _stale(owner: str) -> bool:
    """A lock's ``pid@host`` names a process of this host that no longer runs."""
    pid_text, _, host = owner.partition("@")
    return pid_text.isdigit() and host == socket.gethostname() and not _pid_alive(int(pid_text))


def _locked(out: Path, owner: str) -> OutputError:
    return OutputError(f"{out}: another cdae-em job ({owner or 'unknown process'}) is running in this directory; "
                       f"wait for it to end, or remove {out / LOCK_FILE} if no job runs there")


def refuse_if_locked(out_dir: str | Path) -> None:
    """Refuse at once (touching nothing) when a live job holds ``out_dir``'s lock."""
    lock = Path(out_dir) / LOCK_FILE
    try:
        owner = lock.read_text().strip()
    except OSError:
        return
    if not _stale(owner):
        raise _locked(Path(out_dir), owner)
