"""The result of a job, as one object: what the job did (its settings with every "auto" decided,
the denoising stage's choices, class sizes, timings) and where it put it. Front ends read this
instead of reading the job's files again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdae_em.errors import InputError
from cdae_em.settings import JobSettings, from_dict

SUMMARY = "summary.json"
# the output contract: nothing partial is ever left under these names
CONTRACT = ("particles.star", "denoised_particles.star", "class_averages.mrcs", "class_averages.star",
            "summary.json", "gallery.png")
# the automatic class selection's files: written where some class is selected (same guarantee)
SELECTION = ("particles_selected.star", "class_averages_selected.star")


@dataclass(frozen=True)
class JobResult:
    """What a finished job did and where it put it (``run_job``'s return value, or ``load``)."""

    out_dir: Path
    settings: JobSettings  # as the job ran: phase flipping and the averages' flipping decided
    particles: int
    timings: dict[str, float]
    denoise: dict | None = None  # the denoising stage's record: contrast, self-check, fine-tuning kept
    class_sizes: list[int] | None = None  # classes by size, class 1 first
    box: int | None = None  # box of the class averages and the alignment origins, pixels
    pixel_size: float | None = None  # Angstrom, of the class averages
    half_sets: dict | None = None  # per-class half-set FRC / SSNR (metrics.HalfSetStats.to_json)
    working_scale: dict | None = None  # --scale auto: the particles' diameter, the box chosen and why
    summary: dict = field(default_factory=dict, repr=False)  # summary.json, whole

    @property
    def phase_flipped(self) -> bool:
        """Whether the job phase-flipped the particles (denoised stacks and alignment)."""
        return bool(self.settings.denoise.phase_flip)

    @property
    def averages_phase_flipped(self) -> bool:
        """Whether the class averages are of phase-flipped particles."""
        return bool(self.settings.average_phase_flipped)

    @property
    def files(self) -> dict[str, Path]:
        """The output contract's files this job wrote, by name."""
        return {name: self.out_dir / name for name in CONTRACT + SELECTION if (self.out_dir / name).exists()}

    @classmethod
    def from_summary(cls, summary: dict, out_dir: str | Path) -> JobResult:
        return cls(out_dir=Path(out_dir), settings=from_dict(summary["settings"]), particles=summary["particles"],
                   timings=summary.get("timings", {}), denoise=summary.get("denoise"),
                   class_sizes=summary.get("class_sizes"), box=summary.get("box"),
                   pixel_size=summary.get("pixel_size"), half_sets=summary.get("half_sets"),
                   working_scale=summary.get("working_scale"), summary=summary)

    @classmethod
    def load(cls, out_dir: str | Path) -> JobResult:
        """The result of the finished job in ``out_dir`` (for front ends that ran it in another
        process, as Scipion does)."""
        path = Path(out_dir) / SUMMARY
        try:
            summary: dict[str, Any] = json.loads(path.read_text())
            return cls.from_summary(summary, out_dir)
        except FileNotFoundError:
            raise InputError(path, "not found: the job did not finish") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(path, f"not a cdae-em summary ({type(exc).__name__}: {exc})") from None
