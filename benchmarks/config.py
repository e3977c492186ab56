"""Settings of the benchmark suite: the sizes of each mode (--tiny, --quick, full) and a progress log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.datasets import PROTEINS

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    """Sizes and settings of one benchmark run (a mode, possibly overridden on the command line)."""

    mode: str
    proteins: list
    n: dict  # protocol -> particles
    box: int = 64
    k: int = 30
    epochs: int = 3
    bm3d_n: int = 16
    cae_epochs: int = 5
    speed_boxes: tuple = (64, 128)
    speed_threads: tuple = (1, 2)
    speed_images: int = 256
    knn_n: tuple = (2000, 8000, 32000)
    run_n: tuple = (2000,)
    sim_speed_n: int = 500
    calib_n: int = 48
    finetune_subset: int = 4000  # `cdae-em denoise --finetune-subset` (its default: 4000)
    classify_iter: int = 5  # `cdae-em run --iter` (its default: 5)


def config(mode: str, huge: bool = False) -> Config:
    """The sizes of a mode: "tiny", "quick" or "full" (``huge``: also `cdae-em run` at 128k)."""
    names = [p for p, _, _ in PROTEINS]
    if mode == "tiny":
        return Config(mode, names[:1], {"paper": 48, "realistic": 48}, box=32, k=8, epochs=1, bm3d_n=2,
                      cae_epochs=1, speed_boxes=(32,), speed_threads=(1,), speed_images=32, knn_n=(500, 1000),
                      run_n=(48,), sim_speed_n=0, calib_n=8, finetune_subset=24, classify_iter=1)
    if mode == "quick":
        return Config(mode, names, {"paper": 160, "realistic": 180}, k=20, epochs=1, bm3d_n=12, cae_epochs=5,
                      knn_n=(2000, 8000, 32000), run_n=(2000,), sim_speed_n=500, calib_n=32,
                      finetune_subset=80, classify_iter=5)
    return Config(mode, names, {"paper": 4000, "realistic": 4000}, bm3d_n=100, cae_epochs=10,
                  knn_n=(2000, 8000, 32000, 128000), run_n=(2000, 8000, 32000) + ((128000,) if huge else ()),
                  sim_speed_n=2000, calib_n=64)


def log(msg: str) -> None:
    """A timestamped progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
