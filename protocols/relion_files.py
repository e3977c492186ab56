"""RELION-side files of the External job: their names, which RELION wrote the project (output-node
flavour), STAR files as RELION writes them, and ``RELION_OUTPUT_NODES.star``. The Class2D-style
``run_it000_*`` files are in ``relion_class2d``.

Everything here is derived from the core job's outputs and written under a temporary name, then
renamed. Where each table layout comes from in RELION's source is noted next to it (RELION 3.1.4 /
4.0.2 / 5.0.1).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from cdae_em.io.atomic_write import partial_name
from cdae_em.io.atomic_write import write_text as atomic_write

log = logging.getLogger(__name__)

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"

ROOT = "run_it000"  # the Class2D-style file root: run_it000_{optimiser,model,data}.star, _classes.mrcs
RELION_FILES = (OUTPUT_NODES, f"{ROOT}_optimiser.star", f"{ROOT}_model.star", f"{ROOT}_data.star",
                f"{ROOT}_classes.mrcs")

FLAVOURS = ("3.1", "4", "5")

# Node types per flavour. 5.0.1 src/pipeline_jobs.h: LABEL_CLASS2D_PARTS, LABEL_CLASS2D_OPT,
# LABEL_PARTS_CPIPE, LABEL_SELECT_CLAVS; 4.0.2 src/pipeline_jobs.h: the same names with the 4.0
# strings (its top-level types ParticlesData/ProcessData/ImagesData name the .Nodes/ directories
# that 4.0's GUI browses, and 5.0 renamed them); 3.1.4 src/pipeline_jobs.h: integer NODE_* codes
# (NODE_PART_DATA 3, NODE_2DREFS 5, NODE_MODEL 8, NODE_OPTIMISER 9). 3.1's Subset selection takes a
# *_model.star (NODE_MODEL), 4/5's an *_optimiser.star (LABEL_OPTIMISER_CPIPE).
NODE_TYPES = {
    "5": {"class2d_particles": "ParticleGroupMetadata.star.relion.class2d",
          "particles": "ParticleGroupMetadata.star.relion",
          "optimiser": "OptimiserData.star.relion.class2d",
          "class_averages": "Image2DGroupMetadata.star.relion.classaverages"},
    "4": {"class2d_particles": "ParticlesData.star.relion.class2d",
          "particles": "ParticlesData.star.relion",
          "optimiser": "ProcessData.star.relion.optimiser.class2d",
          "class_averages": "ImagesData.star.relion.classaverages"},
    "3.1": {"class2d_particles": 3, "particles": 3, "model": 8, "optimiser": 9, "class_averages": 5},
}


# ------------------------------------------------------------------------------------------------
# Which RELION is this?
# ------------------------------------------------------------------------------------------------
_VERSION = re.compile(r"^#\s*version\s+(\d+)", re.M)


def _head(path: Path, n: int = 20000) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read(n)
    except OSError:
        return None


def _version(text: str) -> int | None:
    m = _VERSION.search(text)
    return int(m.group(1)) if m else None


def detect_flavour(out_dir: Path, in_parts: str | None, project_dir: Path | None = None) -> tuple[str, str]:
    """The output-node flavour ("3.1", "4" or "5") of the RELION running this job, and why.

    Signals, most reliable first:
    1. ``OUT/job.star``, which RELION writes into the job directory before it launches the job
       (pipeliner.cpp ``PipeLine::runJob``: ``_job.write(_job.outputName)``): 5.0 writes
       ``# version 50001`` (metadata_table.h CURRENT_MDT_VERSION), 4.0 ``# version 30001`` with
       ``_rlnJobTypeLabel``, 3.1 ``_rlnJobType`` (an integer) and no label (``RelionJob::write``).
    2. the project's ``default_pipeline.star``: 5.0 has ``_rlnPipeLineNodeTypeLabelDepth``
       (``PipeLine::write``), 4.0 only ``_rlnPipeLineNodeTypeLabel``, 3.1 ``_rlnPipeLineNodeType``.
    3. the input STAR file's version line: 50001 is RELION 5; 30001 is written by both 3.1 and
       4.0, and is taken as 4; no version line (RELION 3.0 or a converted file) as 5.
    """
    project_dir = Path(project_dir or os.getcwd())
    text = _head(out_dir / "job.star")
    if text and "data_job" in text:
        version = _version(text) or 0
        if version >= 50000:
            return "5", f"{out_dir / 'job.star'} has '# version {version}' (RELION 5)"
        if "_rlnJobTypeLabel" in text:
            return "4", f"{out_dir / 'job.star'} has _rlnJobTypeLabel and '# version {version}' (RELION 4)"
        if "_rlnJobType" in text:
            return "3.1", f"{out_dir / 'job.star'} has an integer _rlnJobType (RELION 3.1)"
    text = _head(project_dir / "default_pipeline.star")
    if text and "data_pipeline_nodes" in text:
        if "_rlnPipeLineNodeTypeLabelDepth" in text or (_version(text) or 0) >= 50000:
            return "5", "default_pipeline.star is RELION 5's (node type label depths)"
        if "_rlnPipeLineNodeTypeLabel" in text:
            return "4", "default_pipeline.star has node type labels without depths (RELION 4)"
        if "_rlnPipeLineNodeType" in text:
            return "3.1", "default_pipeline.star has integer node types (RELION 3.1)"
    if in_parts:
        text = _head(project_dir / in_parts) if not Path(in_parts).is_absolute() else _head(Path(in_parts))
        if text is not None:
            version = _version(text)
            if version is not None and version >= 50000:
                return "5", f"{in_parts} has '# version {version}' (RELION 5)"
            if version is not None:
                return "4", f"{in_parts} has '# version {version}' (RELION 3.1 or 4; taken as 4)"
    return "5", "no RELION version found in the job or project files (taken as 5)"


# ------------------------------------------------------------------------------------------------
# STAR files the way RELION writes them (through the core's starfile-based writer)
# ------------------------------------------------------------------------------------------------
def write_relion_star(path: Path, blocks: dict[str, dict | list[dict]], version: int, comment: str | None = None) -> None:
    """Write a STAR file atomically: a dict is a list block (``_label value``), a list of dicts a
    loop; every block preceded by ``# version N`` as RELION's MetaDataTable::write does."""
    import pandas as pd

    from cdae_em.io.star import star_text

    tables = {name: pd.DataFrame(block) if isinstance(block, list) else block for name, block in blocks.items()}
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    atomic_write(path, head + star_text(tables, f"# version {version}"))


def remove_relion_files(out_dir: Path) -> None:
    """Remove the files this module writes (before a run, and after an abort)."""
    for name in RELION_FILES:
        (out_dir / name).unlink(missing_ok=True)
        partial_name(out_dir / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# RELION_OUTPUT_NODES.star
# ------------------------------------------------------------------------------------------------
def output_nodes(job: str, flavour: str, selected: bool = False) -> list[tuple[str, str | int]]:
    """(node name, node type) for every output RELION should register; ``job`` is the --o
    directory as RELION gave it (project-relative, ending in '/'); ``selected``: the job selected
    classes (particles_selected.star, a particle set Class3D / Refine3D take)."""
    types = NODE_TYPES[flavour]
    nodes = [
        (job + "particles.star", types["class2d_particles"]),
        *([(job + "particles_selected.star", types["particles"])] if selected else []),
        (job + "denoised_particles.star", types["particles"]),
        (job + f"{ROOT}_optimiser.star", types["optimiser"]),
        (job + "class_averages.star", types["class_averages"]),
    ]
    if flavour == "3.1":  # 3.1's Subset selection opens a *_model.star (NODE_MODEL)
        nodes.insert(3, (job + f"{ROOT}_model.star", types["model"]))
    return nodes


def write_output_nodes(out_dir: Path, job: str, flavour: str, selected: bool = False) -> list[tuple[str, str | int]]:
    """RELION_OUTPUT_NODES.star, read by pipeliner.cpp ``PipeLine::getOutputNodesFromStarFile``:
    table ``output_nodes`` with ``_rlnPipeLineNodeName`` and ``_rlnPipeLineNodeTypeLabel`` (4.0.2,
    5.0.1) or the integer ``_rlnPipeLineNodeType`` (3.1.4)."""
    nodes = output_nodes(job, flavour, selected)
    column = "rlnPipeLineNodeType" if flavour == "3.1" else "rlnPipeLineNodeTypeLabel"
    rows = [{"rlnPipeLineNodeName": name, column: kind} for name, kind in nodes]
    write_relion_star(out_dir / OUTPUT_NODES, {"output_nodes": rows}, star_version(flavour))
    return nodes


def star_version(flavour: str) -> int:
    """The ``# version`` of the STAR files that RELION writes (metadata_table.h CURRENT_MDT_VERSION)."""
    return 50001 if flavour == "5" else 30001
