"""The RELION External job wrapper in-process: its parameters, the job template, the RELION
flavour detection, the progress lines and one-line errors in run.err (the runs as RELION starts
them are in test_relion.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import starfile

from cdae_em.protocols import relion_external as rx
from cdae_em.protocols import relion_files as rf
from cdae_em.protocols.relion_args import gpu_id
from cdae_em.settings import build, get
from test_relion import JOB, JOB_STAR, exit_files


def test_relion_parameters_map_onto_the_job():
    args, unknown = rx.build_parser().parse_known_args(
        ["--o", "External/job003/", "--in_parts", "Select/job002/particles.star", "--in_3dref", "ref.mrc",
         "--K", "12", "--epochs", "2", "--neighbours", "7", "--gpu", "--method", "hierarchical",
         "--iterations", "4", "--box", "", "--phase_flip", "Yes", "--psi-step", "10", "--j", "3",
         "--split_merge", "1", "--pipeline_control", "External/job003/", "--other", "1"])
    assert unknown == ["--pipeline_control", "External/job003/", "--other", "1"]
    s = rx.job_settings(args)
    c = s.classify
    assert (s.particles, s.out_dir, s.n_classes, c.method, c.n_iter, c.psi_step, c.split_merge) == (
        "Select/job002/particles.star", "External/job003/", 12, "hierarchical", 4, 10.0, 1)
    assert (s.denoise.train.epochs, s.denoise.k, s.denoise.box, s.denoise.phase_flip) == (2, 7, None, True)
    # the class averages follow the particles' phase flip (resolved by the job: test_relion31_project)
    assert s.average_phase_flipped is None and s.reference_map == "ref.mrc" and s.threads == 3 and s.overwrite
    import torch

    assert s.gpu == ("0" if torch.cuda.is_available() else None)  # empty value: the first GPU if there is one
    for available, expected in ((True, "0"), (False, None)):  # both outcomes, whatever this machine has
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "is_available", lambda: available)
            assert rx.job_settings(args).gpu == expected
    assert gpu_id("1:2") == "1,2" and gpu_id("0,1,1") == "0,1" and gpu_id("3") == "3"
    assert gpu_id("cpu") is None and gpu_id(None) is None
    args, _ = rx.build_parser().parse_known_args(["--o", "External/job003/", "--in_parts", "p.star", "--j", "1"])
    with pytest.raises(rx.ArgumentError, match="number of classes"):
        rx.job_settings(args)


def test_template_loads_and_its_parameters_are_understood(tmp_path):
    text = rx.template_text()
    d = starfile.read(_write(tmp_path / "t.star", text), always_dict=True)
    assert d["job"]["rlnJobTypeLabel"] == "relion.external" and d["job"]["rlnJobType"] == 99
    opts = dict(zip(d["joboptions_values"]["rlnJobOptionVariable"], d["joboptions_values"]["rlnJobOptionValue"]))
    assert opts["fn_exe"] == "cdae-em-relion"
    command = ["--o", "External/job001/", "--in_parts", "p.star"]  # as getCommandsExternalJob builds it
    for i in range(1, 11):
        if str(opts.get(f"param{i}_label", "")).strip():
            command += [f"--{opts[f'param{i}_label']}"] + ([str(opts[f"param{i}_value"])]
                                                          if str(opts[f"param{i}_value"]).strip() else [])
    command += ["--j", str(opts["nr_threads"])]
    args, unknown = rx.build_parser().parse_known_args(command)
    assert unknown == []
    s = rx.job_settings(args)
    assert s.n_classes == 20 and s.denoise.phase_flip is None  # auto: flipped only where CTF values say so
    defaults = build({"particles": "p.star", "out_dir": "External/job001/", "classify.n_classes": 20,
                      "threads": int(opts["nr_threads"]), "overwrite": True})
    assert s == defaults  # the template's values are the settings tree's defaults
    assert rx.main(["--write_template", str(tmp_path / "tpl")]) == 0
    assert (tmp_path / "tpl" / "job.star").read_text() == text


def test_shipped_template_is_the_one_made_from_the_settings_tree():
    """templates/relion_external_job.star (what the GUI loads) is what the settings tree makes; after
    changing a default, write it again with `cdae-em-relion --write_template templates/relion_external_job.star`."""
    from importlib.resources import files

    shipped = files("cdae_em.templates").joinpath("relion_external_job.star").read_text()
    assert shipped == rx.template_text()


def test_every_run_option_is_a_relion_parameter():
    """Each option of `cdae-em run` that RELION does not set itself is a parameter label, parsed to
    the same value with the same checks."""
    from cdae_em.settings import settings_tree

    own = {"particles", "out_dir", "reference_map", "gpu", "threads", "overwrite", "project_dir", "keep_work"}
    base = ["--o", "External/job001/", "--in_parts", "p.star", "--K", "5"]
    for s in settings_tree("run"):
        if s.path in own:
            assert not s.option.relion_labels
            continue
        label = s.option.relion_labels[0]
        real = "0.5" if s.option.maximum is not None and s.option.maximum < 2.5 else "2.5"  # within its bounds
        value = {bool: "Yes", int: "9", float: real, str: (s.option.choices or ("x.pt",))[-1]}[s.type]
        args, unknown = rx.build_parser().parse_known_args(base + [f"--{label}", value])
        assert unknown == []
        expected = {"Yes": True, "9": 9, "2.5": 2.5, "0.5": 0.5}.get(value, value)
        assert get(rx.job_settings(args), s.path) == expected, s.path
    with pytest.raises(rx.ArgumentError, match="finetune_subset.*at least 1"):
        rx.build_parser().parse_known_args(base + ["--finetune_subset", "0"])
    with pytest.raises(rx.ArgumentError, match="select_threshold.*at most 1"):
        rx.build_parser().parse_known_args(base + ["--select_threshold", "2"])
    with pytest.raises(rx.ArgumentError, match="expected kmeans or hierarchical"):
        rx.build_parser().parse_known_args(base + ["--method", "pca"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flavour_detection(tmp_path):
    out = tmp_path / "External/job001"
    out.mkdir(parents=True)
    parts = tmp_path / "particles.star"
    parts.write_text("\n# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    assert rf.detect_flavour(out, "particles.star", tmp_path)[0] == "4"
    parts.write_text(parts.read_text().replace("30001", "50001"))
    assert rf.detect_flavour(out, "particles.star", tmp_path)[0] == "5"
    (tmp_path / "default_pipeline.star").write_text(
        "\n# version 30001\n\ndata_pipeline_nodes\n\nloop_\n_rlnPipeLineNodeName #1\n_rlnPipeLineNodeType #2\n"
        "Extract/job005/particles.star 3\n")
    assert rf.detect_flavour(out, "particles.star", tmp_path)[0] == "3.1"
    for flavour, text in JOB_STAR.items():  # the job's own job.star wins
        (out / "job.star").write_text(text)
        assert rf.detect_flavour(out, "particles.star", tmp_path)[0] == flavour
    (out / "job.star").write_text(JOB_STAR["4"].replace("30001", "50001"))
    assert rf.detect_flavour(out, "particles.star", tmp_path)[0] == "5"


def test_progress_lines_give_an_eta(caplog, monkeypatch):
    """run.out: the ETA comes from the core's progress callback (counts of epochs or rounds), one
    line per ETA_EVERY_S at most."""
    import logging

    from cdae_em.runtime.progress import JobProgress
    from cdae_em.protocols import relion_progress
    from cdae_em.protocols.relion_progress import Progress

    t = [100.0]
    progress = JobProgress(None, Progress(), clock=lambda: t[0])
    with caplog.at_level(logging.INFO):
        progress.stage(2, "classify")
        for done in (0, 1, 2):
            progress.count(done, 9, "round")
            t[0] += 10.0
        assert caplog.text.count("left") == 1  # round 2 came within ETA_EVERY_S of round 1
        monkeypatch.setattr(relion_progress, "ETA_EVERY_S", 0.0)
        progress.count(3, 9, "round")
    # 1 round in 10 s: after round 1, 8 of 9 left; after round 3, 6 left
    assert "classify: round 1 of 9 done, about 1 min 20 s left" in caplog.text
    assert "classify: round 3 of 9 done, about 1 min 00 s left" in caplog.text


@pytest.mark.parametrize("error", ["resource", "cuda_oom"])
def test_out_of_memory_is_one_line_in_run_err(tmp_path, monkeypatch, error):
    """A CdaeError from the core (e.g. ResourceError for GPU memory), or a raw CUDA out-of-memory
    error that escaped it, ends the job as RELION expects: one line in run.err, EXIT_FAILURE, exit
    code 1; not an "internal error"."""
    import io
    import logging

    import torch

    import cdae_em.job.runner
    from cdae_em.errors import ResourceError

    def run_job(*args, **kwargs):
        if error == "resource":
            raise ResourceError("out of GPU memory: use a smaller --batch-size (now 256), or a smaller --box")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cdae_em.job.runner, "run_job", run_job)
    err = io.StringIO()
    monkeypatch.setattr(rx, "_REAL_STDERR", err)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.star").write_text("data_\nloop_\n_rlnImageName\n1@a.mrcs\n")
    root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    core_handlers = logging.getLogger("cdae_em").handlers[:]
    try:
        code = rx.main(["--o", "External/job001/", "--in_parts", "p.star", "--K", "3", "--j", "1"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("cdae_em").handlers[:] = core_handlers
    lines = err.getvalue().strip().splitlines()
    assert code == 1 and exit_files(tmp_path / JOB.replace("012", "001")) == {rf.EXIT_FAILURE}
    assert len(lines) == 1 and lines[0].startswith("ERROR: out of") and "internal error" not in lines[0], lines
