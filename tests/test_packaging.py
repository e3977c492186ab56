"""The wheel carries what an installed cdae-em needs: data files, templates, licence and metadata.

The wheel is built from a copy of the source tree (no build/ or *.egg-info of earlier builds, whose
stale files would otherwise end up in the wheel and hide a broken ``package_data``), with the
running interpreter's pip and setuptools and no build isolation, so nothing is downloaded (build
isolation, which fetches setuptools, only if this interpreter has none).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# files an installed cdae-em reads at run time (paths inside the wheel)
PACKAGE_FILES = [
    "cdae_em/data/default_map.mrc.gz",
    "cdae_em/data/default_map.json",
    "cdae_em/data/default_weights.pt",
    "cdae_em/data/default_weights.json",
    "cdae_em/data/pretrain_structures.npz",
    "cdae_em/data/PROVENANCE.md",
    "cdae_em/templates/relion_external_job.star",
    "cdae_em/templates/cdae_em_classify2d.json.template",
    "cdae_em/protocols/relion_external.py",
    "cdae_em/protocols/scipion_plugin.py",
]

GPL3_FIRST_LINES = ["GNU GENERAL PUBLIC LICENSE", "Version 3, 29 June 2007"]


def _pip_wheel_unavailable() -> str | None:
    """Why ``pip wheel`` cannot run here, or None if it can."""
    if importlib.util.find_spec("pip") is None:
        return "pip is not installed in this interpreter, so the wheel cannot be built"
    probe = subprocess.run([sys.executable, "-m", "pip", "wheel", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`pip wheel` is unavailable: {probe.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    reason = _pip_wheel_unavailable()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out",
            "tests", "docs", "benchmarks",
        ),
    )
    out = tmp / "wheels"
    if importlib.util.find_spec("setuptools") is not None:
        # the interpreter's own setuptools: offline and about 2 s
        isolation = ["--no-build-isolation", "--no-index"]
    else:
        isolation = []  # pip fetches setuptools into an isolated build environment
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(out.glob("cdae_em-*.whl"))
    assert len(wheels) == 1, f"expected one cdae_em wheel in {sorted(p.name for p in out.iterdir())}"
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


def _dist_info(zf: zipfile.ZipFile) -> str:
    dirs = {name.split("/", 1)[0] for name in zf.namelist() if name.split("/", 1)[0].endswith(".dist-info")}
    assert len(dirs) == 1, dirs
    return dirs.pop()


def test_wheel_has_package_data(wheel):
    names = set(wheel.namelist())
    missing = [f for f in PACKAGE_FILES if f not in names]
    assert not missing, f"missing from the wheel: {missing}"
    # the shipped weights: every *.pt next to default_weights.json in the source tree
    for pt in sorted((REPO / "cdae_em" / "data").glob("*.pt")):
        assert f"cdae_em/data/{pt.name}" in names
    # data files come through byte for byte (gzip and torch files are not text)
    for rel in ("cdae_em/data/default_map.mrc.gz", "cdae_em/data/default_weights.pt"):
        assert wheel.read(rel) == (REPO / rel).read_bytes(), rel


def test_wheel_has_licence(wheel):
    dist_info = _dist_info(wheel)
    licences = [n for n in wheel.namelist() if n.startswith(dist_info + "/") and n.endswith("/LICENSE")]
    assert licences, f"no LICENSE in {dist_info}"
    text = wheel.read(licences[0]).decode()
    assert text == (REPO / "LICENSE").read_text()
    head = [line.strip() for line in text.splitlines()[:3] if line.strip()]
    assert head == GPL3_FIRST_LINES
    assert "END OF TERMS AND CONDITIONS" in text


def test_wheel_metadata(wheel):
    meta = Parser().parsestr(wheel.read(f"{_dist_info(wheel)}/METADATA").decode())
    assert meta["Name"] == "cdae-em"
    # PEP 639: an SPDX expression, not a free-text License field or a License :: classifier
    assert meta["License-Expression"] == "GPL-3.0-or-later"
    assert "LICENSE" in meta.get_all("License-File", [])
    classifiers = meta.get_all("Classifier", [])
    for expected in (
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ):
        assert expected in classifiers
    entry_points = wheel.read(f"{_dist_info(wheel)}/entry_points.txt").decode()
    assert "cdae-em = cdae_em.cli:main" in entry_points
    assert "cdae_em = cdae_em" in entry_points  # the Scipion plugin
