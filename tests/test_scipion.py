"""The Scipion plugin against real pyworkflow/pwem, headless.

Skipped (with the reason) only where pyworkflow/pwem are not installed, e.g. in the core test
environment; CI runs this file again in an environment with ``cdae-em[scipion]``, where
``CDAE_EM_REQUIRE_SCIPION=1`` turns the skip into a failure.

Scipion reads its configuration from the environment when pyworkflow is first imported, so the
environment is set up (in a temporary SCIPION_HOME / SCIPION_USER_DATA) before any import of it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

MISSING = [m for m in ("pyworkflow", "pwem") if importlib.util.find_spec(m) is None]
if MISSING and os.environ.get("CDAE_EM_REQUIRE_SCIPION") == "1":
    raise ImportError(f"CDAE_EM_REQUIRE_SCIPION=1 but {', '.join(MISSING)} not installed: "
                      "pip install -e '.[test,scipion]'")
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"Scipion not installed ({', '.join(MISSING)} missing): "
                                             "pip install -e '.[test,scipion]' to run these tests"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # pyparsing, via Scipion's bibtexparser
]

N_PARTICLES = 60
BOX = 32


@pytest.fixture(scope="module")
def scipion(tmp_path_factory):
    """pyworkflow and pwem imported with a throw-away Scipion configuration."""
    root = tmp_path_factory.mktemp("scipion")
    home, user_data = root / "home", root / "user_data"
    (home / "config").mkdir(parents=True)
    user_data.mkdir()
    env = {
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOME": str(home),
        "SCIPION_USER_DATA": str(user_data),
        "SCIPION_PYTHON": sys.executable,
        "SCIPION_TEST_NOSYNC": "1",
        "SCIPION_NOTIFY": "False",
        "SCIPION_CONFIG": str(home / "config" / "scipion.conf"),
    }
    if "pyworkflow" in sys.modules:
        assert sys.modules["pyworkflow"].Config.SCIPION_USER_DATA == os.environ.get("SCIPION_USER_DATA"), \
            "pyworkflow was imported before the test could configure it"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from pyworkflow.protocol.hosts import HostConfig

    HostConfig.writeBasic(str(home / "config" / "hosts.conf"))
    import pwem
    import pyworkflow

    yield pyworkflow, pwem
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def cdae_em(*args, cwd=None):
    subprocess.run([sys.executable, "-m", "cdae_em", *map(str, args)], check=True, cwd=cwd,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small simulated stack (3 views, in-plane rotations) and, while cdae-em ships no default
    weights, tiny pre-trained weights."""
    root = tmp_path_factory.mktemp("data")
    cdae_em("simulate", "--o", root / "sim", "--box", BOX, "--n", N_PARTICLES, "--views", 3,
            "--in-plane", "--snr", 0.5, "--seed", 1)
    from cdae_em.denoise.weights import default_weights_path

    weights = None
    if not Path(default_weights_path()).exists():
        cdae_em("pretrain", "--o", root / "weights", "--steps", "2,1,1", "--views", 8, "--box", BOX,
                "--channels", "8,16,32")
        weights = root / "weights" / "cdae_weights.pt"
    return root, weights


@pytest.fixture(scope="module")
def project(scipion, data):
    from pyworkflow.project import Manager
    from pwem.protocols import ProtImportParticles

    cwd = os.getcwd()
    project = Manager().createProject("cdae_em_test")
    os.chdir(project.getPath())
    try:
        root, _ = data
        imported = project.newProtocol(
            ProtImportParticles, objLabel="import simulated particles",
            importFrom=ProtImportParticles.IMPORT_FROM_FILES, filesPath=str(root / "sim"),
            filesPattern="particles.mrcs", samplingRate=8.4, voltage=300, sphericalAberration=2.7,
            amplitudeContrast=0.1, magnification=50000)
        project.launchProtocol(imported, wait=True)
        assert imported.isFinished(), imported.getErrorMessage()
        assert imported.outputParticles.getSize() == N_PARTICLES
        yield project, imported
    finally:
        os.chdir(cwd)


def new_cdae_protocol(project, imported, weights, **kwargs):
    from cdae_em.protocols.protocol_classify2d import ProtCdaeDenoiseClassify2D

    settings = dict(numberOfClasses=3, numberOfIterations=1, doFinetune=True, finetuneEpochs=1, neighbours=5,
                    finetuneSubset=N_PARTICLES, useGpu=False, numberOfThreads=1)
    if weights is not None:
        settings["weightsFile"] = str(weights)
    settings.update(kwargs)
    prot = project.newProtocol(ProtCdaeDenoiseClassify2D, **settings)
    prot.inputParticles.set(imported)
    prot.inputParticles.setExtended("outputParticles")
    return prot


# --- discovery ------------------------------------------------------------------------------------

def test_plugin_protocol_viewer_and_template_are_discovered(scipion):
    _, pwem = scipion
    import cdae_em

    plugins = pwem.Domain.getPlugins()
    assert "cdae_em" in plugins, f"cdae_em not among Scipion plugins {sorted(plugins)}"
    plugin = cdae_em._pluginInstance
    assert plugin.getName() == "cdae_em"

    protocols = pwem.Domain.getProtocols()
    assert "ProtCdaeDenoiseClassify2D" in protocols
    prot_class = protocols["ProtCdaeDenoiseClassify2D"]
    assert prot_class.getClassPackage() is cdae_em
    assert prot_class.getPlugin() is plugin
    from pwem.protocols import ProtClassify2D

    assert issubclass(prot_class, ProtClassify2D)

    viewers = pwem.Domain.getViewers()
    assert "CdaeViewer" in viewers
    assert prot_class in viewers["CdaeViewer"]._targets

    templates = {t.name: t for t in plugin.getTemplates()}
    assert "cdae_em_classify2d" in templates, f"templates found: {sorted(templates)}"
    assert "ProtCdaeDenoiseClassify2D" in templates["cdae_em_classify2d"].content

    # citation: the CDAE paper, from cdae_em/bibtex.py
    assert cdae_em._bibtex["Lei2021"]["doi"] == "10.3389/fgene.2020.627746"


def test_core_stays_free_of_scipion_and_plugin_hook_is_lazy():
    code = ("import sys, cdae_em, cdae_em.protocols, cdae_em.io.star, cdae_em.job.runner\n"
            "assert 'pwem' not in sys.modules and 'pyworkflow' not in sys.modules, 'Scipion imported'\n"
            "try:\n    cdae_em.NoSuchThing\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_template_loads_into_a_project(project):
    import cdae_em

    proj, _ = project
    template = next(t for t in cdae_em._pluginInstance.getTemplates() if t.name == "cdae_em_classify2d")
    template.replaceEnvVariables()
    template.parseContent()
    assert {p.getAlias() for p in template.getParams().values()} >= {"particlesPath", "classes", "useGpu"}
    assert template.setParamValue("classes", "7")
    path = template.createTemplateFile()
    try:
        loaded = proj.loadProtocols(path)
    finally:
        os.remove(path)
    loaded = list(loaded.values())
    classes = {p.getClassName(): p for p in loaded}
    assert set(classes) == {"ProtImportParticles", "ProtCdaeDenoiseClassify2D"}
    cdae = classes["ProtCdaeDenoiseClassify2D"]
    assert cdae.numberOfClasses.get() == 7
    assert cdae.inputParticles.getObjValue() is classes["ProtImportParticles"]
    for prot in loaded:
        proj.deleteProtocol(prot)


def _template_values(text: str) -> dict:
    """The workflow template's protocols as JSON, each ~label|value|type|alias~ replaced by its value."""
    import json
    import re

    body = text[text.index("["):]
    return {p["object.className"]: p for p in json.loads(re.sub(r"~[^|~]*\|([^|~]*)\|[^|~]*\|[^|~]*~", r"\1", body))}


def test_form_and_workflow_template_follow_the_settings_tree(project, monkeypatch):
    """Every form parameter that sets a cdae-em setting starts at the settings tree's default, the
    workflow template holds the same values, and the command the protocol runs with its defaults
    gives the tree's JobSettings. A default changed in the tree alone changes the form."""
    import inspect
    from importlib.resources import files

    from cdae_em.cli import build_parser
    from cdae_em.commands.options import job_settings
    from cdae_em.protocols.protocol_classify2d import ProtCdaeDenoiseClassify2D
    from cdae_em.protocols.scipion_form import form_default
    from cdae_em.settings import ClassifySettings, build, settings_tree

    proj, _ = project
    prot = proj.newProtocol(ProtCdaeDenoiseClassify2D, useGpu=False)
    named = [s for s in settings_tree("run") if s.option.scipion]
    assert {s.option.scipion for s in named} >= {"numberOfClasses", "numberOfIterations", "phaseFlip", "doFinetune"}
    for s in named:
        assert getattr(prot, s.option.scipion).get() == form_default(s), s.path
    template = _template_values(files("cdae_em.templates").joinpath("cdae_em_classify2d.json.template").read_text())
    in_template = template["ProtCdaeDenoiseClassify2D"]
    for s in named:
        if s.option.scipion in in_template:
            assert str(in_template[s.option.scipion]).lower() == str(form_default(s)).lower(), s.path
    assert "doPhaseFlip" not in in_template

    args = prot._getRunArgs()
    settings = job_settings(build_parser(only="run").parse_args(args), "run")
    assert settings == build({"particles": prot._getInputStar(), "out_dir": prot._getJobPath(),
                              "classify.n_classes": form_default(named[[s.path for s in named].index(
                                  "classify.n_classes")]), "threads": prot.numberOfThreads.get(), "overwrite": True})
    assert settings.denoise.phase_flip is None  # auto, as everywhere

    init = ClassifySettings.__init__
    names = list(inspect.signature(init).parameters)[1:]
    defaults = list(init.__defaults__)
    defaults[names.index("n_iter") - (len(names) - len(defaults))] = 7
    monkeypatch.setattr(init, "__defaults__", tuple(defaults))
    assert proj.newProtocol(ProtCdaeDenoiseClassify2D).numberOfIterations.get() == 7


# --- headless runs --------------------------------------------------------------------------------

def test_validate_rejects_too_many_classes(project, data):
    proj, imported = project
    prot = new_cdae_protocol(proj, imported, data[1], numberOfClasses=N_PARTICLES + 1)
    errors = prot.validate()
    assert any("larger than the number of input particles" in e for e in errors), errors
    assert new_cdae_protocol(proj, imported, data[1]).validate() == []


def test_run_creates_particles_classes_and_averages(project, data):
    proj, imported = project
    prot = new_cdae_protocol(proj, imported, data[1])
    proj.launchProtocol(prot, wait=True)
    assert prot.isFinished(), f"protocol failed: {prot.getErrorMessage()}"
    project_dir = Path(proj.getPath())

    particles = prot.outputParticles
    assert particles.getSize() == N_PARTICLES
    # imported from files, the particles have no CTF: the job did not flip them (auto), and the output
    # says what the job did, not what the form asked
    summary = json.loads(Path(prot.getSummaryPath()).read_text())
    assert summary["settings"]["denoise"]["phase_flip"] is False and not particles.isPhaseFlipped()
    assert particles.getSamplingRate() == pytest.approx(8.4)
    first = particles.getFirstItem()
    index, path = first.getLocation()
    assert "cdae" in path and (project_dir / path).exists()
    with mrcfile.mmap(project_dir / path, mode="r") as mrc:
        assert mrc.data.shape[-2:] == (BOX, BOX) and index <= mrc.data.shape[0]

    from emtable import Table

    classes = prot.outputClasses
    sizes = [cls.getSize() for cls in classes]
    assert 1 <= len(sizes) <= 3 and sum(sizes) == N_PARTICLES
    for cls in classes.iterItems():
        assert cls.hasAlignment2D()
        index, path = cls.getRepresentative().getLocation()
        with mrcfile.mmap(project_dir / path, mode="r") as mrc:
            average = np.asarray(mrc.data[index - 1])
        assert average.shape == (BOX, BOX) and np.isfinite(average).all() and average.std() > 0
        for particle in cls.iterItems():
            assert particle.getClassId() == cls.getObjId()
            assert particle.hasTransform()
            matrix = particle.getTransform().getMatrix()
            assert matrix.shape == (4, 4) and np.allclose(matrix[2, :3], [0, 0, 1])
            assert np.allclose(matrix[:2, :2] @ matrix[:2, :2].T, np.eye(2), atol=1e-5)

    # the automatic selection: rejected classes disabled, the selected classes' particles a set of their own
    scores = {int(r.rlnClassNumber): float(r.rlnClassScore)
              for r in Table.iterRows(f"{prot._getExtraPath('cdae', 'class_averages.star')}")}
    threshold = prot.selectThreshold.get()
    for cls in classes.iterItems():
        assert cls._cdaeClassScore.get() == pytest.approx(scores[cls.getObjId()])
        assert cls.isEnabled() == (scores[cls.getObjId()] >= threshold)
    chosen = {c for c, v in scores.items() if v >= threshold}
    if chosen:
        selected = prot.outputSelectedParticles
        ids = {int(r.rlnImageId) for r in Table.iterRows(f"particles@{prot._getExtraPath('cdae', 'particles_selected.star')}")}
        assert {p.getObjId() for p in selected.iterItems()} == ids
        assert all(p.getClassId() in chosen and p.hasTransform() for p in selected.iterItems())
    else:
        assert not prot.hasAttribute("outputSelectedParticles")

    averages = prot.outputAverages
    assert averages.getSize() == 3
    assert averages.getSamplingRate() == pytest.approx(8.4)

    # the alignment matches particles.star (RELION psi / origin conventions, as scipion-em-relion reads them)

    star = {int(r.rlnImageId): r for r in Table.iterRows(f"particles@{prot._getExtraPath('cdae', 'particles.star')}")}
    particle = classes.getFirstItem().getFirstItem()
    row = star[particle.getObjId()]
    matrix = particle.getTransform().getMatrix()
    psi = np.rad2deg(np.arctan2(matrix[1, 0], matrix[0, 0]))
    assert ((psi - row.rlnAnglePsi + 180) % 360) - 180 == pytest.approx(0, abs=1e-3)
    assert matrix[0, 3] == pytest.approx(row.rlnOriginXAngst / 8.4, abs=1e-4)
    assert matrix[1, 3] == pytest.approx(row.rlnOriginYAngst / 8.4, abs=1e-4)

    # relations, summary, methods, citations
    for name in ("outputParticles", "outputClasses", "outputAverages"):
        assert prot.hasAttribute(name)
    summary = "\n".join(prot.summary())
    assert "Classified into *3* classes" in summary and "Class sizes" in summary
    check = json.loads(Path(prot._getExtraPath("cdae", "summary.json")).read_text())["denoise"]["selfcheck"]
    assert check["written"] in ("model", check["best_reference"])
    assert ("Denoiser self-check: " + check["warning"] in summary) if "warning" in check else "self-check" not in summary
    assert "Lei2021" in "".join(prot.methods()) or "cascade of denoising autoencoders" in "".join(prot.methods())
    assert "Lei2021" in prot.getCitations()

    # the viewer: gallery and metrics
    from cdae_em.viewers import CdaeViewer

    viewer = CdaeViewer(project=proj, protocol=prot, tmpPath=str(project_dir / "Tmp"))
    views = viewer._visualize(prot)
    gallery = [v for v in views if hasattr(v, "path")]
    assert gallery and Path(gallery[0].path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = [v for v in views if hasattr(v, "getFileList")]
    metrics = Path(texts[0].getFileList()[0]).read_text()
    assert "classes: 3" in metrics and "particles: 60" in metrics


def test_too_many_classes_fail_the_protocol_with_a_readable_error(project, data):
    proj, imported = project
    prot = new_cdae_protocol(proj, imported, data[1], numberOfClasses=N_PARTICLES + 40)
    proj.launchProtocol(prot, wait=True)  # Scipion validates again when the run starts
    assert prot.isFailed()
    message = prot.getErrorMessage()
    assert f"Number of classes ({N_PARTICLES + 40}) is larger than the number of input particles ({N_PARTICLES})" \
        in message, message


def test_job_error_fails_the_protocol_with_cdae_em_s_message(project, data, tmp_path):
    proj, imported = project
    bad = tmp_path / "not_weights.pt"
    bad.write_bytes(b"this is not a weights file")
    prot = new_cdae_protocol(proj, imported, None, weightsFile=str(bad))
    assert prot.validate() == []
    proj.launchProtocol(prot, wait=True)
    assert prot.isFailed()
    message = prot.getErrorMessage()
    assert "cdae-em failed: " in message and str(bad) in message, message
    assert "Traceback" not in message and "non-zero exit status" not in message, message
