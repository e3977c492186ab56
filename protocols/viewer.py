"""Scipion viewer of the cdae-em protocol: the job's gallery (class averages, raw/denoised pairs)
and its metrics (class sizes and distribution, alignment scores per round, fine-tuning losses,
timings). Registered through ``cdae_em.viewers`` (where pyworkflow looks for a plugin's viewers).

The views do nothing until shown, so they can be built (and tested) without a display.
"""

from __future__ import annotations

import json
import os

import pyworkflow.viewer as pwviewer

from .protocol_classify2d import ProtCdaeDenoiseClassify2D


class GalleryView(pwviewer.View):
    """The job's gallery.png in a matplotlib window."""

    def __init__(self, path: str, title: str = "cdae-em gallery"):
        super().__init__()
        self.path = os.path.abspath(path)
        self.title = title

    def show(self):
        import matplotlib.image as mpimg
        from pwem.viewers.plotter import EmPlotter

        plotter = EmPlotter(x=1, y=1, mainTitle=self.title, windowTitle=self.title)
        axes = plotter.createSubPlot("", "", "")
        axes.imshow(mpimg.imread(self.path))
        axes.set_axis_off()
        plotter.show()


def metrics_lines(summary: dict) -> list[str]:
    """A readable account of a job's summary.json."""
    lines = []
    n = summary.get("particles")
    sizes = summary.get("class_sizes") or []
    if n is not None:
        lines.append(f"particles: {n}")
    if summary.get("box"):
        lines.append(f"box: {summary['box']} px at {summary.get('pixel_size', 0):.3f} A/px")
    if sizes:
        total = sum(sizes) or 1
        lines.append(f"classes: {len(sizes)}")
        lines += [f"  class {k:3d}: {s:7d} particles ({100.0 * s / total:5.1f} %)"
                  for k, s in enumerate(sizes, 1)]
    if summary.get("mean_alignment_score") is not None:
        lines.append(f"mean alignment score: {summary['mean_alignment_score']:.4f}")
    for entry in summary.get("classify") or []:
        lines.append(f"  round {entry.get('iteration')}: mean score {entry.get('mean_score', float('nan')):.4f}, "
                     f"changed class {100.0 * entry.get('changed', 0.0):.1f} %")
    finetune = (summary.get("denoise") or {}).get("finetune") or []
    for entry in finetune:
        if isinstance(entry, dict):
            lines.append("  fine-tuning " + ", ".join(f"{k}={v}" for k, v in entry.items()
                                                      if not isinstance(v, (list, dict))))
    timings = summary.get("timings") or {}
    if timings:
        lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return lines


class CdaeViewer(pwviewer.Viewer):
    """Gallery and metrics of a cdae-em denoise-and-classify run."""

    _label = "cdae-em gallery and metrics"
    _targets = [ProtCdaeDenoiseClassify2D]
    _environments = [pwviewer.DESKTOP_TKINTER]

    def _visualize(self, obj, **kwargs):
        views = []
        gallery = obj.getGalleryPath()
        if os.path.exists(gallery):
            views.append(GalleryView(gallery, title=f"cdae-em: {obj.getRunName()}"))
        summaryPath = obj.getSummaryPath()
        if os.path.exists(summaryPath):
            with open(summaryPath) as f:
                lines = metrics_lines(json.load(f))
            metrics = self._getTmpPath(f"cdae_metrics_{obj.getObjId()}.txt")
            os.makedirs(os.path.dirname(metrics) or ".", exist_ok=True)
            with open(metrics, "w") as f:
                f.write("\n".join(lines) + "\n")
            views.append(pwviewer.TextView([metrics], title="cdae-em metrics",
                                           tkParent=self.getTkRoot()))
        if not views:
            views.append(pwviewer.MessageView("The cdae-em run has no gallery or summary yet.",
                                              title="cdae-em", tkParent=self.getTkRoot()))
        return views
