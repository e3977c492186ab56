"""Scipion protocol "cdae-em - denoise and classify 2D": a thin adapter around ``cdae-em run``.

Steps: convert the input SetOfParticles to a STAR file (``scipion_convert``), run the core job as
a subprocess (``<python> -m cdae_em run ...``, its log in the protocol's run log), then turn the
job's output files into Scipion sets: ``outputParticles`` (the denoised
particles), ``outputClasses`` (SetOfClasses2D of the input particles, each with its 2D alignment
to its class; representative = class average; the classes the automatic selection rejects are
disabled), ``outputSelectedParticles`` (the selected classes' input particles, aligned; absent
where no class was selected) and ``outputAverages`` (SetOfAverages).
"""

from __future__ import annotations

import json
import os
import subprocess
from enum import Enum

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.object import Float
from pyworkflow.protocol.constants import STEPS_SERIAL
from pwem.objects import Particle, SetOfAverages, SetOfClasses2D, SetOfParticles
from pwem.protocols import ProtClassify2D

from cdae_em.job.result import JobResult
from cdae_em.settings import RUN, setting, settings_tree

from . import scipion_convert as convert
from .scipion_form import PHASE_FLIP, form_args, tree as _tree

METHODS = list(setting("classify.method").option.choices)
JOB_DIR = "cdae"  # the job's output directory, under the protocol's extra/
# the selected classes' input particles (where a class was selected): a second SetOfParticles,
# so not in ``outputs`` (an Enum member of the same value would be an alias of outputParticles)
SELECTED_OUTPUT = "outputSelectedParticles"
MIN_CLASSES = 2  # the core refuses fewer


class outputs(Enum):
    outputParticles = SetOfParticles
    outputClasses = SetOfClasses2D
    outputAverages = SetOfAverages


class ProtCdaeDenoiseClassify2D(ProtClassify2D):
    """Denoise particles with a cascade of denoising autoencoders (CDAE; Lei & Yang 2021),
    fine-tuned on the particles themselves, then sort them into 2D classes up to in-plane rotation
    and shift. Outputs the denoised particles, the 2D classes (input particles with their
    alignment to the class average) and the class averages of the original particles."""

    _label = "denoise and classify 2D"
    _devStatus = BETA
    _possibleOutputs = outputs
    _references = ["Lei2021"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stepsExecutionMode = STEPS_SERIAL

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      label="Input particles", important=True,
                      help="Particles to denoise and classify (MRC stacks are read where they "
                           "are; other formats are converted to MRC first).")
        form.addParam("numberOfClasses", params.IntParam, **_tree("numberOfClasses"),
                      validators=[params.GE(MIN_CLASSES, "At least 2 classes")],
                      label="Number of classes", important=True)
        form.addParam("method", params.EnumParam, choices=METHODS, **_tree("method"),
                      display=params.EnumParam.DISPLAY_HLIST, label="Initial clustering")
        form.addParam("numberOfIterations", params.IntParam, **_tree("numberOfIterations"),
                      validators=[params.GE(0)], label="Alignment rounds")
        form.addParam("selectThreshold", params.FloatParam, **_tree("selectThreshold"),
                      validators=[params.Range(0, 1, "The class score lies between 0 and 1")],
                      label="Select classes scoring at least")
        form.addParam("whiten", params.BooleanParam, **_tree("whiten"), expertLevel=params.LEVEL_ADVANCED,
                      label="Whiten the noise for alignment?")
        form.addParam("splitMerge", params.IntParam, **_tree("splitMerge"), validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Merge-and-split moves")
        form.addParam("subsetPerClass", params.IntParam, **_tree("subsetPerClass"), validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Particles per class to find the classes on")
        form.addParam("psiStep", params.FloatParam, **_tree("psiStep"), validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="In-plane angular step (deg)")
        form.addParam("maxShift", params.FloatParam, **_tree("maxShift"), expertLevel=params.LEVEL_ADVANCED,
                      label="Largest shift (px)")

        form.addSection(label="Denoising")
        form.addParam("referenceVolume", params.PointerParam, pointerClass="Volume",
                      allowsNull=True, label="Reference volume (optional)",
                      help="An initial model of the particle: the cascade is pre-trained on "
                           "simulated projections of it before fine-tuning. Empty: start from "
                           "the pre-trained weights.")
        form.addParam("weightsFile", params.FileParam, allowsNull=True, **_tree("weightsFile"),
                      condition="not referenceVolume", label="Pre-trained weights (optional)")
        form.addParam("doFinetune", params.BooleanParam, **_tree("doFinetune"),
                      label="Fine-tune on these particles?")
        form.addParam("finetuneEpochs", params.IntParam, **_tree("finetuneEpochs"), condition="doFinetune",
                      validators=[params.GE(0)], label="Fine-tuning epochs per block")
        form.addParam("neighbours", params.IntParam, **_tree("neighbours"), condition="doFinetune",
                      validators=[params.GE(1)], label="Neighbours (k)")
        form.addParam("finetuneSubset", params.IntParam, **_tree("finetuneSubset"), condition="doFinetune",
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(1)],
                      label="Fine-tuning particles")
        form.addParam("forceModel", params.BooleanParam, **_tree("forceModel"), expertLevel=params.LEVEL_ADVANCED,
                      label="Keep the model's output if a plain filter does better?")
        form.addParam("phaseFlip", params.EnumParam, choices=PHASE_FLIP, **_tree("phaseFlip"),
                      display=params.EnumParam.DISPLAY_HLIST, label="CTF phase flip first?")
        form.addParam("workingScale", params.EnumParam, choices=list(setting("denoise.scale").option.choices),
                      **_tree("workingScale"), display=params.EnumParam.DISPLAY_HLIST,
                      expertLevel=params.LEVEL_ADVANCED, label="Working scale")
        form.addParam("workingBox", params.IntParam, **_tree("workingBox"), expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.GE(0)], label="Working box (px)")
        form.addParam("seed", params.IntParam, **_tree("seed"), expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed")

        form.addHidden(params.USE_GPU, params.BooleanParam, default=True,
                       label="Use GPU?", help="Run on a GPU (CUDA build of PyTorch), else CPU.")
        form.addHidden(params.GPU_LIST, params.StringParam, default="0", label="GPU ID",
                       help="GPU IDs, e.g. 0 or 0 1 2 3: with several, the job runs as one process per GPU "
                            "(torchrun on this node) and shares the work between them.")
        form.addParallelSection(threads=4, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.runCdaeStep)
        self._insertFunctionStep(self.createOutputStep)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        n = convert.particles_to_star(self._getInputParticles(), self._getInputStar(),
                                      convert_dir=self._getExtraPath("input_stacks"))
        self.info(f"wrote {n} particles to {self._getInputStar()}")

    def runCdaeStep(self):
        from cdae_em.runtime.progress import STATUS_FILE

        from .scipion_plugin import Plugin

        os.makedirs(self._getJobPath(), exist_ok=True)  # the job writes its status.json there
        if os.path.exists(self._getJobPath(STATUS_FILE)):
            os.remove(self._getJobPath(STATUS_FILE))  # an earlier run's
        try:
            self.runJob(Plugin.getProgram(), self._getRunArgs(), env=Plugin.getEnviron(),
                        numberOfMpi=1, numberOfThreads=1)
        except subprocess.CalledProcessError as exc:
            reason = job_error(self._getJobPath()) or f"exit status {exc.returncode}"
            raise RuntimeError(f"cdae-em failed: {reason} (details in the run log)") from None

    def createOutputStep(self):
        inputSet = self._getInputParticles()
        job = self._getJobPath()
        pixel = float(inputSet.getSamplingRate())
        self._pixel = pixel
        projectDir = os.getcwd()

        # class averages
        self._classInfo = {}
        averages = self._createSetOfAverages()
        averages.copyInfo(inputSet)
        averages.setAlignment2D()
        for row in convert.read_star_rows(self._getJobPath("class_averages.star"), block=None):
            index, path = convert.parse_image_name(row.rlnReferenceImage)
            path = convert.resolve_image_path(path, job, projectDir)
            classId = int(row.rlnClassNumber)
            self._classInfo[classId] = (index, path, float(row.rlnClassDistribution), float(row.rlnClassScore))
            average = Particle()
            average.setObjId(classId)
            average.setLocation(index, path)
            average.setSamplingRate(pixel)
            average.setClassId(classId)
            averages.append(average)

        # classes of the input particles, each particle aligned to its class average
        self._alignment = convert.read_alignment(self._getJobPath("particles.star"))
        classes = self._createSetOfClasses2D(self.inputParticles)
        classes.classifyItems(updateItemCallback=self._updateClassifiedParticle,
                              updateClassCallback=self._updateClass)

        # denoised particles
        self._denoised = {}
        for row in convert.read_star_rows(self._getJobPath("denoised_particles.star")):
            index, path = convert.parse_image_name(row.rlnImageName)
            self._denoised[int(row.rlnImageId)] = (index, convert.resolve_image_path(path, job, projectDir))
        optics = convert.read_optics(self._getJobPath("denoised_particles.star"))
        newPixel = float(optics[0].rlnImagePixelSize)
        self._shiftScale = pixel / newPixel
        self._denoisedPixel = newPixel
        denoised = self._createSetOfParticles()
        denoised.copyInfo(inputSet)
        denoised.setSamplingRate(newPixel)
        # as the job decided it (auto: flipped where the particles had CTF values and were not flipped)
        denoised.setIsPhaseFlipped(JobResult.load(job).phase_flipped or inputSet.isPhaseFlipped())
        denoised.copyItems(inputSet, updateItemCallback=self._updateDenoisedParticle)

        defined = {outputs.outputParticles.name: denoised, outputs.outputClasses.name: classes,
                   outputs.outputAverages.name: averages}
        # the automatic selection: the selected classes' input particles, aligned to their class
        selectedStar = self._getJobPath("particles_selected.star")
        if os.path.exists(selectedStar):
            self._selectedIds = {int(r.rlnImageId) for r in convert.read_star_rows(selectedStar)}
            selected = self._createSetOfParticles(suffix="selected")
            selected.copyInfo(inputSet)
            selected.setAlignment2D()
            selected.copyItems(inputSet, updateItemCallback=self._updateSelectedParticle)
            defined[SELECTED_OUTPUT] = selected
        self._defineOutputs(**defined)
        self._defineTransformRelation(self.inputParticles, denoised)  # same particles, denoised
        for name, output in defined.items():
            if name != outputs.outputParticles.name:
                self._defineSourceRelation(self.inputParticles, output)

    # --------------------------- callbacks -----------------------------------
    def _updateClassifiedParticle(self, item, row):
        try:
            classId, psi, originX, originY = self._alignment[item.getObjId()]
        except KeyError:
            raise RuntimeError(f"particle {item.getObjId()} is missing from "
                               f"{self._getJobPath('particles.star')}") from None
        item.setClassId(classId)
        convert.set_alignment_2d(item, psi, originX, originY, self._pixel)

    def _updateSelectedParticle(self, item, row):
        if item.getObjId() not in self._selectedIds:
            item._appendItem = False
            return
        self._updateClassifiedParticle(item, row)

    def _updateClass(self, item):
        classId = item.getObjId()
        item.setAlignment2D()
        if classId in self._classInfo:
            index, path, distribution, score = self._classInfo[classId]
            item.getRepresentative().setLocation(index, path)
            item.getRepresentative().setSamplingRate(self._pixel)
            item._cdaeClassDistribution = Float(distribution)
            item._cdaeClassScore = Float(score)  # rlnClassScore; classes below the threshold are disabled
            item.setEnabled(score >= self.selectThreshold.get())

    def _updateDenoisedParticle(self, item, row):
        location = self._denoised.get(item.getObjId())
        if location is None:
            item._appendItem = False
            return
        item.setLocation(location)
        item.setSamplingRate(self._denoisedPixel)
        if self._shiftScale != 1.0 and item.hasTransform():
            item.getTransform().scaleShifts(self._shiftScale)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = []
        particles = self._getInputParticles()
        if particles is None:
            return ["Input particles are missing."]
        n = particles.getSize()
        k = self.numberOfClasses.get()
        if k is None or k < MIN_CLASSES:
            errors.append(f"Number of classes must be at least {MIN_CLASSES}.")
        elif k > n:
            errors.append(f"Number of classes ({k}) is larger than the number of input "
                          f"particles ({n}).")
        if self.doFinetune and self.neighbours.get() is not None and self.neighbours.get() < 1:
            errors.append("Neighbours (k) must be at least 1.")
        if particles.getXDim() is not None and particles.getXDim() < 8:
            errors.append("Particles must be at least 8 pixels wide.")
        ref = self._getReferenceVolumeFile()
        if ref is not None and not convert.is_mrc(ref):
            errors.append(f"Reference volume {ref} is not an MRC file; convert it to MRC first.")
        weights = self.weightsFile.get()
        if weights and not self.referenceVolume.get() and not os.path.exists(weights):
            errors.append(f"Weights file {weights} does not exist.")
        if self.usesGpu() and not self.getGpuList():
            errors.append("Give a GPU ID, or set 'Use GPU?' to No.")
        return errors

    def _warnings(self):
        warnings = []
        particles = self._getInputParticles()
        if particles is not None and self.doFinetune and self.neighbours.get() >= particles.getSize():
            warnings.append("Neighbours (k) is not smaller than the number of particles: every "
                            "fine-tuning target will be the mean of all particles.")
        return warnings

    def _summary(self):
        summary = []
        if self.hasAttribute(outputs.outputClasses.name):
            summary.append(f"Input particles: {self.getObjectTag('inputParticles')}")
            summary.append(f"Classified into *{self.numberOfClasses.get()}* classes "
                           f"({METHODS[self.method.get()]}).")
            info = self._readSummary()
            sizes = info.get("class_sizes")
            if sizes:
                summary.append("Class sizes: " + ", ".join(str(s) for s in sizes))
            check = info.get("denoise", {}).get("selfcheck", {})
            if check.get("warning"):
                summary.append("Denoiser self-check: " + check["warning"])
            timings = info.get("timings", {})
            if "total" in timings:
                summary.append(f"cdae-em ran for {timings['total']:.1f} s.")
        else:
            summary.append("Outputs are not ready yet.")
        return summary

    def _methods(self):
        if not self.hasAttribute(outputs.outputClasses.name):
            return []
        particles = self._getInputParticles()
        finetune = (f"fine-tuned on these particles ({self.finetuneEpochs.get()} epochs per "
                    f"block, targets from {self.neighbours.get()} nearest neighbours)"
                    if self.doFinetune else "without fine-tuning")
        return [
            f"The {particles.getSize()} particles of {self.getObjectTag('inputParticles')} were "
            f"denoised with a cascade of denoising autoencoders [Lei2021] (cdae-em), {finetune}, "
            f"and classified into {self.numberOfClasses.get()} 2D classes "
            f"({METHODS[self.method.get()]} clustering, then {self.numberOfIterations.get()} "
            f"rounds of in-plane alignment and re-assignment). Output classes: "
            f"{self.getObjectTag(outputs.outputClasses.name)}."
        ]

    def _citations(self):
        return ["Lei2021"]

    # --------------------------- UTILS functions -----------------------------
    def _getInputParticles(self):
        return self.inputParticles.get()

    def _getInputStar(self):
        return self._getExtraPath("input_particles.star")

    def _getJobPath(self, *paths):
        return self._getExtraPath(JOB_DIR, *paths)

    def getGalleryPath(self):
        return self._getJobPath("gallery.png")

    def getSummaryPath(self):
        return self._getJobPath("summary.json")

    def _readSummary(self) -> dict:
        try:
            with open(self.getSummaryPath()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _getReferenceVolumeFile(self):
        volume = self.referenceVolume.get()
        if volume is None:
            return None
        return volume.getFileName()

    def _getRunArgs(self) -> list[str]:
        """``cdae-em run`` arguments: the form's settings (each form parameter that sets a setting
        of the tree, see ``cdae_em.settings``), the input and output, threads and GPUs."""
        args = ["run", "--i", self._getInputStar(), "--o", self._getJobPath(),
                "--j", max(1, self.numberOfThreads.get()), "--overwrite"]
        ref = self._getReferenceVolumeFile()
        if ref is not None:
            args += ["--ref", os.path.abspath(convert.split_format_hint(ref)[0])]
        for s in settings_tree(RUN):
            name = s.option.scipion
            if name is None or (name == "weightsFile" and ref is not None):
                continue
            args += form_args(s, getattr(self, name).get())
        if self.usesGpu():
            args += ["--gpu", ",".join(str(g) for g in self.getGpuList())]  # several: one process each (torchrun)
        return [str(a) for a in args]


def job_error(job_dir: str) -> str:
    """What went wrong, as the job recorded it in its status.json (empty if it did not get that far)."""
    from cdae_em.runtime.progress import read_status

    status = read_status(job_dir)
    return (status.error or "") if status is not None and status.state != "running" else ""
