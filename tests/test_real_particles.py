"""Real particles (tests/data/real: 17 RELION-extracted particles, 200 px, RELION 3.0 STAR with
CTF): `denoise` and `run` as a user runs them, with the shipped weights and defaults. Whatever the
model does on them, the job must never write the model's output where it loses to the reference
filters on the self-check; the check is recomputed here from the job's own prepared particles."""
# measured (docs/real_particles.md): the shipped weights win the check on these particles

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from conftest import run_cli

from cdae_em.denoise.selfcheck import cascade_fn, check_rows, filter_images, reference_kernels, scores
from cdae_em.denoise.weights import default_weights_path, load_weights

REAL = Path(__file__).parent / "data" / "real" / "particles.star"


@pytest.fixture(scope="module")
def denoised(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "den"
    r = run_cli("denoise", "--i", REAL, "--o", out, "--j", 2, "--keep-work")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def test_the_self_check_on_real_particles_is_what_the_job_acted_on(denoised):
    out, stderr = denoised
    summary = json.loads((out / "summary.json").read_text())
    check = summary["denoise"]["selfcheck"]
    assert summary["denoise"]["box"] < 200  # the working scale: particles 200 px across are cropped
    inputs = torch.from_numpy(np.load(out / ".cdae_work" / "input.npy"))  # as the model saw them
    rows = check_rows(len(inputs), 0, held_out=False)
    assert len(rows) == 17 == check["check_particles"]
    model, _ = load_weights(default_weights_path())
    model.set_polarity(1 if check["contrast"].startswith("bright") else -1)
    kernels = reference_kernels()
    found = scores({"model": cascade_fn(model, torch.device("cpu"), exact=True),
                    **{k: (lambda v: (lambda x: filter_images(x, v)))(v) for k, v in kernels.items()}}, inputs[rows])
    means = {k: float(v.mean()) for k, v in found.items()}
    assert means["model"] == pytest.approx(check["correlation"]["model"], abs=2e-3)
    best = max(kernels, key=means.get)
    assert best == check["best_reference"]
    written = mrcfile.read(out / "denoised" / "particles_00001.mrcs")
    diff = found[best] - found["model"]
    if float(diff.mean()) <= 2 * float(diff.std()) / len(diff) ** 0.5:
        assert check["written"] == "model"
    else:  # the guard took over: the reference filter's output, said so once in the log
        assert check["written"] == best
        assert np.allclose(written, filter_images(inputs, kernels[best]).numpy(), atol=1e-4)
        assert sum("self-check" in line and "WARNING" in line for line in stderr.splitlines()) == 1


def test_run_on_real_particles_writes_every_output(tmp_path):
    out = tmp_path / "job"
    r = run_cli("run", "--i", REAL, "--o", out, "--K", 2, "--j", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    # RELION 3.0 in, RELION 3.0 out: one block, named as the input's
    particles = next(iter(starfile.read(out / "particles.star", always_dict=True).values()))
    assert len(particles) == 17 and set(particles["rlnClassNumber"]) <= {1, 2}
    with mrcfile.open(out / "class_averages.mrcs") as m:
        assert m.data.shape == (2, 200, 200)  # class averages of the originals, at their native box
    summary = json.loads((out / "summary.json").read_text())
    check = summary["denoise"]["selfcheck"]
    assert check["written"] in ("model", check["best_reference"])
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and (("warning" in check) == bool(status["warnings"]))
