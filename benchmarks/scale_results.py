"""What the scale benchmarks share (``benchmarks.scale``, ``benchmarks.scale_classes``): the results
file docs/scale.json, a measured child command, and number formatting for the tables."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "scale.json"
REPORT = ROOT / "docs" / "scale.md"


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measured(cmd: list[str], cwd: Path) -> tuple[float, float, float | None]:
    """Wall time (s), peak RSS and peak anonymous RSS (MiB, the largest single process; see
    benchmarks.measure) of a child command."""
    from benchmarks.measure import run_measured

    m = run_measured(cmd, cwd, env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)})
    if m.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{m.output[-3000:]}")
    return m.wall, m.peak_rss_mib, m.peak_anon_mib


def merge(section: str, rows: list[dict], keys: tuple) -> dict:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    new = {tuple(r[k] for k in keys) for r in rows}
    results[section] = [r for r in results.get(section, []) if tuple(r[k] for k in keys) not in new] + rows
    results.setdefault("machine", {})[section] = machine()
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return results


def machine() -> str:
    from benchmarks.report import machine as describe

    return describe()


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


