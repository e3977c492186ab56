"""benchmarks.measure: a child's peak memory is its own, not what its parent held when it forked."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from benchmarks.measure import run_measured

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_child_peak_is_its_own_not_the_parents():
    held = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB resident here while the child runs
    m = run_measured([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert held.sum() == held.size and m.returncode == 0
    assert m.peak_rss_mib < 100  # os.wait4's ru_maxrss would say > 400 (inherited over fork)


def test_peak_of_a_grandchild_and_the_output():
    grow = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time, numpy as np; a = np.ones(300 * 2**20, dtype=np.uint8); time.sleep(1.0)']); "
            "print('done', file=sys.stderr); sys.exit(3)")
    m = run_measured([sys.executable, "-c", grow])
    assert m.returncode == 3 and "done" in m.output
    assert 300 < m.peak_rss_mib < 450  # the grandchild's 300 MiB array, seen from the tree
    assert 300 < m.peak_anon_mib < 450  # an array: anonymous memory


def test_mapped_file_pages_are_resident_but_not_anonymous(tmp_path):
    # a child that reads a 200 MiB memory-mapped file: its RSS counts the pages, RssAnon does not
    path = tmp_path / "stack.bin"
    np.ones(200 * 2**20, dtype=np.uint8).tofile(path)
    read = (f"import time, numpy as np; m = np.memmap({str(path)!r}, dtype=np.uint8, mode='r'); "
            "assert int(m.sum()) == m.size; time.sleep(1.0)")
    m = run_measured([sys.executable, "-c", read])
    assert m.returncode == 0, m.output
    assert m.peak_rss_mib > 200
    assert m.peak_anon_mib < 100


def test_a_command_is_stopped_once_until_holds(tmp_path):
    """``until`` ends a long command early (RELION stopped after a few iterations) and says so."""
    import time

    marker = tmp_path / "iteration_done"
    script = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"
    t0 = time.perf_counter()
    m = run_measured([sys.executable, "-c", script], until=marker.exists)
    assert m.stopped and m.returncode != 0 and time.perf_counter() - t0 < 30
    assert not run_measured([sys.executable, "-c", "pass"], until=lambda: False).stopped
