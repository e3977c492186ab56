"""Smoke test of the benchmark suite (`python -m benchmarks.run --tiny`): every table is produced
with the expected rows and columns and finite numbers. No timing assertions; the numbers of the
tiny setting mean nothing."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

pytest.importorskip("skimage", reason="benchmark-only dependency scikit-image (pip install scikit-image bm3d)")
pytest.importorskip("bm3d", reason="benchmark-only dependency bm3d (pip install scikit-image bm3d)")


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Markdown tables by the '## ' section they appear in (several tables in a section are concatenated)."""
    out: dict[str, list[list[str]]] = {}
    section = ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|") and not line.startswith("|---"):
            out.setdefault(section, []).append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def test_tiny_benchmark_writes_every_table(tmp_path):
    from benchmarks.datasets import PROTOCOLS
    from benchmarks.run import main

    out = tmp_path / "docs" / "bench.md"
    assert main(["--tiny", "--j", "1", "--out", str(out), "--work", str(tmp_path / "work"),
                 "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    n_sets = len(PROTOCOLS)  # one protein in --tiny

    t1 = r["table1"]
    methods1 = {row[1] for row in t1}
    assert len(t1) == 7 * n_sets
    for needle in ("noisy input", "TV", "NLM", "BM3D", "single DAE", "CDAE, shipped", "CDAE fine-tuned"):
        assert any(needle in m for m in methods1), needle
    for row in t1:
        assert len(row) == 8
        assert all(math.isfinite(v) for v in row[3:7]), row  # PSNR and FRC, with and without equalisation
        assert 0 < row[5] < 1000 and 0 < row[6] < 1000

    t2 = r["table2"]
    assert len(t2) == 9 * n_sets
    methods2 = {row[1] for row in t2}
    for needle in ("k-means, raw pixels", "HC (Ward), raw pixels", "PCA(32) + k-means", "CAE + k-means",
                   "DAE + k-means", "alignment only", "CDAE + k-means, aligned on the denoised", "CDAE + HC"):
        assert any(needle in m for m in methods2), needle
    for row in t2:
        assert len(row) == 11
        assert all(math.isfinite(v) for v in row[2:10]), row
        hp, hr, hf, pp, pr, pf = row[2:8]  # Hungarian and pair-counting precision / recall / F1
        assert pf == pytest.approx(2 * pp * pr / (pp + pr) if pp + pr else 0.0, abs=1e-9), row
        assert hf <= (hp + hr) / 2 + 1e-9, row  # a mean of per-view harmonic means <= the arithmetic mean

    assert r["speed"] and all(len(row) == 6 and row[3] > 0 and row[4] > 0 for row in r["speed"])
    assert r["peak"] and all(row[1] > 0 for row in r["peak"])
    assert [row[0] for row in r["knn"]] == [500, 1000] and all(row[1] > 0 for row in r["knn"])
    assert len(r["scale"]) == 1 and r["scale"][0][1] > 0 and r["scale"][0][4] > 0 and len(r["scale"][0]) == 8  # wall time, peak RSS

    md = out.read_text()
    tables = _tables(md)
    for section in ("Table 1: denoising", "Table 2: clustering", "Speed", "Scale: `cdae-em run`"):
        assert section in tables, section
    assert len(tables["Table 1: denoising"]) == 1 + len(t1)
    assert len(tables["Table 2: clustering"]) == 1 + len(t2)
    assert "n/a" not in "".join(" ".join(r[3:7]) for r in tables["Table 1: denoising"][1:])
    for fig in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out.parent / fig).stat().st_size > 1000, fig


def test_texture_measure_tells_a_particle_on_flat_background_from_texture():
    """benchmarks.working_scale's measure: std outside the particle over std inside."""
    from benchmarks.working_scale import texture

    rng = np.random.default_rng(0)
    y, x = np.mgrid[:64, :64] - 31.5
    blob = np.exp(-(x ** 2 + y ** 2) / (2 * 8.0 ** 2)) * (1 + 0.3 * np.sin(x / 2))
    particles = blob + 0.01 * rng.normal(size=(10, 64, 64))
    assert texture(particles) < 0.1
    assert texture(rng.normal(size=(10, 64, 64))) == pytest.approx(1.0, abs=0.1)
