"""PNG figures a user looks at first: class averages with counts, raw / denoised pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cdae_em.io.atomic_write import atomic_path

log = logging.getLogger(__name__)


def raw_denoised_pairs(denoised_star: Path, original_star: str | Path, project_dir: str | None,
                       n_pairs: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    """A few (raw, denoised) image pairs spread over the data set ([] if they cannot be read)."""
    from cdae_em.io.images import ImageSource

    try:
        with ImageSource(denoised_star, project_dir=project_dir) as d, \
                ImageSource(original_star, project_dir=project_dir) as r:
            pick = np.linspace(0, d.n - 1, min(n_pairs, d.n)).astype(int)
            return list(zip(r.read(pick), d.read(pick)))
    except Exception as exc:  # a figure is a convenience: never fail finished work for it
        log.warning("figure: no raw/denoised pairs (%s)", exc)
        return []


def gallery(path: Path, averages: np.ndarray | None, counts: np.ndarray | None,
            pairs: list[tuple[np.ndarray, np.ndarray]], agreement: np.ndarray | None = None,
            selected: np.ndarray | None = None, scores: np.ndarray | None = None) -> None:
    """Write a PNG: class averages titled with their particle counts (if given), class scores
    and the agreement of their denoised particles (``cdae_em.core.quality``; red when low), framed
    in green where ``selected`` (the automatic class selection), then the pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 0 if averages is None else len(averages)
    cols = max(min(k, 8), len(pairs), 1)
    rows = (k + cols - 1) // cols
    total_rows = max(rows + (2 if pairs else 0), 1)
    fig, axes = plt.subplots(total_rows, cols, figsize=(1.6 * cols, 1.7 * total_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(k):
        ax = axes[i // cols, i % cols]
        ax.imshow(averages[i], cmap="gray")
        head = f"class {i + 1}: {counts[i]}" + ("" if scores is None else f", score {scores[i]:.2f}")
        if agreement is None:
            ax.set_title(head, fontsize=8 if scores is None else 7)
        else:
            from cdae_em.core.quality import LOW_AGREEMENT

            ax.set_title(f"{head}\ndenoised r={agreement[i]:.2f}", fontsize=7,
                         color="red" if agreement[i] < LOW_AGREEMENT else "black")
        if selected is not None and selected[i]:
            ax.axis("on")
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color("limegreen")
                side.set_linewidth(3)
    for j, (raw, den) in enumerate(pairs):
        axes[rows, j].imshow(raw, cmap="gray")
        axes[rows, j].set_title("raw" if j == 0 else "", fontsize=8)
        axes[rows + 1, j].imshow(den, cmap="gray")
        axes[rows + 1, j].set_title("denoised" if j == 0 else "", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
