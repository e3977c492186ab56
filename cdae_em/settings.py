"""The settings tree: every setting of a job, and every option a user can set, declared once.

``JobSettings`` is the root; ``denoise`` (``DenoiseSettings``, with its ``train`` branch) and
``classify`` (``ClassifySettings``) are its branches. A field that users may set carries an
``Option`` in its metadata (made with ``option()``): its flags, help, bounds, the job kinds
(``run``, ``denoise``, ``classify``) that take it, and how the front ends name it. Its default is
the field's default in the tree. Everything else is generated from this module or checked
against it by a test: the ``cdae-em run|denoise|classify`` parsers (``cdae_em.commands.options``),
the RELION External job's parameters and template, the Scipion form and workflow template.

To add an option: add the field with ``option(...)`` to the branch that uses it; the command line
and the RELION job take it from there (the Scipion form only where you add it to the form).

This module imports nothing heavy (no torch), so that ``--help`` and front ends load it fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

RUN, DENOISE, CLASSIFY = "run", "denoise", "classify"
JOB_KINDS = (RUN, DENOISE, CLASSIFY)
ALL = JOB_KINDS


@dataclass(frozen=True)
class Option:
    """How a user sets one field of the tree (the field's default is the option's default)."""

    flags: tuple[str, ...]  # command-line spellings; the first is the option's name
    help: str  # what it does, one or two sentences; "(default: ...)" is added where shown
    kinds: tuple[str, ...] = ALL  # job kinds (commands) that take it
    group: str = "job"  # help section: "classification", "denoising" or "job"
    minimum: float | None = None  # smallest value allowed
    above: bool = False  # the minimum itself is not allowed (a positive number)
    maximum: float | None = None  # largest value allowed
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    unset: str = ""  # what no value (None) means, for the help: "the particles' box"
    required: bool = False  # the command line must give it
    also: tuple[str, ...] = ()  # other fields of the tree set to the same value (one seed for all)
    # RELION External parameter labels; None: the flags without dashes; (): not a RELION parameter
    relion: tuple[str, ...] | None = None
    scipion: str | None = None  # the Scipion form parameter that sets it
    suggested: Any = None  # the value templates show for a required option (K)

    @property
    def name(self) -> str:
        return self.flags[0]

    def bound_problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this option's bounds, or None."""
        return bound_problem(value, self.minimum, self.above, self.maximum)

    @property
    def relion_labels(self) -> tuple[str, ...]:
        if self.relion is not None:
            return self.relion
        return tuple(f.lstrip("-").replace("-", "_") for f in self.flags)


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **how: Any) -> Any:
    """A dataclass field that users may set (see ``Option``)."""
    metadata = {"option": Option(**how)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------------
# the tree
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """How one cascade block is trained. The paper: RMSprop, MSE, 20 epochs."""

    epochs: int = option(20, flags=("--epochs",), group="denoising", minimum=0, kinds=(RUN, DENOISE),
                         scipion="finetuneEpochs",
                         help="fine-tuning epochs per cascade block (the paper used 20)")
    batch_size: int = 32
    lr: float = option(1e-3, flags=("--lr",), group="denoising", minimum=0, above=True, kinds=(RUN, DENOISE),
                       help="fine-tuning learning rate")
    optimizer: str = option("rmsprop", flags=("--optimizer",), group="denoising", choices=("rmsprop", "adam"),
                            kinds=(RUN, DENOISE), help="fine-tuning optimiser")
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class DenoiseSettings:
    """The denoising stage (``cdae-em denoise``, and stage 1 of ``cdae-em run``)."""

    weights: str | None = option(None, flags=("--weights",), group="denoising", metavar="FILE", kinds=(RUN, DENOISE),
                                 scipion="weightsFile", unset="the shipped pre-trained weights",
                                 help="cascade weights (a cdae_weights.pt from `cdae-em pretrain`)")
    # fine-tuning on the user's particles (the paper's step 2). Off by default: with the shipped
    # weights the held-out check rejected it on every benchmark stack (docs/denoiser.md)
    finetune: bool = option(False, flags=("--finetune",), group="denoising", kinds=(RUN, DENOISE),
                            relion=("finetune", "fine_tune"), scipion="doFinetune",
                            help="fine-tune the weights on these particles first (the paper's step; with the "
                                 "shipped weights it did not help on held-out data, see docs/denoiser.md)")
    k: int = option(30, flags=("--neighbours", "--k"), group="denoising", minimum=1, metavar="N", kinds=(RUN, DENOISE),
                    relion=("neighbours", "neighbors", "k"), scipion="neighbours",
                    help="neighbours per particle whose aligned mean is its fine-tuning target (paper: 30)")
    max_distance: float | None = option(None, flags=("--max-distance",), group="denoising", minimum=0, above=True,
                                        metavar="D", kinds=(RUN, DENOISE), unset="no threshold",
                                        help="ignore neighbours farther than this in feature space")
    finetune_subset: int = option(4000, flags=("--finetune-subset",), group="denoising", minimum=1, metavar="N",
                                  kinds=(RUN, DENOISE), scipion="finetuneSubset",
                                  help="particles that fine-tune each block (all if fewer)")
    n_components: int = 32  # PCA size of the invariant kNN features
    psi_step: float = 5.0  # degrees, rotational search when aligning neighbours
    train: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=3))
    equalise: bool = option(False, flags=("--equalise",), group="denoising", kinds=(RUN, DENOISE),
                            help="write histogram-equalised denoised stacks (the paper's enhancement step; off: "
                                 "faithful images; classification equalises for its own use either way)")
    contrast: str = option("auto", flags=("--contrast",), group="denoising", choices=("auto", "bright", "dark"),
                           kinds=(RUN, DENOISE),
                           help="protein bright (RELION extraction with inverted contrast) or dark (raw "
                                "micrographs); auto picks the one whose output correlates better with the clean images (estimated); "
                                "the output keeps the input's contrast")
    check: bool = option(True, flags=("--check",), group="denoising", kinds=(RUN, DENOISE),
                         help="check fine-tuning on held-out particles (estimated correlation with the clean images) and fall back to the "
                              "pre-trained cascade where it did not help (the check against reference filters "
                              "runs either way, see --force-model)")
    force_model: bool = option(False, flags=("--force-model",), group="denoising", kinds=(RUN, DENOISE),
                               scipion="forceModel",
                               help="write (and classify) the model's output even where the self-check finds that "
                                    "a plain reference filter (ring mean, Gaussian blur) does better on these "
                                    "particles; by default the job then uses the best reference filter instead")
    mask_diameter: float | None = option(None, flags=("--mask-diameter",), group="denoising", minimum=0, above=True,
                                         metavar="A", kinds=(RUN, DENOISE), unset="90% of the box",
                                         help="particle mask diameter, Angstrom")
    # CTF phase flipping before denoising and alignment. None (auto): when every particle has CTF
    # values and the images are not phase-flipped already (rlnCtfDataArePhaseFlipped)
    phase_flip: bool | None = option(None, flags=("--phase-flip",), scipion="phaseFlip",
                                     unset="auto: when every particle has CTF values and rlnCtfDataArePhaseFlipped "
                                           "is not 1",
                                     help="CTF phase-flip the particles before denoising and alignment")
    # noise whitening before clustering and alignment (cdae_em.core.noise); the denoiser sees the
    # particles as they are (whitening its input cost 0-0.4 dB: docs/notes.md)
    whiten: bool = option(True, flags=("--whiten",), group="classification", kinds=(RUN, CLASSIFY), scipion="whiten",
                          help="whiten the particles' noise (its spectrum measured on the background, per optics "
                               "group) before clustering and alignment; the images written are not whitened")
    # the working scale: "auto" Fourier-crops particles larger than the weights were trained on
    # (the job decides ``box``); "native" keeps the particles' box; ``box`` overrides both
    scale: str = option("auto", flags=("--scale",), group="denoising", choices=("auto", "native"), kinds=(RUN, DENOISE),
                        scipion="workingScale",
                        help="working scale: auto Fourier-crops (bins) the particles so that the particle is as "
                             "many pixels across as in the weights' training (its diameter from --mask-diameter, "
                             "else estimated from the data), where it is larger; native keeps the particles' box. "
                             "Outputs for 3D work (particles.star shifts, class averages) stay at the native box")
    box: int | None = option(None, flags=("--box",), group="denoising", minimum=8, kinds=(RUN, DENOISE),
                             scipion="workingBox", unset="chosen by --scale",
                             help="working box: Fourier-crop (bin) or pad the particles to this size")
    batch_size: int = option(128, flags=("--batch-size",), group="job", minimum=1, also=("classify.batch_size",),
                             help="images per batch; smaller needs less (GPU) memory")
    seed: int = 0


@dataclass
class ClassifySettings:
    """The classification stage (``cdae-em classify``, and stage 2 of ``cdae-em run``)."""

    n_classes: int = option(0, flags=("--K",), group="classification", kinds=(RUN, CLASSIFY), required=True,
                            relion=("K", "classes", "n_classes"), scipion="numberOfClasses", suggested=20,
                            help="number of classes")
    method: str = option("kmeans", flags=("--method",), group="classification", choices=("kmeans", "hierarchical"),
                         kinds=(RUN, CLASSIFY), scipion="method",
                         help="clustering of the rotation/shift-invariant features that starts the classification")
    n_iter: int = option(10, flags=("--iter",), group="classification", minimum=0, kinds=(RUN, CLASSIFY),
                         relion=("iterations", "iter", "n_iter"), scipion="numberOfIterations",
                         help="rounds of alignment and re-assignment (at most; coarse to fine)")
    psi_step: float = option(5.0, flags=("--psi-step",), group="classification", minimum=0, above=True,
                             kinds=(RUN, CLASSIFY), scipion="psiStep", help="in-plane angular step, degrees")
    max_shift: float | None = option(None, flags=("--max-shift",), group="classification", minimum=0,
                                     kinds=(RUN, CLASSIFY), scipion="maxShift", unset="box / 8",
                                     help="largest shift searched, pixels of the working box")
    n_components: int = 32
    hc_max: int = 5000
    batch_size: int = 128
    seed: int = 0
    # coarse to fine: every round but the last ``fine_rounds`` searches psi at twice psi_step and
    # frequencies below ``coarse_band`` cycles/pixel (about 3x cheaper at the defaults)
    fine_rounds: int = 2
    settled: float = 0.01  # coarse rounds end early once fewer than this fraction of particles change class
    coarse_band: float = 0.1875
    fine_band: float = 0.25
    # what picks a particle's class, psi and shift in the rounds: "distance", the least-squares
    # distance to the reference (its scale fixed, so a fragment or empty box is nearer a faint junk
    # average than a particle's; see multiref._score), or "correlation", the normalised CC
    criterion: str = "distance"
    rescore: int = 4  # the references matching best within the band compared at full resolution (1: none)
    # each round compares a particle in full (its band, psi step, shifts) with only the ``shortlist``
    # references that match it best in a cheaper search over all K, below ``shortlist_band`` at
    # 4 x psi_step. The cost of a round then grows with K through the cheaper search alone (0: every
    # reference in full)
    shortlist: int = 8
    shortlist_band: float = 0.125
    # merge-and-split moves tried after the coarse rounds, and with the CTF again after the fine ones
    # (0: none); each is kept only if it helps, and the first that does not ends them (see cdae_em.classify.splitmerge)
    split_merge: int = option(3, flags=("--split-merge",), group="classification", minimum=0, kinds=(RUN, CLASSIFY),
                              scipion="splitMerge",
                              help="merge-and-split moves tried after the coarse rounds (and, for particles with "
                                   "CTF, again after the fine rounds), to undo two views sharing a class while "
                                   "another is split; each is kept only if it lowers the classes' squared error "
                                   "(0: none)")
    move_rounds: int = 4  # coarse rounds after a move, before it is judged
    subset_per_class: int = option(100, flags=("--subset-per-class",), group="classification", minimum=0,
                                   kinds=(RUN, CLASSIFY), scipion="subsetPerClass", metavar="N",
                                   help="with more than N x K particles, the classes are found on a random "
                                        "N x K of them, then the last fine rounds assign every particle "
                                        "(the cost of a large job then grows with K, not with the particle "
                                        "count; 0: every particle in every round)")
    center_classes: bool = True  # shift each class average's centre of mass to the box centre (RELION's --center_classes)
    # with the particles' |CTF| (phase-flipped images), the fine rounds compare each particle with the
    # references multiplied by its |CTF| (the coarse rounds and moves compare plain images)
    ctf_aware: bool = True
    # what the rounds align to: "always" the references Wiener-filtered by their SSNR (from the FRC
    # of each class's two half averages), "never" the plain references, "choose" both: the coarse
    # rounds and moves run twice from the same start and the run with the higher k-means objective
    # goes on (see docs/notes.md)
    ssnr_filter: str = "always"


@dataclass
class JobSettings:
    """Everything a job needs; every front end fills one in (see ``build``)."""

    particles: str = option("", flags=("--i",), metavar="STAR", required=True, relion=(),
                            help="input particles STAR file")
    out_dir: str = option("", flags=("--o",), metavar="DIR", required=True, relion=(), help="output directory")
    denoise: DenoiseSettings = field(default_factory=DenoiseSettings)
    classify: ClassifySettings = field(default_factory=ClassifySettings)
    align_on: str = option("original", flags=("--align-on",), group="classification", choices=("original", "denoised"),
                           kinds=(RUN,),
                           help="images the alignment rounds use: the original particles (classes still start "
                                "from the denoised ones, whose detail is smoothed away) or the denoised ones")
    # class averages from CTF phase-flipped originals; None: as the particles are (see phase_flip)
    average_phase_flipped: bool | None = option(None, flags=("--average-phase-flipped",), group="classification",
                                                kinds=(RUN,), unset="when the particles are phase-flipped",
                                                help="class averages from CTF phase-flipped originals")
    # automatic class selection (cdae_em.job.selection); not part of the signature: a rerun with
    # another threshold resumes and selects again (as `cdae-em select` does)
    select_threshold: float = option(0.5, flags=("--select-threshold",), group="classification", minimum=0,
                                     maximum=1, metavar="X", kinds=(RUN, CLASSIFY), relion=("select_threshold",),
                                     scipion="selectThreshold",
                                     help="classes whose score (rlnClassScore, 0-1) is at least this are selected: "
                                          "particles_selected.star and class_averages_selected.star")
    classes_from: str | None = option(None, flags=("--classes-from",), group="classification", metavar="STAR",
                                      kinds=(RUN, CLASSIFY), unset="none: the job classifies",
                                      help="take each particle's class, psi and origin from this STAR file (e.g. "
                                           "RELION Class2D's _data.star; rows matched by rlnImageName) instead "
                                           "of classifying, and score and select those classes as the job does "
                                           "its own")
    project_dir: str | None = option(None, flags=("--project-dir",), metavar="DIR", relion=(),
                                     unset="the working directory", help="directory that image paths are relative to")
    reference_map: str | None = option(None, flags=("--ref",), metavar="MAP", kinds=(RUN, DENOISE), relion=(),
                                       unset="none", help="pre-train on this map (an initial model) before fine-tuning")
    pretrain_particles: int = option(3000, flags=("--pretrain-particles",), minimum=1, kinds=(RUN, DENOISE),
                                     help="views of --ref simulated for pre-training")
    pretrain_epochs: int = option(10, flags=("--pretrain-epochs",), minimum=1, kinds=(RUN, DENOISE),
                                  help="passes over those views for block 1 when pre-training on --ref (a third of "
                                       "that for blocks 2 and 3)")
    gpu: str | None = option(None, flags=("--gpu",), metavar="IDS", relion=(), unset="CPU",
                             help="CUDA device, e.g. 0; several, e.g. 0,1,2,3: one process per device (torchrun), "
                                  "the work shared between them")
    threads: int = option(1, flags=("--j",), minimum=1, metavar="N", relion=(),
                          help="number of CPU threads, as RELION's --j")
    overwrite: bool = option(False, flags=("--overwrite",), relion=(),
                             help="replace a different job's outputs in --o")
    seed: int = option(0, flags=("--seed",), also=("denoise.seed", "denoise.train.seed", "classify.seed"),
                       scipion="seed",
                       help="random seed; the same seed gives the same result")
    stages: str = "all"  # "all"; "denoise" (cdae-em denoise); "classify": the particles as they are
    keep_work: bool = option(False, flags=("--keep-work",), kinds=(RUN, DENOISE), relion=(),
                             help="keep the intermediate arrays in --o/.cdae_work (removed when denoising has "
                                  "finished otherwise; their size is logged)")

    @property
    def n_classes(self) -> int:
        """K, the number of classes (``classify.n_classes``)."""
        return self.classify.n_classes

    def signature(self) -> str:
        """A hash of what determines the result (not threads, device or overwrite): a rerun with
        the same signature resumes; a different one is refused unless ``overwrite``. The particle
        file counts by its path, size and modification time: a STAR file rewritten in place (new
        particles under the old name) is a different job, never resumed from stale stages."""
        d = dataclasses.asdict(self)
        for key in ("gpu", "threads", "overwrite", "out_dir", "keep_work", "select_threshold"):
            d.pop(key)
        particles = Path(self.particles).resolve()
        d["particles"] = str(particles)
        if particles.is_file():
            stat = particles.stat()
            d["particles_file"] = [stat.st_size, stat.st_mtime_ns]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def bound_problem(value: Any, minimum: float | None = None, above: bool = False,
                  maximum: float | None = None) -> str | None:
    """What is wrong with ``value`` for the bounds ``minimum`` (excluded with ``above``) and
    ``maximum``, or None where it lies within them."""
    if minimum is not None and (value <= minimum if above else value < minimum):
        if minimum == 0:
            return f"must be {'positive' if above else '0 or more'}, got {value}"
        return f"must be {'more than' if above else 'at least'} {minimum:g}, got {value}"
    if maximum is not None and value > maximum:
        return f"must be at most {maximum:g}, got {value}"
    return None


# ------------------------------------------------------------------------------------------------
# walking the tree
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One user-settable field of the tree: where it is, its option, type and default."""

    path: str  # e.g. "denoise.train.epochs"
    option: Option
    type: type  # int, float, str or bool
    optional: bool  # None is allowed (means ``option.unset``)
    default: Any

    @property
    def tristate(self) -> bool:
        """Yes / No / auto (None)."""
        return self.type is bool and self.optional


def _fields(cls: type, instance: Any, prefix: str) -> Iterator[Setting]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(type(value), value, f"{prefix}{f.name}.")
            continue
        opt = f.metadata.get("option")
        if opt is None:
            continue
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        base = args[0] if args else hints[f.name]
        yield Setting(f"{prefix}{f.name}", opt, base, type(None) in typing.get_args(hints[f.name]), value)


def settings_tree(kind: str | None = None) -> list[Setting]:
    """Every user-settable field, in declaration order; with ``kind``, those that job kind takes."""
    found = list(_fields(JobSettings, JobSettings(), ""))
    return [s for s in found if kind is None or kind in s.option.kinds]


def setting(path: str) -> Setting:
    """The setting at ``path`` (e.g. "classify.n_iter")."""
    for s in settings_tree():
        if s.path == path:
            return s
    raise KeyError(path)


def get(settings: Any, path: str) -> Any:
    """The value at ``path`` in a settings tree."""
    for part in path.split("."):
        settings = getattr(settings, part)
    return settings


def _replace(node: Any, parts: list[str], value: Any) -> Any:
    if len(parts) == 1:
        return dataclasses.replace(node, **{parts[0]: value})
    return dataclasses.replace(node, **{parts[0]: _replace(getattr(node, parts[0]), parts[1:], value)})


def build(values: dict[str, Any], **job: Any) -> JobSettings:
    """A ``JobSettings`` from the tree's defaults with ``values`` ({path: value}) set, each also in
    its option's ``also`` fields; ``job`` sets fields of the root that are not options (stages)."""
    settings = JobSettings(**job)
    known = {s.path: s for s in settings_tree()}
    for path, value in values.items():
        if path not in known:
            raise KeyError(f"{path}: not a setting")
        for target in (path, *known[path].option.also):
            settings = _replace(settings, target.split("."), value)
    return settings


def from_dict(data: dict, cls: type = JobSettings) -> Any:
    """The settings tree that ``dataclasses.asdict`` gave ``data`` (e.g. summary.json's "settings")
    back as dataclasses; keys the tree does not know are ignored (files of other versions)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs[f.name] = from_dict(value, type(default)) if dataclasses.is_dataclass(default) else value
    return cls(**kwargs)
