"""The RELION External job wrapper (`cdae-em-relion`), run the way RELION runs it: from a project
directory, `--o External/job012/ --in_parts Extract/job005/particles.star --<label> <value>... --j N`,
with stdout/stderr appended to run.out/run.err (pipeline_jobs.cpp prepareFinalCommand)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cdae_em.runtime.progress import read_status
from cdae_em.protocols import relion_files as rf

EXE = shutil.which("cdae-em-relion", path=str(Path(sys.executable).parent)) or shutil.which("cdae-em-relion")
JOB = "External/job012/"
CONTRACT = ["particles.star", "denoised_particles.star", "class_averages.mrcs", "class_averages.star",
            "summary.json", "gallery.png"]
N_MICS, PER_MIC = 2, 30

JOB_STAR = {  # External/jobNNN/job.star as RelionJob::write writes it just before the launch
    "3.1": "\n# version 30001\n\ndata_job\n\n_rlnJobType                            99\n"
           "_rlnJobIsContinue                       0\n \n",
    "4": "\n# version 30001\n\ndata_job\n\n_rlnJobTypeLabel             relion.external\n"
         "_rlnJobIsContinue                       0\n_rlnJobIsTomo                           0\n \n",
}
PIPELINE_5 = """
# version 50001

data_pipeline_general

_rlnPipeLineJobCounter                      13
 

# version 50001

data_pipeline_processes

loop_ 
_rlnPipeLineProcessName #1 
_rlnPipeLineProcessAlias #2 
_rlnPipeLineProcessTypeLabel #3 
_rlnPipeLineProcessStatusLabel #4 
Extract/job005/       None relion.extract  Succeeded 
External/job012/       None relion.external    Running 
 

# version 50001

data_pipeline_nodes

loop_ 
_rlnPipeLineNodeName #1 
_rlnPipeLineNodeTypeLabel #2 
_rlnPipeLineNodeTypeLabelDepth #3 
Extract/job005/particles.star ParticleGroupMetadata.star.relion            1 
 
"""


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """60 simulated particles of 32 px (3 views, in-plane rotation, CTF) and untrained weights:
    these tests are about the plumbing, not the denoising."""
    import torch

    from cdae_em.denoise.cascade import Cascade
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
    from cdae_em.denoise.weights import save_weights

    assert EXE, "cdae-em-relion is not installed (pip install -e .)"
    root = tmp_path_factory.mktemp("relion_sim")
    simulate(load_source(None, box=32), SimulationSettings(n_particles=N_MICS * PER_MIC, n_views=3, in_plane=True,
                                                           ctf=True, snrs=[0.5], seed=1), root / "sim")
    torch.manual_seed(0)
    save_weights(Cascade(), root / "weights.pt")
    return root


def make_project(root: Path, sim: Path, flavour: str, repeat: int = 1) -> Path:
    """A RELION project: Extract/job005/particles.star pointing into Extract/job005/Movies/*.mrcs
    (one stack per micrograph, project-relative names), written as that RELION writes it, plus
    what RELION leaves before launching the External job (job.star or default_pipeline.star)."""
    from cdae_em.io.star import read_particles, write_star

    project = root / f"project{flavour}"
    movies = project / "Extract/job005/Movies"
    movies.mkdir(parents=True)
    table = read_particles(sim / "sim/particles.star")
    with mrcfile.open(sim / "sim/particles.mrcs") as mrc:
        data, pixel = np.array(mrc.data), float(mrc.voxel_size.x)
    names, mics = [], []
    for m in range(N_MICS):
        with mrcfile.new(movies / f"mic{m + 1}.mrcs", data=data[m * PER_MIC:(m + 1) * PER_MIC]) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pixel
        names += [f"{i + 1:06d}@Extract/job005/Movies/mic{m + 1}.mrcs" for i in range(PER_MIC)]
        mics += [f"MotionCorr/job002/Movies/mic{m + 1}.mrc"] * PER_MIC
    table = table.with_columns(particles={"rlnImageName": names, "rlnMicrographName": mics,
                                          "rlnCoordinateX": np.arange(len(names)) * 10.0 + 100,
                                          "rlnCoordinateY": np.arange(len(names)) * 5.0 + 100})
    if repeat > 1:  # the same images many times over: a longer job from the same stacks
        table.blocks["particles"] = pd.concat([table.particles] * repeat, ignore_index=True)
    table.version_line = "# version 50001" if flavour == "5" else "# version 30001"
    write_star(table, project / "Extract/job005/particles.star")
    (project / JOB).mkdir(parents=True)
    if flavour in JOB_STAR:
        (project / JOB / "job.star").write_text(JOB_STAR[flavour])
    else:
        (project / "default_pipeline.star").write_text(PIPELINE_5)
    return project


def relion_args(sim: Path, *extra: str) -> list[str]:
    """The command RELION builds (getCommandsExternalJob): --o, --in_parts, --<label> <value>...,
    --j, other args; plumbing runs use untrained weights and no fine-tuning."""
    return [EXE, "--o", JOB, "--in_parts", "Extract/job005/particles.star", "--K", "3",
            "--weights", str(sim / "weights.pt"), "--finetune", "No", "--iterations", "2", "--neighbours", "5",
            *extra, "--j", "1", "--some_unknown", "x"]


def run_relion(project: Path, args: list[str], wait: bool = True):
    """Launch as RELION does: cwd = project, stdout/stderr appended to run.out/run.err."""
    out = open(project / JOB / "run.out", "a")
    err = open(project / JOB / "run.err", "a")
    proc = subprocess.Popen(args, cwd=project, stdout=out, stderr=err)
    if not wait:
        return proc
    try:
        proc.wait(timeout=180)
    finally:
        out.close()
        err.close()
    return proc.returncode


def exit_files(job: Path) -> set[str]:
    return {p.name for p in job.glob("RELION_JOB_*")}


def abort_and_wait(job: Path, proc: subprocess.Popen) -> None:
    """The GUI's Abort: RELION_JOB_ABORT_NOW; the job must stop within seconds, exit 2, mark
    itself aborted and remove the abort file."""
    (job / rf.ABORT_NOW).touch()
    t = time.monotonic()
    assert proc.wait(timeout=60) == 2
    assert time.monotonic() - t < 10
    assert exit_files(job) == {rf.EXIT_ABORTED}
    assert not (job / rf.ABORT_NOW).exists()


def resolve_image(project: Path, name: str) -> tuple[Path, int]:
    """N@path of a STAR file -> (file relative to the project directory, N), checked to exist."""
    number, _, path = name.partition("@")
    f = project / path
    assert f.is_file(), f"{name}: {f} does not exist (paths must resolve from the project directory)"
    with mrcfile.mmap(f, mode="r") as mrc:
        n = 1 if mrc.data.ndim == 2 else mrc.data.shape[0]
    assert 1 <= int(number) <= n, f"{name}: image {number} of a stack of {n}"
    return f, int(number)


def check_outputs(project: Path, flavour: str, K: int = 3) -> None:
    job = project / JOB
    assert exit_files(job) == {rf.EXIT_SUCCESS}
    assert (job / "run.err").read_text().strip() == "", "run.err must stay empty on success"
    for name in CONTRACT:
        assert (job / name).is_file(), name
    status = read_status(job)  # what a front end that runs the job as a subprocess reads
    assert status.state == "done" and status.fraction == 1.0 and status.error is None

    nodes = starfile.read(job / rf.OUTPUT_NODES, always_dict=True)["output_nodes"]
    text = (job / rf.OUTPUT_NODES).read_text()
    selected = (job / "particles_selected.star").is_file()  # the automatic selection's particles
    if flavour == "3.1":
        assert "_rlnPipeLineNodeTypeLabel" not in text
        types = dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeType"]))
        assert types == {JOB + "particles.star": 3, JOB + "denoised_particles.star": 3,
                         JOB + "run_it000_optimiser.star": 9, JOB + "run_it000_model.star": 8,
                         JOB + "class_averages.star": 5, **({JOB + "particles_selected.star": 3} if selected else {})}
    else:
        assert "_rlnPipeLineNodeType " not in text
        types = dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeTypeLabel"]))
        top = {"4": ("ParticlesData", "ProcessData", "ImagesData"),
               "5": ("ParticleGroupMetadata", "OptimiserData", "Image2DGroupMetadata")}[flavour]
        assert types[JOB + "particles.star"] == f"{top[0]}.star.relion.class2d"
        assert types[JOB + "denoised_particles.star"] == f"{top[0]}.star.relion"
        # a particle set Class3D / Refine3D take as input
        assert types.get(JOB + "particles_selected.star") == (f"{top[0]}.star.relion" if selected else None)
        assert types[JOB + "run_it000_optimiser.star"].startswith(f"{top[1]}.star.relion")
        assert types[JOB + "run_it000_optimiser.star"].endswith("class2d")
        assert types[JOB + "class_averages.star"] == f"{top[2]}.star.relion.classaverages"
    for name in types:  # every declared node exists (from the project directory) and reads back
        assert (project / name).is_file(), name
        assert starfile.read(project / name, always_dict=True)

    # image paths in every output resolve from the project directory
    parts = starfile.read(job / "particles.star", always_dict=True)["particles"]
    assert len(parts) == N_MICS * PER_MIC
    assert set(parts["rlnClassNumber"]) <= set(range(1, K + 1))
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMicrographName", "rlnCoordinateX"):
        assert col in parts
    for name in parts["rlnImageName"][::7]:
        resolve_image(project, name)
    den = starfile.read(job / "denoised_particles.star", always_dict=True)["particles"]
    for name, orig in list(zip(den["rlnImageName"], den["rlnImageOriginalName"]))[::7]:
        resolve_image(project, name)
        resolve_image(project, orig)
    for name in starfile.read(job / "class_averages.star")["rlnReferenceImage"]:
        resolve_image(project, name)

    # what Subset selection opens: optimiser -> model (classes) and <root>_data.star
    opt = starfile.read(job / "run_it000_optimiser.star", always_dict=True)["optimiser_general"]
    model_file = project / opt["rlnModelStarFile"]
    data_file = project / opt["rlnExperimentalDataStarFile"]
    assert data_file == job / "run_it000_data.star"  # relion_display derives it from the optimiser name
    model = starfile.read(model_file, always_dict=True)
    general, classes = model["model_general"], model["model_classes"]
    assert general["rlnNrClasses"] == K and general["rlnReferenceDimensionality"] == 2
    assert len(classes) == K
    assert np.isclose(classes["rlnClassDistribution"].sum(), 1.0, atol=1e-5)
    for label in ("rlnAccuracyRotations", "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution",
                  "rlnClassPriorOffsetX", "rlnClassPriorOffsetY"):
        assert label in classes
    for k, name in enumerate(classes["rlnReferenceImage"], 1):
        f, number = resolve_image(project, name)
        assert number == k and f.name == "run_it000_classes.mrcs"
    for k in range(1, K + 1):
        assert {"rlnSpectralIndex", "rlnSsnrMap", "rlnGoldStandardFsc"} <= set(model[f"model_class_{k}"].columns)
    assert "model_groups" in model and "model_optics_group_1" in model
    data = starfile.read(data_file, always_dict=True)
    assert {"optics", "particles"} <= set(data)
    assert (data["particles"]["rlnClassNumber"].to_numpy() == parts["rlnClassNumber"].to_numpy()).all()
    counts = np.bincount(parts["rlnClassNumber"], minlength=K + 1)[1:]
    assert np.allclose(classes["rlnClassDistribution"], counts / counts.sum(), atol=1e-5)
    assert not list(job.glob(".*.partial")) and not list(job.glob("*.partial*"))


def check_log(project: Path, flavour: str) -> str:
    log = (project / JOB / "run.out").read_text()
    assert f"output nodes for RELION {flavour}" in log
    assert "stage 1/3" in log and "stage 3/3" in log and "done in" in log
    assert "ignoring arguments cdae-em-relion does not know: --some_unknown x" in log
    # the plumbing runs' untrained weights lose to a plain filter: the guard's line reaches run.out
    check = json.loads((project / JOB / "summary.json").read_text())["denoise"]["selfcheck"]
    assert check["written"] == check["best_reference"] and "denoiser self-check: " + check["warning"] in log
    return log


def test_relion31_project(sim, tmp_path):
    """RELION 3.1 (detected from the integer _rlnJobType of the job.star RELION wrote), with CTF
    phase flipping: the optimiser then declares RELION's "only flip phases" CTF correction."""
    project = make_project(tmp_path, sim, "3.1")
    assert run_relion(project, relion_args(sim, "--phase_flip", "Yes")) == 0, (project / JOB / "run.err").read_text()
    check_outputs(project, "3.1")
    check_log(project, "3.1")
    opt = starfile.read(project / JOB / "run_it000_optimiser.star", always_dict=True)["optimiser_general"]
    assert opt["rlnDoCorrectCtf"] == 1 and opt["rlnDoOnlyFlipCtfPhases"] == 1


def test_relion5_project_then_continue_with_forced_flavour(sim, tmp_path):
    """RELION 5 (detected from default_pipeline.star); then RELION's Continue, which reruns the
    same command into the same directory: not refused, finished stages picked up, a stale exit
    file cleared; --nodes_flavour overrides the detected flavour."""
    project = make_project(tmp_path, sim, "5")
    assert run_relion(project, relion_args(sim)) == 0, (project / JOB / "run.err").read_text()
    check_outputs(project, "5")
    check_log(project, "5")
    opt = starfile.read(project / JOB / "run_it000_optimiser.star", always_dict=True)["optimiser_general"]
    assert opt["rlnDoCorrectCtf"] == 1  # particles with CTF are phase-flipped by default: "only flip phases"
    (project / JOB / rf.EXIT_FAILURE).touch()
    assert run_relion(project, relion_args(sim, "--nodes_flavour", "3.1")) == 0, (project / JOB / "run.err").read_text()
    log = (project / JOB / "run.out").read_text()
    assert "stage 1/3 denoise: already done (resuming)" in log
    assert "stage 2/3 classify: already done (resuming)" in log
    check_outputs(project, "3.1")


def test_relion4_project_with_finetuning(sim, tmp_path):
    """RELION 4 (job.star with _rlnJobTypeLabel and version 30001), the full path with
    fine-tuning (1 epoch per block, 5 neighbours)."""
    project = make_project(tmp_path, sim, "4")
    args = relion_args(sim, "--epochs", "1", "--finetune", "Yes")
    assert run_relion(project, args) == 0, (project / JOB / "run.err").read_text()
    check_outputs(project, "4")
    assert "fine-tuned" in check_log(project, "4")


def test_abort_mid_run(sim, tmp_path):
    """RELION_JOB_ABORT_NOW created while the job runs (held in the middle of reading the particles,
    whatever the machine's speed, and let go once the file is there): it stops within seconds,
    removes the file, creates RELION_JOB_EXIT_ABORTED, exits 2 and leaves no outputs behind."""
    import signal

    from killpoint import wait_stopped

    project = make_project(tmp_path, sim, "4")
    job = project / JOB
    args = [sys.executable, str(Path(__file__).parent / "killpoint.py"), "--stop", "prepare-mid", "--relion",
            *relion_args(sim, "--batch_size", "16")[1:]]
    proc = run_relion(project, args, wait=False)
    wait_stopped(proc.pid)
    assert "stage 1/3" in (job / "run.out").read_text()
    (job / rf.ABORT_NOW).touch()
    proc.send_signal(signal.SIGCONT)
    abort_and_wait(job, proc)
    for name in CONTRACT + list(rf.RELION_FILES):
        assert not (job / name).exists(), name
    assert not list(job.rglob("*.partial*"))
    assert (job / "run.err").read_text().strip() == ""
    assert "aborted by the user" in (job / "run.out").read_text()


def test_abort_requested_before_start(sim, tmp_path):
    """An abort file already there when the job starts is honoured (the pipeliner removes stale
    ones before it launches the job)."""
    project = make_project(tmp_path, sim, "5")
    (project / JOB / rf.ABORT_NOW).touch()
    assert run_relion(project, relion_args(sim)) == 2
    assert exit_files(project / JOB) == {rf.EXIT_ABORTED}
    assert not (project / JOB / rf.ABORT_NOW).exists()


def test_missing_stack_fails_with_reason(sim, tmp_path):
    project = make_project(tmp_path, sim, "5")
    (project / "Extract/job005/Movies/mic2.mrcs").unlink()
    assert run_relion(project, relion_args(sim)) == 1
    job = project / JOB
    assert exit_files(job) == {rf.EXIT_FAILURE}
    err = (job / "run.err").read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: ") and "mic2.mrcs" in err[0], err
    for name in CONTRACT + list(rf.RELION_FILES):
        assert not (job / name).exists(), name


def test_bad_parameter_fails_with_reason(sim, tmp_path):
    project = make_project(tmp_path, sim, "4")
    args = [a for a in relion_args(sim) if a not in ("--K", "3")] + ["--K", "three"]
    assert run_relion(project, args) == 1
    assert exit_files(project / JOB) == {rf.EXIT_FAILURE}
    err = (project / JOB / "run.err").read_text().strip().splitlines()
    assert len(err) == 1 and "--K" in err[0] and "three" in err[0], err


def template_command(sim: Path, *overrides: str) -> list[str]:
    """The command RELION builds from the shipped template (getCommandsExternalJob: --o, --in_parts,
    then `--<label> <value>` for each parameter with a label, a bare `--<label>` for an empty value,
    then --j), with ``overrides`` after the parameters (the later label wins, as in other_args)."""
    from importlib.resources import files

    template = files("cdae_em.templates").joinpath("relion_external_job.star")
    opts = starfile.read(str(template), always_dict=True)["joboptions_values"]
    opts = dict(zip(opts["rlnJobOptionVariable"], opts["rlnJobOptionValue"].astype(str)))
    command = [EXE, "--o", JOB, "--in_parts", "Extract/job005/particles.star"]
    for i in range(1, 11):
        label, value = opts.get(f"param{i}_label", "").strip(), opts.get(f"param{i}_value", "").strip()
        if label:
            command += [f"--{label}"] + ([value] if value and value != '""' else [])
    return command + list(overrides) + ["--j", "1"]


def _rewrite_particles(project: Path, drop: tuple[str, ...] = (), flipped: bool = False) -> None:
    path = project / "Extract/job005/particles.star"
    star = starfile.read(path, always_dict=True)
    star["particles"] = star["particles"].drop(columns=[c for c in drop if c in star["particles"]])
    if flipped:
        star["optics"]["rlnCtfDataArePhaseFlipped"] = 1
    starfile.write(star, path, overwrite=True)


@pytest.mark.parametrize("case", ["no_ctf", "already_flipped"])
def test_template_defaults_never_flip_what_they_should_not(sim, tmp_path, case):
    """With the template's own values (phase_flip auto): particles without CTF values run as they
    are (not refused), and particles RELION marks as phase-flipped are not flipped again."""
    project = make_project(tmp_path, sim, "5")
    if case == "no_ctf":
        _rewrite_particles(project, drop=("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"))
    else:
        _rewrite_particles(project, flipped=True)
    command = template_command(sim, "--K", "3", "--iterations", "2", "--weights", str(sim / "weights.pt"))
    assert "--phase_flip" in command and command[command.index("--phase_flip") + 1] == "auto"
    assert run_relion(project, command) == 0, (project / JOB / "run.err").read_text()
    check_outputs(project, "5")
    summary = json.loads((project / JOB / "summary.json").read_text())
    assert summary["settings"]["denoise"]["phase_flip"] is False
    assert summary["settings"]["average_phase_flipped"] is False
    log = (project / JOB / "run.out").read_text()
    expected = "no CTF values for every particle" if case == "no_ctf" else "phase-flipped already"
    assert expected in log
