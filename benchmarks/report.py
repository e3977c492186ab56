"""The benchmark report: Markdown tables, figures (PNG next to the report), the machine's description
and docs/benchmarks.md itself, from the results of ``benchmarks.tables``."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.config import Config
from benchmarks.datasets import Dataset

COMMENTARY = Path(__file__).resolve().parent / "commentary.md"


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats to 3 decimals (no decimals from 100 up), non-finite as n/a."""
    def fmt(v):
        if isinstance(v, float):
            if not np.isfinite(v):
                return "n/a"
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def figure_examples(ds: Dataset, denoised: dict, path: Path, n: int = 6) -> None:
    """Noisy, clean and denoised examples of a data set, one column per image, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = set(np.flatnonzero(np.isfinite([est[:, 0, 0] for est in denoised.values()]).all(axis=0)).tolist())
    idx = []
    for v in range(ds.n_views)[:n]:
        members = np.flatnonzero(ds.views == v)
        if len(members):
            in_sub = [i for i in members if i in sub]
            idx.append(int(in_sub[0] if in_sub else members[0]))
    names = ["clean"] + [k for k in denoised]
    fig, axes = plt.subplots(len(names), len(idx), figsize=(1.3 * len(idx), 1.3 * len(names)))
    for r, name in enumerate(names):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            if name == "clean":
                im = ds.clean[i]
            else:
                est = denoised[name]
                im = est[i]
            if np.isfinite(im).all():
                ax.imshow(im, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name.split(" (")[0].replace("CDAE, shipped weights, no fine-tuning", "CDAE no FT")
                              .replace("CDAE fine-tuned", "CDAE FT")[:16], fontsize=6)
    fig.suptitle(f"{ds.name}: one particle per view, histogram-equalised outputs", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_scale(scale: list, knn: list, path: Path) -> None:
    """Wall time and memory of `cdae-em run`, and kNN time, against the number of particles, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for label in dict.fromkeys(r[-1] for r in scale):
        sub = [r for r in scale if r[-1] == label]
        n = [r[0] for r in sub]
        axes[0].plot(n, [r[1] for r in sub], "o-", label=f"total ({label})")
        axes[0].plot(n, [r[2] for r in sub], "s--", label=f"denoise ({label})")
        axes[0].plot(n, [r[3] for r in sub], "^:", label=f"classify ({label})")
        axes[1].plot(n, [r[4] for r in sub], "o-", label=label)
    if scale:
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("particles")
        axes[0].set_ylabel("seconds")
        axes[0].set_title("`cdae-em run` wall time")
        axes[0].legend(fontsize=5)
        axes[1].legend(fontsize=6)
        axes[1].set_xscale("log")
        axes[1].set_ylim(0, max(r[4] for r in scale) * 1.3)
        axes[1].set_xlabel("particles")
        axes[1].set_ylabel("peak RSS (MiB)")
        axes[1].set_title("`cdae-em run` peak memory")
    if knn:
        axes[2].plot([r[0] for r in knn], [r[1] for r in knn], "o-")
        axes[2].set_xscale("log")
        axes[2].set_yscale("log")
        axes[2].minorticks_off()
        axes[2].set_xticks([r[0] for r in knn], [f"{r[0] / 1000:g}k" for r in knn])
    for ax in axes[:2]:
        ns = sorted({r[0] for r in scale})
        if ns:
            ax.minorticks_off()
            ax.set_xticks(ns, [f"{n / 1000:g}k" for n in ns])
    axes[2].set_xlabel("N (32-d features)")
    axes[2].set_ylabel("seconds")
    axes[2].set_title("exact kNN (k=30), nearest_neighbours")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """One line: CPU, cores and the versions of the libraries that matter for speed."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import sklearn

    try:
        import skimage

        sk = skimage.__version__
    except ImportError:
        sk = "absent"
    return (f"CPU: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, scikit-image {sk}")


def grid(d: dict) -> str:
    """A calibration grid (factor -> PSNR) as text."""
    return ", ".join(f"{float(k):g}: {v:.2f} dB" for k, v in d.items())


def scale_section(cfg: Config) -> str:
    """The scale tables of docs/scale.json (``python -m benchmarks.scale``: kNN at 10^5-10^6 vectors,
    `cdae-em run` at 2,000-32,000 particles in 1 and 2 processes, streamed inference), as they are
    also in docs/scale.md; empty in the tiny mode or before any was measured."""
    from benchmarks.scale import RESULTS, report

    if cfg.mode == "tiny" or not RESULTS.exists():
        return ""
    body = report(json.loads(RESULTS.read_text())).split("\n", 1)[1].replace("\n## ", "\n### ")
    return ("## Scale at 2,000-32,000 particles and kNN at 10^5-10^6 vectors\n\nFrom docs/scale.json, measured by "
            "`python -m benchmarks.scale` (its own commands; the same tables as [scale.md](scale.md)):\n" + body + "\n")


def write_report(path: Path, cfg: Config, args, r: dict, t1_header, t2_header, figs) -> None:
    """The Markdown report at ``path`` from the results ``r`` (and benchmarks/commentary.md)."""
    cmd = "python -m benchmarks.run" + {"quick": " --quick", "tiny": " --tiny", "full": ""}[cfg.mode]
    runs = "\n".join(f"    {c}    # {m} min" for c, m in r.get("commands", [[cmd, round(r['seconds'] / 60, 1)]]))
    parts = [f"# Benchmarks\n\nGenerated on {time.strftime('%Y-%m-%d')} ({r['threads']} threads) by\n\n{runs}\n\n"
             f"{r['machine']}.\n"]
    if COMMENTARY.exists() and cfg.mode != "tiny":
        parts.append(COMMENTARY.read_text())
    parts.append("## Data sets\n\nSimulated with `cdae_em.simulate.simulator` from the structures in `benchmarks/data/` "
                 "(provenance: `benchmarks/data/PROVENANCE.md`), box "
                 f"{cfg.box}, pixel size chosen so the particle's largest diameter spans 60% of the box.\n\n"
                 "- **paper**: 4 fixed views, no in-plane rotation, no shifts, no CTF, SNR 0.1 (the CDAE paper's protocol);\n"
                 "- **realistic**: 12 fixed views, random in-plane rotation, random shifts up to 4 px, CTF "
                 "(300 kV, Cs 2.7 mm, 10% amplitude contrast, defocus 1-3 um), SNR 0.05.\n\n"
                 + md_table(["data set", "particles", "views (K)", "A/px", "SNR", "simulation s"], r["datasets"]) + "\n")
    if r.get("calibration"):
        c = r["calibration"]
        parts.append("Peer settings: BM3D gets the true noise sigma; TV weight and NLM h are multiples of the true "
                     "noise sigma, picked by PSNR on a separate calibration set (the default map, 4JSV, paper "
                     f"protocol, {cfg.calib_n} images): TV weight {c['tv']:g} sigma "
                     f"(PSNR by factor: {grid(c['tv_grid'])}), NLM h {c['nlm']:g} sigma (PSNR by factor: "
                     f"{grid(c['nlm_grid'])}). The cascade gets nothing tuned: shipped weights; its fine-tuned rows run "
                     "`cdae-em denoise --finetune --no-phase-flip` with k 30, 3 epochs per block, subset 4000, except "
                     "in rows marked '(quick FT)'.\n")
    if r["table1"]:
        parts.append("## Table 1: denoising\n\n'(quick FT)' after a data set: the CDAE rows used the quick "
                     "fine-tuning settings (`--k 20 --epochs 1 --finetune-subset 80`, 5 classification rounds) instead "
                     "of the defaults (k 30, 3 epochs, subset 4000). PSNR (`cdae_em.core.metrics.psnr`, both images standardised, peak = "
                     "the clean image's range) and FRC resolution (0.5 threshold, `metrics.frc` over the stack) "
                     "against the clean image (for the realistic protocol the clean image includes the CTF); "
                     "(eq) = after the histogram equalisation `cdae-em denoise` applies. Time per 1000 images "
                     "on this CPU (fine-tuned CDAE: the whole `cdae-em denoise`, fine-tuning included).\n\n"
                     + md_table(t1_header, r["table1"]) + "\n")
    if r["table2"]:
        parts.append("## Table 2: clustering\n\nK = number of true views. Hungarian = classes matched one-to-one "
                     "with views, macro-averaged; pairs = pair-counting precision/recall/F1. Rows with "
                     "the classification (`cdae_em.classify.stage`) include the rotation/shift-aware initial features and "
                     "rounds of alignment to class averages; 'alignment only' is that classification on the raw "
                     "particles. These rows call the classification directly: `cdae-em run` as users run it "
                     "(classes from the denoised particles, alignment of the phase-flipped originals) is measured "
                     "next to RELION in docs/class2d.md.\n\n"
                     + md_table(t2_header, r["table2"]) + "\n")
    if r["speed"]:
        parts.append("## Speed\n\nInference of the three-block cascade (batches of 64, fp32, no grad) against the "
                     "FLOP floor: FLOPs per image counted by `torch.utils.flop_counter.FlopCounterMode`, peak = a "
                     "2048^2 fp32 `torch.mm` at the same thread count.\n\n"
                     + md_table(["threads", "GFLOP/s (2048^2 fp32 mm)"], r["peak"]) + "\n\n"
                     + md_table(["box", "threads", "GFLOP/image (3 blocks)", "images/s", "floor images/s",
                                 "fraction of floor"], r["speed"]) + "\n\n"
                     "Exact kNN (`nearest_neighbours`, in `cdae_em.core.neighbours` since the split of align.py, k=30, 32-d features, "
                     f"{r['threads']} threads):\n\n" + md_table(["N", "seconds"], r["knn"]) + "\n\n"
                     "`python -m benchmarks.simulate_speed`:\n\n" + r["simulate_speed"] + "\n")
    if r["scale"]:
        parts.append("## Scale: `cdae-em run`\n\nRealistic protocol, first protein (1BHL), K = 12; settings: "
                     "`cdae-em run` defaults (no fine-tuning since 0.3; `--k --epochs --finetune-subset` are passed "
                     "but unused without `--finetune`; 5 classification rounds); "
                     f"{r['threads']} threads; wall time and peak RSS of the child process (benchmarks.measure).\n\n"
                     + md_table(["particles", "wall s", "denoise s", "classify s", "peak RSS MiB", "ms / particle",
                                 "simulation s", "settings"], r["scale"]) + "\n")
    parts.append(scale_section(cfg))
    if figs:
        parts.append("## Figures\n\n" + "\n\n".join(f"![{f.stem}]({f.name})" for f in figs) + "\n")
    path.write_text("\n".join(parts))
