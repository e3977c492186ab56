"""The benchmark suite: denoising (Table 1), clustering (Table 2), speed and scale, in one command.

    python -m benchmarks.run [--quick | --tiny] [--out docs/benchmarks.md] [--j 2] [--work DIR]

Prints every table and writes them, with figures (PNG next to --out) and the machine's
description, into the Markdown file --out. See docs/benchmarks.md for what is measured and how.

Sizes: full (default): 4 x 1000 particles (paper protocol) and 4,000 over 12 views (realistic), per
protein; `cdae-em run` at 2k, 8k and 32k particles (--huge adds 128k). --quick: 400 / 480
particles per data set, `cdae-em run` at 2k; < 10 min on a 2-core CPU. --tiny: one protein, 32 px
box, a few dozen particles; a smoke test (tests/test_benchmarks.py), its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import methods as M
from benchmarks.datasets import PROTEINS, PROTOCOLS, Dataset, make_dataset

ROOT = Path(__file__).resolve().parent.parent
COMMENTARY = Path(__file__).resolve().parent / "commentary.md"


@dataclass
class Config:
    mode: str
    proteins: list
    n: dict  # protocol -> particles
    box: int = 64
    k: int = 30
    epochs: int = 3
    bm3d_n: int = 16
    cae_epochs: int = 5
    speed_boxes: tuple = (64, 128)
    speed_threads: tuple = (1, 2)
    speed_images: int = 256
    knn_n: tuple = (2000, 8000, 32000)
    run_n: tuple = (2000,)
    sim_speed_n: int = 500
    calib_n: int = 48
    finetune_subset: int = 4000  # `cdae-em denoise --finetune-subset` (its default: 4000)
    classify_iter: int = 5  # `cdae-em run --iter` (its default: 5)


def config(mode: str, huge: bool = False) -> Config:
    names = [p for p, _, _ in PROTEINS]
    if mode == "tiny":
        return Config(mode, names[:1], {"paper": 48, "realistic": 48}, box=32, k=8, epochs=1, bm3d_n=2,
                      cae_epochs=1, speed_boxes=(32,), speed_threads=(1,), speed_images=32, knn_n=(500, 1000),
                      run_n=(48,), sim_speed_n=0, calib_n=8, finetune_subset=24, classify_iter=1)
    if mode == "quick":
        return Config(mode, names, {"paper": 160, "realistic": 180}, k=20, epochs=1, bm3d_n=12, cae_epochs=5,
                      knn_n=(2000, 8000, 32000), run_n=(2000,), sim_speed_n=500, calib_n=32,
                      finetune_subset=80, classify_iter=5)
    return Config(mode, names, {"paper": 4000, "realistic": 4000}, bm3d_n=100, cae_epochs=10,
                  knn_n=(2000, 8000, 32000, 128000), run_n=(2000, 8000, 32000) + ((128000,) if huge else ()),
                  sim_speed_n=2000, calib_n=64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if not np.isfinite(v):
                return "n/a"
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# denoising
# ----------------------------------------------------------------------------------------------
def score_denoising(est: np.ndarray, clean: np.ndarray, pixel: float) -> tuple[float, float]:
    from cdae_em.metrics import frc, frc_resolution, psnr

    return float(psnr(est, clean).mean()), frc_resolution(frc(M.standardise(est), M.standardise(clean)), pixel)


def calibrate_peers(cfg: Config, work: Path) -> dict:
    """Pick TV weight and NLM h (as multiples of the noise sigma) on the default map (4JSV, the
    protein not in the benchmark), paper protocol; the same factors are used everywhere."""
    from cdae_em.simulate import SimulationSettings, load_source, simulate

    out = work / f"calib_{cfg.box}"
    if not (out / "simulation.json").exists():
        simulate(load_source(None, box=cfg.box), SimulationSettings(n_particles=cfg.calib_n, n_views=4, snrs=[0.1]), out)
    import mrcfile

    noisy = np.array(mrcfile.open(out / "particles.mrcs", permissive=True).data, dtype=np.float32)
    clean = np.array(mrcfile.open(out / "clean.mrcs", permissive=True).data, dtype=np.float32)
    sigma = M.noise_sigma_standardised(0.1)
    from cdae_em.metrics import psnr

    tv = {f: float(psnr(M.tv(noisy, sigma, f), clean).mean()) for f in (0.25, 0.5, 1.0, 2.0, 4.0)}
    nlm = {f: float(psnr(M.nlm(noisy, sigma, f), clean).mean()) for f in (0.4, 0.8, 1.2, 1.6)}
    best = {"tv": max(tv, key=tv.get), "nlm": max(nlm, key=nlm.get), "tv_grid": tv, "nlm_grid": nlm}
    log(f"peer calibration on 4JSV: {best}")
    return best


def denoise_finetuned(ds: Dataset, cfg: Config, j: int) -> tuple[np.ndarray, float]:
    """`cdae-em denoise` (default settings, fine-tuning on) on the data set; the un-equalised
    final block output and the seconds it took."""
    from cdae_em.commands import denoise as cmd

    parser = argparse.ArgumentParser()
    cmd.add_args(parser)
    out = ds.dir / "cdae_denoise"
    args = parser.parse_args(["--i", str(ds.star), "--o", str(out), "--keep-work", "--j", str(j),
                              "--k", str(cfg.k), "--epochs", str(cfg.epochs),
                              "--finetune-subset", str(cfg.finetune_subset)])
    t0 = time.perf_counter()
    final = out / ".cdae_work" / "block3.npy"
    if not final.exists():
        cmd.main(args)
    seconds = time.perf_counter() - t0
    return np.array(np.load(final, mmap_mode="r")), seconds


def table1_for(ds: Dataset, cfg: Config, calib: dict, model, j: int) -> tuple[list, dict]:
    """Rows: method, images, PSNR, PSNR eq, FRC res, FRC res eq, seconds/1000 images."""
    sigma = M.noise_sigma_standardised(ds.snr)
    box = ds.noisy.shape[-1]
    outputs: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}  # name -> (est, rows, seconds)
    all_rows = np.arange(len(ds.noisy))
    sub = np.linspace(0, len(ds.noisy) - 1, min(cfg.bm3d_n, len(ds.noisy))).astype(int)

    def timed(name, fn, rows):
        t0 = time.perf_counter()
        est = fn(ds.noisy[rows])
        outputs[name] = (est, rows, time.perf_counter() - t0)

    outputs["noisy input"] = (ds.noisy, all_rows, 0.0)
    timed(f"TV (Chambolle, weight {calib['tv']:g} sigma)", lambda x: M.tv(x, sigma, calib["tv"]), all_rows)
    timed(f"NLM (scikit-image, h {calib['nlm']:g} sigma)", lambda x: M.nlm(x, sigma, calib["nlm"]), all_rows)
    timed(f"BM3D (true sigma; {len(sub)} images)", lambda x: M.bm3d(x, sigma), sub)
    timed("single DAE (shipped block 1)", lambda x: M.cascade_apply(model, x, 1), all_rows)
    timed("CDAE, shipped weights, no fine-tuning", lambda x: M.cascade_apply(model, x, None), all_rows)
    est, sec = denoise_finetuned(ds, cfg, j)
    outputs["CDAE fine-tuned (`cdae-em denoise`)"] = (est, all_rows, sec)

    rows, kept = [], {}
    for name, (est, idx, sec) in outputs.items():
        clean = ds.clean[idx]
        p, r = score_denoising(est, clean, ds.pixel_size)
        eq = M.equalise(est, box)
        pe, re = score_denoising(eq, clean, ds.pixel_size)
        rows.append([ds.name, name, len(idx), p, pe, r, re, 1000 * sec / len(idx) if sec else float("nan")])
        kept[name] = eq
        if len(idx) != len(ds.noisy):  # a subset (BM3D): full-size array, NaN where not denoised
            full = np.full(ds.noisy.shape, np.nan, np.float32)
            full[idx] = eq
            kept[name] = full
    return rows, kept


# ----------------------------------------------------------------------------------------------
# clustering
# ----------------------------------------------------------------------------------------------
def table2_for(ds: Dataset, cfg: Config, model, denoised: dict, j: int) -> list:
    from cdae_em.classify import ClassifySettings, classify
    from cdae_em.metrics import clustering_scores

    k = ds.n_views
    flat = M.standardise(ds.noisy).reshape(len(ds.noisy), -1)
    out = []

    def add(name, fn):
        t0 = time.perf_counter()
        labels = fn()
        s = clustering_scores(ds.views, labels)
        out.append([ds.name, name, s["hungarian_precision"], s["hungarian_recall"], s["hungarian_f1"],
                    s["pair_precision"], s["pair_recall"], s["pair_f1"], s["ari"], s["nmi"],
                    time.perf_counter() - t0])

    def cls(images, method):
        return classify(np.ascontiguousarray(images), ClassifySettings(n_classes=k, method=method, n_iter=cfg.classify_iter, seed=0),
                        torch.device("cpu")).labels

    add("k-means, raw pixels", lambda: M.kmeans(flat, k))
    add("HC (Ward), raw pixels", lambda: M.ward(flat, k))
    add("PCA(32) + k-means", lambda: M.kmeans(M.pca(flat), k))
    add(f"CAE + k-means ({cfg.cae_epochs} epochs)", lambda: M.kmeans(M.cae_latent(ds.noisy, cfg.cae_epochs), k))
    dae = denoised["single DAE (shipped block 1)"]
    add("DAE + k-means (pixels)", lambda: M.kmeans(dae.reshape(len(dae), -1), k))
    cdae = denoised["CDAE fine-tuned (`cdae-em denoise`)"]
    add("CDAE + k-means (pixels, no alignment)", lambda: M.kmeans(cdae.reshape(len(cdae), -1), k))
    add("alignment only: `cdae-em classify` on raw", lambda: cls(ds.noisy, "kmeans"))
    add("CDAE + k-means (`cdae-em run`)", lambda: cls(cdae, "kmeans"))
    add("CDAE + HC (`cdae-em run --method hierarchical`)", lambda: cls(cdae, "hierarchical"))
    return out


# ----------------------------------------------------------------------------------------------
# speed and scale
# ----------------------------------------------------------------------------------------------
def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def block_flops(box: int) -> float:
    """FLOPs of one DAE block on one image (torch's FlopCounterMode: conv/matmul multiply-adds x 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cdae_em.cascade import DAEBlock

    block = DAEBlock().eval()
    x = torch.randn(4, box, box)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        block(x)
    return fc.get_total_flops() / 4


def speed_table(cfg: Config, model) -> tuple[list, list]:
    rows, peak = [], []
    for t in cfg.speed_threads:
        peak.append([t, matmul_gflops(t)])
    peak_of = dict((t, g) for t, g in peak)
    for box in cfg.speed_boxes:
        flops = 3 * block_flops(box)
        x = torch.randn(cfg.speed_images, box, box)
        for t in cfg.speed_threads:
            torch.set_num_threads(t)
            with torch.no_grad():
                model.eval()
                model(x[:16])
                t0 = time.perf_counter()
                for s in range(0, len(x), 64):
                    model(x[s:s + 64])
                dt = time.perf_counter() - t0
            ips = len(x) / dt
            floor = peak_of[t] * 1e9 / flops
            rows.append([box, t, flops / 1e9, ips, floor, ips / floor])
    return rows, peak


def knn_table(cfg: Config) -> list:
    try:
        from cdae_em.neighbours import nearest_neighbours
    except ImportError:  # before the split of align.py
        from cdae_em.align import nearest_neighbours

    rows = []
    g = torch.Generator().manual_seed(0)
    for n in cfg.knn_n:
        f = torch.randn(n, 32, generator=g)
        t0 = time.perf_counter()
        nearest_neighbours(f, 30)
        rows.append([n, time.perf_counter() - t0])
    return rows


def run_job_measured(ds_dir: Path, star: Path, k: int, j: int, cfg: Config) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MiB) of `cdae-em run` in a child process (os.wait4's rusage)."""
    out = ds_dir / "run_job"
    cmd = [sys.executable, "-m", "cdae_em", "run", "--i", str(star), "--o", str(out), "--K", str(k),
           "--j", str(j), "--overwrite", "--k", str(cfg.k), "--epochs", str(cfg.epochs), "--finetune-subset", str(cfg.finetune_subset),
           "--iter", str(cfg.classify_iter), "--log-level", "WARNING"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(ds_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"cdae-em run failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def scale_table(cfg: Config, work: Path, j: int) -> list:
    rows = []
    for n in cfg.run_n:
        t0 = time.perf_counter()
        ds = make_dataset(cfg.proteins[0], "realistic", n, cfg.box, work)
        sim = time.perf_counter() - t0
        log(f"cdae-em run on {n} particles ...")
        wall, rss = run_job_measured(ds.dir, ds.star, ds.n_views, j, cfg)
        summary = json.loads((ds.dir / "run_job" / "summary.json").read_text())
        tm = summary.get("timings", {})
        rows.append([n, wall, tm.get("denoise", float("nan")), tm.get("classify", float("nan")), rss,
                     1000 * wall / n, sim, settings_label(cfg)])
        log(f"  {n}: {wall:.1f} s, {rss:.0f} MiB")
    return rows


def settings_label(cfg: Config) -> str:
    if (cfg.k, cfg.epochs, cfg.finetune_subset, cfg.classify_iter) == (30, 3, 4000, 5):
        return "defaults"
    return f"k {cfg.k}, {cfg.epochs} epoch(s), subset {cfg.finetune_subset}, {cfg.classify_iter} rounds"


def simulate_speed(cfg: Config, j: int) -> str:
    if not cfg.sim_speed_n:
        return "(skipped in this mode)"
    r = subprocess.run([sys.executable, "-m", "benchmarks.simulate_speed", "--n", str(cfg.sim_speed_n), "--j", str(j)],
                       cwd=str(ROOT), capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return r.stdout.strip() if r.returncode == 0 else f"(failed: {r.stderr[-500:]})"


# ----------------------------------------------------------------------------------------------
# figures and the report
# ----------------------------------------------------------------------------------------------
def figure_examples(ds: Dataset, denoised: dict, path: Path, n: int = 6) -> None:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (< 10 min on 2 CPU cores)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; numbers meaningless)")
    parser.add_argument("--huge", action="store_true", help="full mode: also `cdae-em run` at 128k particles")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown report (default: docs/benchmarks.md)")
    parser.add_argument("--work", help="directory for simulated data and job outputs (default: a temporary one)")
    parser.add_argument("--j", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--sections", default="denoise,cluster,speed,scale",
                        help="comma list of denoise,cluster,speed,scale (cluster needs denoise); "
                        "'report': run nothing, rewrite --out from --merge")
    parser.add_argument("--json", help="also write all results as JSON here")
    parser.add_argument("--n", type=int, help="particles per data set, both protocols (overrides the mode's)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma list of protocols (default: all)")
    parser.add_argument("--fine-tune-defaults", action="store_true",
                        help="use `cdae-em denoise`/`run` default settings (k 30, 3 epochs, subset 4000, 5 rounds) "
                             "whatever the mode")
    parser.add_argument("--run-n", help="comma list of particle counts for `cdae-em run` (overrides the mode's)")
    parser.add_argument("--merge", metavar="JSON", help="results of an earlier run (its --json): sections not run "
                        "now are taken from it, `cdae-em run` rows are combined; the report shows both")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = config(mode, args.huge)
    if args.n:
        cfg.n = {p: args.n for p in PROTOCOLS}
    if args.fine_tune_defaults:
        cfg.k, cfg.epochs, cfg.finetune_subset, cfg.classify_iter = 30, 3, 4000, 5
    if args.run_n:
        cfg.run_n = tuple(int(v) for v in args.run_n.split(","))
    sections = set(args.sections.split(","))  # "report": only rewrite the report from --merge
    if "cluster" in sections:
        sections.add("denoise")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.j)
    t_start = time.perf_counter()
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cdae_bench_")
        work = Path(tmp.name)
    from cdae_em.weights import default_weights_path, load_weights

    model, _ = load_weights(default_weights_path())
    model.eval()
    command = " ".join(["python -m benchmarks.run", {"quick": "--quick", "tiny": "--tiny", "full": ""}[mode],
                        "--huge" if args.huge else "", f"--j {args.j}",
                        f"--sections {args.sections}" if args.sections != "denoise,cluster,speed,scale" else "",
                        f"--n {args.n}" if args.n else "",
                        f"--protocols {args.protocols}" if args.protocols != ",".join(PROTOCOLS) else "",
                        "--fine-tune-defaults" if args.fine_tune_defaults else "",
                        f"--run-n {args.run_n}" if args.run_n else "", "--merge PREVIOUS.json" if args.merge else ""])
    command = " ".join(command.split())
    results: dict = {"mode": mode, "machine": machine(), "threads": args.j}
    t1_rows, t2_rows, figs, datasets_info = [], [], [], []
    t1_header = ["data set", "method", "images", "PSNR dB", "PSNR dB (eq)", "FRC0.5 res A", "FRC0.5 res A (eq)", "s / 1000 img"]
    t2_header = ["data set", "method", "P (Hung.)", "R (Hung.)", "F1 (Hung.)", "P (pairs)", "R (pairs)", "F1 (pairs)",
                 "ARI", "NMI", "seconds"]
    if "denoise" in sections:
        calib = calibrate_peers(cfg, work)
        results["calibration"] = calib
        for protein in cfg.proteins:
            for protocol in args.protocols.split(","):
                t0 = time.perf_counter()
                ds = make_dataset(protein, protocol, cfg.n[protocol], cfg.box, work)
                datasets_info.append([ds.name, len(ds.noisy), ds.n_views, ds.pixel_size, ds.snr,
                                      round(time.perf_counter() - t0, 1)])
                log(f"{ds.name}: {len(ds.noisy)} particles at {ds.pixel_size} A/px; denoising ...")
                rows, denoised = table1_for(ds, cfg, calib, model, args.j)
                torch.set_num_threads(args.j)
                label = f"{ds.name} n={len(ds.noisy)}" + ("" if settings_label(cfg) == "defaults" else " (quick FT)")
                datasets_info[-1][0] = label
                t1_rows += [[label] + row[1:] for row in rows]
                if "cluster" in sections:
                    log(f"{ds.name}: clustering ...")
                    t2_rows += [[label] + row[1:] for row in table2_for(ds, cfg, model, denoised, args.j)]
                if protein == cfg.proteins[0]:
                    fig = out_md.parent / f"{out_md.stem}_examples_{protocol}.png"
                    figure_examples(ds, denoised, fig)
                    figs.append(fig)
        print("\nTable 1: denoising\n" + md_table(t1_header, t1_rows))
        if t2_rows:
            print("\nTable 2: clustering\n" + md_table(t2_header, t2_rows))
    speed_rows, peak_rows, knn_rows, scale_rows, sim_out = [], [], [], [], ""
    if "speed" in sections:
        log("speed ...")
        speed_rows, peak_rows = speed_table(cfg, model)
        knn_rows = knn_table(cfg)
        torch.set_num_threads(args.j)
        sim_out = simulate_speed(cfg, args.j)
        print("\nmatmul peak\n" + md_table(["threads", "GFLOP/s (2048^2 fp32 mm)"], peak_rows))
        print("\ninference\n" + md_table(["box", "threads", "GFLOP/image (3 blocks)", "images/s", "floor images/s",
                                          "fraction of floor"], speed_rows))
        print("\nkNN\n" + md_table(["N", "seconds"], knn_rows))
        print("\n" + sim_out)
    if "scale" in sections:
        scale_rows = scale_table(cfg, work, args.j)
        print("\n`cdae-em run`\n" + md_table(["particles", "wall s", "denoise s", "classify s", "peak RSS MiB",
                                              "ms / particle", "simulation s", "settings"], scale_rows))
    if knn_rows or scale_rows:
        fig = out_md.parent / f"{out_md.stem}_scale.png"
        figure_scale(scale_rows, knn_rows, fig)
        figs.append(fig)
    total = time.perf_counter() - t_start
    results.update(table1=t1_rows, table2=t2_rows, speed=speed_rows, peak=peak_rows, knn=knn_rows, scale=scale_rows,
                   datasets=datasets_info, simulate_speed=sim_out, seconds=total,
                   commands=[[command, round(total / 60, 1)]])
    if args.merge:
        old = json.loads(Path(args.merge).read_text())
        for key in ("table1", "table2", "datasets"):
            results[key] = old.get(key, []) + results[key]
        for key in ("speed", "peak", "knn", "simulate_speed", "calibration"):
            if not results.get(key) and old.get(key):
                results[key] = old[key]
        by_n = {(row[-1], row[0]): row for row in old.get("scale", [])}
        by_n.update({(row[-1], row[0]): row for row in scale_rows})
        results["scale"] = [by_n[key] for key in sorted(by_n)]
        results["commands"] = old.get("commands", []) + (results["commands"] if sections != {"report"} else [])
        results["seconds"] = old.get("seconds", 0) + total
        figs = [f for f in (out_md.parent / f"{out_md.stem}_examples_{p}.png" for p in PROTOCOLS) if f.exists()]
        fig = out_md.parent / f"{out_md.stem}_scale.png"
        figure_scale(results["scale"], results["knn"], fig)
        figs.append(fig)
    write_report(out_md, cfg, args, results, t1_header, t2_header, figs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    log(f"done in {total:.0f} s; wrote {out_md}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def grid(d: dict) -> str:
    return ", ".join(f"{float(k):g}: {v:.2f} dB" for k, v in d.items())


def write_report(path: Path, cfg: Config, args, r: dict, t1_header, t2_header, figs) -> None:
    cmd = "python -m benchmarks.run" + {"quick": " --quick", "tiny": " --tiny", "full": ""}[cfg.mode]
    runs = "\n".join(f"    {c}    # {m} min" for c, m in r.get("commands", [[cmd, round(r['seconds'] / 60, 1)]]))
    parts = [f"# Benchmarks\n\nGenerated on {time.strftime('%Y-%m-%d')} ({r['threads']} threads) by\n\n{runs}\n\n"
             f"{r['machine']}.\n"]
    if COMMENTARY.exists() and cfg.mode != "tiny":
        parts.append(COMMENTARY.read_text())
    parts.append("## Data sets\n\nSimulated with `cdae_em.simulate` from the structures in `benchmarks/data/` "
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
                     f"{grid(c['nlm_grid'])}). The cascade gets nothing tuned: shipped weights and `cdae-em denoise` "
                     "defaults (k 30, 3 fine-tuning epochs per block, fine-tuning subset 4000), except in rows marked "
                     "'(quick FT)'.\n")
    if r["table1"]:
        parts.append("## Table 1: denoising\n\n'(quick FT)' after a data set: the CDAE rows used the quick "
                     "fine-tuning settings (`--k 20 --epochs 1 --finetune-subset 80`, 5 classification rounds) instead "
                     "of the defaults (k 30, 3 epochs, subset 4000). PSNR (`cdae_em.metrics.psnr`, both images standardised, peak = "
                     "the clean image's range) and FRC resolution (0.5 threshold, `metrics.frc` over the stack) "
                     "against the clean image (for the realistic protocol the clean image includes the CTF); "
                     "(eq) = after the histogram equalisation `cdae-em denoise` applies. Time per 1000 images "
                     "on this CPU (fine-tuned CDAE: the whole `cdae-em denoise`, fine-tuning included).\n\n"
                     + md_table(t1_header, r["table1"]) + "\n")
    if r["table2"]:
        parts.append("## Table 2: clustering\n\nK = number of true views. Hungarian = classes matched one-to-one "
                     "with views, macro-averaged; pairs = pair-counting precision/recall/F1. Rows with "
                     "`cdae-em classify`/`cdae-em run` include the rotation/shift-aware initial features and 5 "
                     "rounds of alignment to class averages; 'alignment only' is that classification on the raw "
                     "particles (what denoising adds is the difference to the `cdae-em run` row).\n\n"
                     + md_table(t2_header, r["table2"]) + "\n")
    if r["speed"]:
        parts.append("## Speed\n\nInference of the three-block cascade (batches of 64, fp32, no grad) against the "
                     "FLOP floor: FLOPs per image counted by `torch.utils.flop_counter.FlopCounterMode`, peak = a "
                     "2048^2 fp32 `torch.mm` at the same thread count.\n\n"
                     + md_table(["threads", "GFLOP/s (2048^2 fp32 mm)"], r["peak"]) + "\n\n"
                     + md_table(["box", "threads", "GFLOP/image (3 blocks)", "images/s", "floor images/s",
                                 "fraction of floor"], r["speed"]) + "\n\n"
                     "Exact kNN (`nearest_neighbours`, in `cdae_em.neighbours` since the split of align.py, k=30, 32-d features, "
                     f"{r['threads']} threads):\n\n" + md_table(["N", "seconds"], r["knn"]) + "\n\n"
                     "`python -m benchmarks.simulate_speed`:\n\n" + r["simulate_speed"] + "\n")
    if r["scale"]:
        parts.append("## Scale: `cdae-em run`\n\nRealistic protocol, first protein (1BHL), K = 12; settings: "
                     "'defaults' = `cdae-em run` defaults (k 30, 3 fine-tuning epochs per block, fine-tuning subset "
                     "4000, 5 classification rounds), otherwise as listed (`--k --epochs --finetune-subset --iter`); "
                     f"{r['threads']} threads; wall time and peak RSS of the child process (os.wait4).\n\n"
                     + md_table(["particles", "wall s", "denoise s", "classify s", "peak RSS MiB", "ms / particle",
                                 "simulation s", "settings"], r["scale"]) + "\n")
    if figs:
        parts.append("## Figures\n\n" + "\n\n".join(f"![{f.stem}]({f.name})" for f in figs) + "\n")
    path.write_text("\n".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
