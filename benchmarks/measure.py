"""Wall time and peak resident memory of a child command (cdae-em, torchrun, RELION alike).

Why not ``os.wait4``'s ``ru_maxrss``: Linux carries a process's RSS high-water mark over fork and
exec, so a child forked from a benchmark that holds 1.8 GB reports at least 1.8 GB whatever it used
itself (here: a ``python -c pass`` child of a process holding 200 MB reported 218 MB, its own
VmHWM being 14 MB). Instead, each process of the child's tree has its own high-water mark (VmHWM,
which starts afresh at exec) read from /proc while it runs, every ``poll_s``; the peak is the
largest of them, i.e. of the largest single process. Growth in the last ``poll_s`` before a
process exits is missed. Without /proc (not Linux) it falls back to ``ru_maxrss``.

RSS counts file-backed pages too: the shared libraries (~150 MB for torch) and the pages of
memory-mapped stacks and work arrays that have been read, which the kernel may drop under memory
pressure and re-read. ``peak_anon_mib`` is the largest anonymous part (RssAnon: heap, arrays,
tensors), sampled every ``poll_s`` (there is no high-water mark for it, so it is a lower bound):
what a job cannot give back.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    wall: float  # seconds
    peak_rss_mib: float  # the largest VmHWM of any process of the tree
    peak_anon_mib: float | None  # the largest RssAnon sampled in any process of the tree (None: no /proc)
    returncode: int
    output: str  # the last 20,000 characters of stdout and stderr
    stopped: bool = False  # ended early by ``until``


def memory_mib(pid: int) -> tuple[float, float] | None:
    """A process's resident high-water mark (VmHWM) and its anonymous resident memory now
    (RssAnon), in MiB; None once it has gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM:", "RssAnon:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    if "VmHWM" not in fields:
        return None
    return fields["VmHWM"], fields.get("RssAnon", 0.0)


def descendants(root: int) -> set[int]:
    """``root`` and every process below it (from the parent ids in /proc/*/stat)."""
    parent = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def run_measured(cmd: list[str], cwd: Path | str | None = None, env: dict | None = None,
                 log_file: Path | None = None, poll_s: float = 0.2, until=None) -> Measured:
    """Run ``cmd`` (stdout and stderr to ``log_file``, else kept for ``Measured.output``) and
    measure it while it runs; ``until`` (a function of nothing) ends it early (SIGTERM) once true."""
    peaks: dict[int, float] = {}
    anon: dict[int, float] = {}
    with open(log_file, "w") if log_file else tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=None if cwd is None else str(cwd), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        done, stopped = threading.Event(), threading.Event()

        def poll() -> None:
            while not done.is_set():
                if until is not None and not stopped.is_set() and until():
                    stopped.set()
                    proc.terminate()
                for pid in descendants(proc.pid):
                    mem = memory_mib(pid)
                    if mem is not None:
                        peaks[pid] = max(peaks.get(pid, 0.0), mem[0])
                        anon[pid] = max(anon.get(pid, 0.0), mem[1])
                done.wait(poll_s)

        watcher = threading.Thread(target=poll, daemon=True)
        if Path("/proc/self/status").exists():
            watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        if watcher.is_alive():
            watcher.join()
        out.flush()
        out.seek(0)
        text = out.read() if not log_file else Path(log_file).read_text(errors="replace")
    peak = max(peaks.values()) if peaks else usage.ru_maxrss / 1024
    return Measured(wall, peak, max(anon.values()) if anon else None, proc.returncode, text[-20000:], stopped.is_set())
