"""The measurements of the benchmark suite: denoising (Table 1), clustering (Table 2), speed and
scale; each function returns table rows for ``benchmarks.report``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import methods as M
from benchmarks.config import ROOT, Config, log
from benchmarks.datasets import Dataset, make_dataset

# ----------------------------------------------------------------------------------------------
# denoising
# ----------------------------------------------------------------------------------------------
def score_denoising(est: np.ndarray, clean: np.ndarray, pixel: float) -> tuple[float, float]:
    """Mean PSNR (dB) and FRC 0.5 resolution (Angstrom) of denoised images against the clean ones."""
    from cdae_em.core.metrics import frc, frc_resolution, psnr

    return float(psnr(est, clean).mean()), frc_resolution(frc(M.standardise(est), M.standardise(clean)), pixel)


def calibrate_peers(cfg: Config, work: Path) -> dict:
    """Pick TV weight and NLM h (as multiples of the noise sigma) on the default map (4JSV, the
    protein not in the benchmark), paper protocol; the same factors are used everywhere."""
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

    out = work / f"calib_{cfg.box}"
    if not (out / "simulation.json").exists():
        simulate(load_source(None, box=cfg.box), SimulationSettings(n_particles=cfg.calib_n, n_views=4, snrs=[0.1]), out)
    import mrcfile

    noisy = np.array(mrcfile.open(out / "particles.mrcs", permissive=True).data, dtype=np.float32)
    clean = np.array(mrcfile.open(out / "clean.mrcs", permissive=True).data, dtype=np.float32)
    sigma = M.noise_sigma_standardised(0.1)
    from cdae_em.core.metrics import psnr

    tv = {f: float(psnr(M.tv(noisy, sigma, f), clean).mean()) for f in (0.25, 0.5, 1.0, 2.0, 4.0)}
    nlm = {f: float(psnr(M.nlm(noisy, sigma, f), clean).mean()) for f in (0.4, 0.8, 1.2, 1.6)}
    best = {"tv": max(tv, key=tv.get), "nlm": max(nlm, key=nlm.get), "tv_grid": tv, "nlm_grid": nlm}
    log(f"peer calibration on 4JSV: {best}")
    return best


def denoise_finetuned(ds: Dataset, cfg: Config, j: int) -> tuple[np.ndarray, float]:
    """`cdae-em denoise` (default settings, fine-tuning on) on the data set; the denoised stack it
    wrote (faithful, not equalised: its default) and the seconds it took."""
    from cdae_em.commands import denoise as cmd
    from cdae_em.io.images import ImageSource

    parser = argparse.ArgumentParser()
    cmd.add_args(parser)
    out = ds.dir / "cdae_denoise"
    args = parser.parse_args(["--i", str(ds.star), "--o", str(out), "--j", str(j),
                              "--neighbours", str(cfg.k), "--epochs", str(cfg.epochs),
                              "--finetune-subset", str(cfg.finetune_subset), "--finetune", "--no-phase-flip"])
    t0 = time.perf_counter()
    star = out / "denoised_particles.star"
    if not star.exists():
        cmd.main(args)
    seconds = time.perf_counter() - t0
    with ImageSource(star) as src:
        return np.asarray(src.read(np.arange(src.n)), dtype=np.float32), seconds


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
    """Table 2 rows for a data set: clustering scores of every method against the true views."""
    from cdae_em.classify.stage import classify
    from cdae_em.settings import ClassifySettings
    from cdae_em.core.metrics import clustering_scores

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
    add("alignment only: classification of the raw pixels (no phase flip)", lambda: cls(ds.noisy, "kmeans"))
    add("CDAE + k-means, aligned on the denoised (`--align-on denoised`)", lambda: cls(cdae, "kmeans"))
    add("CDAE + HC, aligned on the denoised", lambda: cls(cdae, "hierarchical"))
    return out


# ----------------------------------------------------------------------------------------------
# speed and scale
# ----------------------------------------------------------------------------------------------
def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """The machine's fp32 matrix-multiply speed (GFLOP/s) at a thread count: the floor for inference."""
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

    from cdae_em.denoise.cascade import DAEBlock

    block = DAEBlock().eval()
    x = torch.randn(4, box, box)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        block(x)
    return fc.get_total_flops() / 4


def speed_table(cfg: Config, model) -> tuple[list, list]:
    """Inference speed of the cascade per box and thread count, against the FLOP floor; and the floors."""
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
    """Seconds of exact kNN (``nearest_neighbours``) per number of particles."""
    from cdae_em.core.neighbours import nearest_neighbours

    rows = []
    g = torch.Generator().manual_seed(0)
    for n in cfg.knn_n:
        f = torch.randn(n, 32, generator=g)
        t0 = time.perf_counter()
        nearest_neighbours(f, 30)
        rows.append([n, time.perf_counter() - t0])
    return rows


def run_job_measured(ds_dir: Path, star: Path, k: int, j: int, cfg: Config) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MiB) of `cdae-em run` in a child process (benchmarks.measure)."""
    from benchmarks.measure import run_measured

    out = ds_dir / "run_job"
    cmd = [sys.executable, "-m", "cdae_em", "run", "--i", str(star), "--o", str(out), "--K", str(k),
           "--j", str(j), "--overwrite", "--k", str(cfg.k), "--epochs", str(cfg.epochs), "--finetune-subset", str(cfg.finetune_subset),
           "--iter", str(cfg.classify_iter), "--log-level", "WARNING"]
    m = run_measured(cmd, ds_dir, env={**os.environ, "TQDM_DISABLE": "1"})
    if m.returncode != 0:
        raise RuntimeError(f"cdae-em run failed ({m.returncode}):\n{m.output[-3000:]}")
    return m.wall, m.peak_rss_mib


def scale_table(cfg: Config, work: Path, j: int) -> list:
    """`cdae-em run` wall time, stage times and peak memory per number of particles."""
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
    """"defaults" or the fine-tuning settings that differ from them."""
    if (cfg.k, cfg.epochs, cfg.finetune_subset, cfg.classify_iter) == (30, 3, 4000, 5):
        return "defaults"
    return f"k {cfg.k}, {cfg.epochs} epoch(s), subset {cfg.finetune_subset}, {cfg.classify_iter} rounds"


def simulate_speed(cfg: Config, j: int) -> str:
    """The output of `python -m benchmarks.simulate_speed` (skipped where the mode says so)."""
    if not cfg.sim_speed_n:
        return "(skipped in this mode)"
    r = subprocess.run([sys.executable, "-m", "benchmarks.simulate_speed", "--n", str(cfg.sim_speed_n), "--j", str(j)],
                       cwd=str(ROOT), capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return r.stdout.strip() if r.returncode == 0 else f"(failed: {r.stderr[-500:]})"
