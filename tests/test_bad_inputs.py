"""Bad inputs and bad options are refused with one line (file, row, problem), never a traceback:
pixel sizes, abbreviations, numbers no job can run with, out of memory, a full disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

from cdae_em.errors import InputError, ResourceError
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
from cdae_em.io.star import read_particles, write_star

CONTRACT = ["particles.star", "denoised_particles.star", "class_averages.mrcs", "class_averages.star",
            "summary.json", "gallery.png"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate(load_source(None, box=32), SimulationSettings(n_particles=40, n_views=2, in_plane=True, ctf=True,
                                                           snrs=[0.5], seed=2), out)
    return out / "particles.star"


def with_optics(star: Path, dest: Path, pixels: list[float | None]) -> Path:
    """A copy of ``star`` with one optics group per entry of ``pixels`` (None: no pixel size
    column), particles spread over the groups in turn."""
    table = read_particles(star)
    optics = pd.concat([table.optics] * len(pixels), ignore_index=True)
    optics["rlnOpticsGroup"] = np.arange(1, len(pixels) + 1)
    optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in range(1, len(pixels) + 1)]
    if any(p is None for p in pixels):
        optics = optics.drop(columns="rlnImagePixelSize")
    else:
        optics["rlnImagePixelSize"] = pixels
    table.blocks["optics"] = optics
    table.particles["rlnOpticsGroup"] = np.arange(len(table)) % len(pixels) + 1
    table.particles["rlnImageName"] = [f"{n.split('@')[0]}@{star.parent / n.split('@')[1]}"
                                       for n in table.particles["rlnImageName"]]
    write_star(table, dest)
    return dest


@pytest.mark.parametrize("pixels, words", [
    ([0.0], "pixel size of optics group 1 is 0: it must be a positive number"),
    ([-1.2], "pixel size of optics group 1 is -1.2"),
    ([None], "no pixel size of optics group 1"),
    ([1.5, 1.5, 2.1], "optics groups have different pixel sizes (group 1: 1.5 A, group 2: 1.5 A, group 3: 2.1 A)"),
])
def test_bad_pixel_sizes_are_refused(sim, tmp_path, pixels, words):
    star = with_optics(sim, tmp_path / "p.star", pixels)
    with pytest.raises(InputError) as err:
        read_particles(star).pixel_size()
    assert words in str(err.value) and str(star) in str(err.value)


def test_pixel_size_per_row_in_a_relion30_table(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"], "rlnImagePixelSize": [1.0, 1.0, 1.3]})
    from cdae_em.io.star import write_table

    path = tmp_path / "p30.star"
    write_table(df, path)
    with pytest.raises(InputError, match=r"p30.star \(row 3\): pixel size 1.3 A differs from row 1's 1 A"):
        read_particles(path).pixel_size()


def test_zero_pixel_size_refused_by_the_job_before_any_output(sim, small_weights, tmp_path):
    star = with_optics(sim, tmp_path / "p.star", [0.0])
    out = tmp_path / "o"
    r = run_cli("run", "--i", star, "--o", out, "--K", 2, "--weights", small_weights, "--no-finetune")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "ERROR" in lines[-1] and "pixel size of optics group 1 is 0" in lines[-1] and "p.star" in lines[-1]
    assert not any((out / name).exists() for name in CONTRACT) and not (out / "denoised").exists()
    r = run_cli("check", "--i", star)
    assert r.returncode == 1 and "pixel size of optics group 1 is 0" in r.stderr


def test_mixed_pixel_sizes_refused_by_the_job(sim, small_weights, tmp_path):
    star = with_optics(sim, tmp_path / "p.star", [1.0, 1.4])
    r = run_cli("denoise", "--i", star, "--o", tmp_path / "o", "--weights", small_weights, "--no-finetune")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "optics groups have different pixel sizes (group 1: 1 A, group 2: 1.4 A)" in r.stderr


# --- options -----------------------------------------------------------------------------------
def test_no_abbreviations_anywhere():
    """`--j` is not `--job`, `--ep` is not `--epochs`: every parser has allow_abbrev=False."""
    from cdae_em.cli import build_parser
    from cdae_em.protocols.relion_args import build_parser as relion_parser

    parser = build_parser()
    assert parser.allow_abbrev is False
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.allow_abbrev is False, name
    assert relion_parser().allow_abbrev is False
    r = run_cli("evaluate", "--job", "x", "--truth", "y", "--j", "2")
    assert r.returncode == 2 and "unrecognized arguments: --j 2" in r.stderr
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--i", "p.star", "--o", "o", "--K", "3", "--ep", "1"])


def test_neighbours_option_and_its_alias():
    from cdae_em.cli import build_parser
    from cdae_em.commands.run import job_settings

    parser = build_parser()
    base = ["run", "--i", "p.star", "--o", "o", "--K", "3"]
    assert job_settings(parser.parse_args(base + ["--neighbours", "7"])).denoise.k == 7
    assert job_settings(parser.parse_args(base + ["--k", "7"])).denoise.k == 7
    assert "--neighbours N, --k N" in parser._subparsers._group_actions[0].choices["run"].format_help()


@pytest.mark.parametrize("command", ["run", "denoise", "classify", "check", "simulate"])
def test_batch_size_zero_is_a_usage_error(command, tmp_path):
    args = {"run": ["--i", "p.star", "--o", tmp_path, "--K", 2], "denoise": ["--i", "p.star", "--o", tmp_path],
            "classify": ["--i", "p.star", "--o", tmp_path, "--K", 2], "check": ["--i", "p.star"],
            "simulate": ["--o", tmp_path]}[command]
    r = run_cli(command, *args, "--batch-size", 0)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --batch-size: must be at least 1, got 0" in r.stderr


def test_bad_numbers_in_job_settings_are_refused_by_the_core(tmp_path):
    """Front ends that build JobSettings themselves (RELION, Scipion, notebooks) get the same check."""
    from dataclasses import replace

    from cdae_em.job.runner import run_job
    from cdae_em.settings import ClassifySettings, JobSettings

    s = JobSettings("p.star", str(tmp_path / "o"), classify=ClassifySettings(n_classes=3))
    for bad, words in [(replace(s, denoise=replace(s.denoise, batch_size=0)), "--batch-size 0"),
                       (replace(s, denoise=replace(s.denoise, k=0)), "--neighbours 0"),
                       (replace(s, classify=replace(s.classify, psi_step=0.0)), "--psi-step 0.0: must be positive"),
                       (replace(s, classify=replace(s.classify, method="x")), "--method x"),
                       (replace(s, pretrain_epochs=0), "--pretrain-epochs 0: must be at least 1")]:
        with pytest.raises(InputError, match=words):
            run_job(bad)
    assert not (tmp_path / "o").exists()


def test_pretrain_with_two_channel_counts_is_one_line(tmp_path):
    r = run_cli("pretrain", "--o", tmp_path / "w", "--channels", "32,64")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--channels: expected 3 positive whole numbers, got '32,64'" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w" / "cdae_weights.pt").exists()


def test_evaluate_on_a_directory_without_a_summary(sim, tmp_path):
    (tmp_path / "job").mkdir()
    r = run_cli("evaluate", "--job", tmp_path / "job", "--truth", sim.parent / "truth.star")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "summary.json: not found" in r.stderr
    r = run_cli("evaluate", "--job", tmp_path / "nothing", "--truth", sim.parent / "truth.star")
    assert r.returncode == 1 and "not a directory" in r.stderr and "Traceback" not in r.stderr


# --- out of memory, full disk ----------------------------------------------------------------------
def _raise_cuda_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("where", ["cdae_em.denoise.inference.run_block", "cdae_em.classify.stage.classify",
                                   "cdae_em.job.outputs.original_class_averages"])
def test_cuda_out_of_memory_anywhere_in_the_job_is_one_line(sim, small_weights, tmp_path, monkeypatch, where):
    """Raised in the denoiser, the classifier or the averages: a ResourceError naming the fix,
    whatever front end called run_job; nothing half-written, the lock released."""
    import importlib

    from cdae_em.job.runner import run_job
    from cdae_em.settings import ClassifySettings, DenoiseSettings, JobSettings

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _raise_cuda_oom)
    out = tmp_path / "o"
    settings = JobSettings(str(sim), str(out), denoise=DenoiseSettings(weights=str(small_weights), finetune=False,
                                                                       batch_size=16),
                           classify=ClassifySettings(n_classes=2, n_iter=1))
    with pytest.raises(ResourceError) as err:
        run_job(settings)
    message = str(err.value)
    assert message == "out of GPU memory: use a smaller --batch-size (now 16), or a smaller --box"
    assert not (out / "particles.star").exists() and not (out / "summary.json").exists()
    assert not list(out.rglob(".*.partial")) and not (out / ".cdae_lock").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "smaller --batch-size" in status["error"]


def test_cpu_memory_error_is_one_line_too():
    from cdae_em.errors import resource_errors

    with pytest.raises(ResourceError, match=r"^out of memory: use a smaller --batch-size \(now 8\)"):
        with resource_errors(batch_size=8):
            raise MemoryError()
    with pytest.raises(ValueError):  # anything else passes through untouched
        with resource_errors(batch_size=8):
            raise ValueError("a bug")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_full_disk_leaves_no_corrupt_output_and_says_so(sim, small_weights, tmp_path):
    """The job's output on a 2 MB tmpfs: the disk fills up while fine-tuning block 2 (200
    particles: every work array is 800 kB); the job ends with one line saying so, no output file is
    left (half-written or not), only the finished stages' work for a rerun to resume from."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount): the full-disk case is not tested")
    try:
        big = tmp_path / "big"
        simulate(load_source(None, box=32), SimulationSettings(n_particles=200, n_views=2, snrs=[0.5], seed=1), big)
        out = disk / "job"
        r = run_cli("run", "--i", big / "particles.star", "--o", out, "--K", 2, "--weights", small_weights,
                    "--finetune", "--neighbours", 3, "--epochs", 1, "--finetune-subset", 20, "--iter", 1, "--j", 1)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "no space left on the device" in lines[-1] and "rerun the same command to resume" in lines[-1]
        assert not any((out / name).exists() for name in CONTRACT)
        assert not list(out.rglob("*.partial")) and not list(out.rglob(".*.partial"))
        assert not list((out / "denoised").glob("*")) if (out / "denoised").exists() else True
        work = out / ".cdae_work"
        for array in work.glob("*.npy") if work.exists() else []:  # only finished stages are kept
            assert (work / f"{array.stem}.done").exists() or array.name == "blank.npy", array
        assert (work / "block1.done").exists() and (work / "input.npy").exists()
        assert not (out / ".cdae_lock").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_check_and_help_do_not_import_torch():
    """Option defaults come from the settings dataclasses (which import torch), but only the
    command being run sets up its options: `cdae-em check` and `cdae-em --help` stay quick."""
    code = ("import sys\nfrom cdae_em import cli\n"
            "try:\n    cli.main(['check', '--i', 'missing.star'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr
