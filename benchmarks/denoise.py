"""Denoising benchmark on held-out realistic particles: cdae-em against BM3D, Topaz-Denoise,
NL-means and TV, in both contrasts, at several SNRs and box sizes. Writes docs/denoiser.md.

    python -m benchmarks.denoise [--quick] [--j 2]

Data (``cdae_em.simulate.simulator``): the benchmark proteins (benchmarks/data; none of them is among the
structures the shipped weights were pre-trained on), random views, random in-plane rotation, shifts
up to 2 px (per 64 px), CTF (300 kV, defocus 1-3 um, no phase flip), the particle's largest diameter
75% of the box, white noise at SNR 0.02 / 0.05 / 0.1; protein bright (as RELION extracts with
inverted contrast) and dark (raw contrast). Scores are against the clean, CTF-modulated images:
PSNR after standardising both (docs/benchmarks.md's convention), the mean per-image correlation, and
the FRC 0.5 resolution. Peers: BM3D with the true noise sigma (on the first ``bm3d_n`` images: it
is slow), TV and NL-means with the factors calibrated on the default map (docs/benchmarks.md),
Topaz-Denoise's pre-trained U-Net (benchmarks/topaz_peer.py; skipped with a message when not
installed). Every result is cached under --work, so a rerun only computes what is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch

from benchmarks import methods as M
from benchmarks.config import ROOT, log
from benchmarks.datasets import PROTEINS, pixel_size_for, structure_path

TV_FACTOR, NLM_FACTOR = 2.0, 1.2  # x noise sigma, calibrated on the default map (docs/benchmarks.md)
FILL = 0.75


@dataclass
class Case:
    protein: str
    box: int
    snr: float
    dark: bool
    n: int
    # real-data conditions (cdae_em.simulate.realism): detector-like coloured noise, a B-factor,
    # RELION's background normalisation, the particle's diameter as a fraction of the box
    real: bool = False

    @property
    def name(self) -> str:
        name = f"{self.protein}_{self.box}px_snr{self.snr:g}_{'dark' if self.dark else 'bright'}_{self.n}"
        return name + ("_real" if self.real else "")

    @property
    def fill(self) -> float:
        return REAL_FILL if self.real else FILL


#: the real-data cases: what RELION's Extract writes (particle 55% of the box, normalised
#: background, protein bright) of data with a real detector's noise and B-factor
REAL_FILL, REAL_BFACTOR = 0.55, 150.0


def simulate_case(case: Case, work: Path, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray, float]:
    """The noisy STAR, noisy and clean stacks, and the pixel size of one case (simulated once)."""
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

    from cdae_em.simulate.realism import REAL_NOISE, WHITE

    path = structure_path(case.protein)
    px = pixel_size_for(path, case.box, fill=case.fill)
    out = work / case.name
    settings = SimulationSettings(n_particles=case.n, in_plane=True, max_shift=2.0 * case.box / 64, ctf=True,
                                  defocus_range=(10000.0, 30000.0), snrs=[case.snr], dark=case.dark, seed=seed,
                                  noise=REAL_NOISE if case.real else WHITE,
                                  bfactor=REAL_BFACTOR if case.real else 0.0, normalise=case.real)
    if not (out / "simulation.json").exists():
        simulate(load_source(path, box=case.box, pixel_size=px), settings, out, overwrite=True)
    noisy = np.array(mrcfile.read(out / "particles.mrcs"), dtype=np.float32)
    clean = np.array(mrcfile.read(out / "clean.mrcs"), dtype=np.float32)
    return out / "particles.star", noisy, clean, px


def correlation(est: np.ndarray, clean: np.ndarray) -> float:
    a, b = M.standardise(est), M.standardise(clean)
    return float((a * b).mean(axis=(1, 2)).mean())


def score(est: np.ndarray, clean: np.ndarray, noisy: np.ndarray, pixel: float) -> dict:
    from cdae_em.core.metrics import frc, frc_resolution, psnr

    n = len(est)
    gain = float(psnr(est, clean[:n]).mean() - psnr(noisy[:n], clean[:n]).mean())
    return {"images": n, "psnr": float(psnr(est, clean[:n]).mean()), "dpsnr": gain,
            "corr": correlation(est, clean[:n]),
            "frc_res": frc_resolution(frc(M.standardise(est), M.standardise(clean[:n])), pixel)}


def cached(path: Path, compute) -> tuple[np.ndarray, float]:
    """(images, seconds) from ``path`` (.npz) or from ``compute()``, timed and saved."""
    if path.exists():
        z = np.load(path)
        return z["images"], float(z["seconds"])
    t0 = time.perf_counter()
    images = np.asarray(compute(), dtype=np.float32)
    seconds = time.perf_counter() - t0
    np.savez(path, images=images, seconds=seconds)
    return images, seconds


def cdae_denoise(star: Path, out: Path, j: int, extra: list[str], box: int | None = None) -> tuple[np.ndarray, dict]:
    """`cdae-em denoise` as a user runs it, but without CTF phase flipping (the clean images it is scored
    against carry the CTF as it is); its denoised stack, at ``box`` (a stack written at a smaller
    working box is Fourier-padded back, so that it is scored at the input's box), and summary."""
    if not (out / "denoised_particles.star").exists():
        cmd = [sys.executable, "-m", "cdae_em", "denoise", "--i", str(star), "--o", str(out), "--j", str(j),
               "--overwrite", "--no-phase-flip", *extra]
        log("$ " + " ".join(shlex.quote(c) for c in cmd[2:]))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from cdae_em.io.images import ImageSource

    with ImageSource(out / "denoised_particles.star") as src:
        images = np.asarray(src.read(np.arange(src.n)), dtype=np.float32)
    if box is not None and images.shape[-1] != box:
        from cdae_em.core.preprocess import fourier_resize

        images = fourier_resize(torch.from_numpy(images), box).numpy()
    return images, json.loads((out / "summary.json").read_text())


def inference_speed(box: int, j: int, weights: str | None, n: int = 256) -> dict:
    """Images per second at ``box`` of the shipped cascade's inference (no fine-tuning) and of
    Topaz-Denoise, timed one after the other on the same images and threads."""
    from benchmarks import topaz_peer
    from cdae_em.denoise.train import autocast
    from cdae_em.denoise.weights import default_weights_path, load_weights

    torch.set_num_threads(j)
    model, _ = load_weights(weights or default_weights_path())
    model.eval()
    x = torch.randn(n, box, box)
    with torch.no_grad(), autocast(torch.device("cpu")):
        model(x[:16])
        t0 = time.perf_counter()
        for s in range(0, n, 128):
            model(x[s:s + 128])
    speed = {"cdae-em": n / (time.perf_counter() - t0)}
    if topaz_peer.available() is None:
        topaz_peer.denoise_topaz(x[:16].numpy())
        t0 = time.perf_counter()
        topaz_peer.denoise_topaz(x.numpy())
        speed["Topaz-Denoise"] = n / (time.perf_counter() - t0)
    return speed


def run_case(case: Case, work: Path, j: int, finetune: bool, bm3d_n: int, weights: str | None,
             peers_only: bool = False) -> dict:
    star, noisy, clean, px = simulate_case(case, work)
    d = work / case.name
    sigma = M.noise_sigma_standardised(case.snr)
    rows, outputs = {}, {"noisy": noisy, "clean": clean}
    rows["noisy input"] = {**score(noisy, clean, noisy, px), "ips": None}
    if peers_only:
        return _peers(case, d, noisy, clean, px, sigma, bm3d_n, rows, outputs)
    wargs = ["--weights", weights] if weights else []
    est, summary = cdae_denoise(star, d / "cdae_pretrained", j, ["--no-finetune", *wargs], box=case.box)
    check = summary["denoise"]["selfcheck"]
    rows["cdae-em denoise --no-finetune"] = {**score(est, clean, noisy, px), "ips": None,
                                             "contrast": check["contrast"], "written": check.get("written"),
                                             "box": summary["denoise"]["box"]}
    outputs["cdae-em (pre-trained)"] = est
    if case.real:  # the guard's candidates scored against the truth: does its verdict agree?
        rows.update(_reference_rows(noisy, clean, px, summary["denoise"]["box"], check))
    if check.get("written", "model") != "model":  # the guard wrote a reference filter: the model's own output too
        est, summary = cdae_denoise(star, d / "cdae_forced", j, ["--no-finetune", "--force-model", *wargs], box=case.box)
        rows["cdae-em denoise --no-finetune --force-model"] = {**score(est, clean, noisy, px), "ips": None}
        outputs["cdae-em (model, forced)"] = est
    if finetune:
        est, summary = cdae_denoise(star, d / "cdae_default", j, ["--finetune", *wargs], box=case.box)
        den = summary["denoise"]
        rows["cdae-em denoise --finetune"] = {**score(est, clean, noisy, px), "ips": None,
                                              "contrast": den["selfcheck"]["contrast"],
                                              "used": den["selfcheck"].get("used"),
                                              "seconds": summary.get("timings", {}).get("denoise", den.get("seconds"))}
        outputs["cdae-em (fine-tuned)"] = est
    return _peers(case, d, noisy, clean, px, sigma, bm3d_n, rows, outputs)


def _reference_rows(noisy, clean, px, box: int, check: dict) -> dict:
    """The self-check's reference filters as the job would apply them (at its working box, then
    scored at the input's box): the best of them by the truth, with the guard's own pick noted."""
    from cdae_em.core.preprocess import fourier_resize
    from cdae_em.denoise.selfcheck import filter_images, reference_kernels

    x = fourier_resize(torch.from_numpy(noisy), box)
    found = {}
    for name, kernel in reference_kernels().items():
        est = fourier_resize(filter_images(x, kernel), noisy.shape[-1]).numpy()
        found[name] = score(est, clean, noisy, px)
    best = max(found, key=lambda k: found[k]["corr"])
    note = (f"best by the truth: {best}; the self-check's best: {check.get('best_reference')}, its verdict: "
            f"{check.get('verdict')} (estimated correlation model {check.get('correlation', {}).get('model')}, "
            f"{check.get('best_reference')} {check.get('references', {}).get(check.get('best_reference'))})")
    return {"best reference filter": {**found[best], "ips": None, "guard": note}}


def _peers(case, d, noisy, clean, px, sigma, bm3d_n, rows, outputs) -> dict:
    from benchmarks import topaz_peer

    if case.real:  # BM3D is told the true coloured noise spectrum (its sigma_psd argument)
        from cdae_em.simulate.realism import REAL_NOISE

        psd = M.full_psd(REAL_NOISE, case.box, sigma)
        est, sec = cached(d / "bm3d.npz", lambda: M.bm3d(noisy[:bm3d_n], psd))
        rows["BM3D (true noise spectrum)"] = {**score(est, clean, noisy, px), "ips": len(est) / sec}
    else:
        est, sec = cached(d / "bm3d.npz", lambda: M.bm3d(noisy[:bm3d_n], sigma))
        rows["BM3D (true sigma)"] = {**score(est, clean, noisy, px), "ips": len(est) / sec}
    outputs["BM3D"] = est
    reason = topaz_peer.available()
    if reason is None:
        est, sec = cached(d / "topaz.npz", lambda: topaz_peer.denoise_topaz(noisy))
        rows["Topaz-Denoise (unet)"] = {**score(est, clean, noisy, px), "ips": len(est) / sec}
        outputs["Topaz-Denoise"] = est
    else:
        log(f"Topaz-Denoise skipped: {reason}")
    if case.real:  # the peers asked for under real conditions: BM3D and Topaz-Denoise
        return {"case": case.name, "rows": rows, "outputs": outputs}
    est, sec = cached(d / "nlm.npz", lambda: M.nlm(noisy, sigma, NLM_FACTOR))
    rows["NL-means"] = {**score(est, clean, noisy, px), "ips": len(est) / sec}
    outputs["NL-means"] = est
    est, sec = cached(d / "tv.npz", lambda: M.tv(noisy, sigma, TV_FACTOR))
    rows["TV"] = {**score(est, clean, noisy, px), "ips": len(est) / sec}
    return {"case": case.name, "rows": rows, "outputs": outputs}


def figure(result: dict, path: Path, n: int = 6) -> None:
    """Noisy / each method / clean side by side for the first ``n`` particles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outs = result["outputs"]
    names = ["noisy"] + [k for k in outs if k not in ("noisy", "clean")] + ["clean"]
    fig, axes = plt.subplots(n, len(names), figsize=(1.3 * len(names), 1.3 * n))
    for c, name in enumerate(names):
        for r in range(n):
            ax = axes[r, c]
            if r < len(outs[name]):
                ax.imshow(outs[name][r], cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=6)
    fig.suptitle(result["case"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gallery64(images: np.ndarray, path: Path, title: str, seed: int = 0) -> None:
    """A random 64-image gallery (8 x 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = np.sort(np.random.default_rng(seed).choice(len(images), size=min(64, len(images)), replace=False))
    fig, axes = plt.subplots(8, 8, figsize=(8, 8))
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    for ax, i in zip(axes.flat, pick):
        ax.imshow(images[i], cmap="gray")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="fewer particles and cases")
    parser.add_argument("--j", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench_denoise")
    parser.add_argument("--weights", help="cascade weights (default: the shipped ones)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "denoiser.md")
    parser.add_argument("--peers-only", action="store_true", help="simulate and run the peers only (cached)")
    parser.add_argument("--conditions", choices=["white", "real", "all"], default="all",
                        help="white: the white-noise cases; real: real-data conditions (coloured noise, B-factor, "
                             "normalised background, particle 55%% of a 128/256 px box); default: all")
    parser.add_argument("--proteins", help="comma-separated subset of the benchmark proteins")
    parser.add_argument("--snrs", help="comma-separated subset of the white-noise 64 px SNRs (0.02,0.05,0.1)")
    parser.add_argument("--bright-only", action="store_true", help="white noise: protein bright only")
    parser.add_argument("--no-finetune-cases", action="store_true", help="skip the cases run with --finetune")
    args = parser.parse_args()
    torch.set_num_threads(args.j)
    args.work.mkdir(parents=True, exist_ok=True)
    n, n_ft, bm3d_n = (96, 200, 8) if args.quick else (200, 600, 16)
    proteins = args.proteins.split(",") if args.proteins else [p for p, _, _ in PROTEINS]
    cases, ft_cases = [], []
    if args.conditions in ("white", "all"):
        snrs = [float(v) for v in args.snrs.split(",")] if args.snrs else [0.02, 0.05, 0.1]
        darks = (False,) if args.bright_only else (False, True)
        cases = [Case(p, 64, snr, dark, n) for p in proteins for snr in snrs for dark in darks]
        cases += [Case(p, 128, 0.05, dark, n) for p in proteins for dark in darks]
        if not args.no_finetune_cases:
            ft_cases = [Case(p, 64, 0.05, dark, n_ft) for p in proteins for dark in darks]
    if args.conditions in ("real", "all"):
        cases += [Case(p, box, snr, False, n, real=True) for p in proteins for box in (128, 256) for snr in (0.02, 0.05)]
    results = []
    for case in ft_cases + cases:
        log(f"case {case.name}")
        results.append(run_case(case, args.work, args.j, finetune=case in ft_cases, bm3d_n=bm3d_n,
                                weights=args.weights, peers_only=args.peers_only))
    if args.peers_only:
        return
    speed = {box: inference_speed(box, args.j, args.weights) for box in (64, 128)}
    figs = ROOT / "docs"
    if ft_cases:
        figure(results[1], figs / "denoiser_examples_dark.png")
        figure(results[0], figs / "denoiser_examples_bright.png")
        gallery64(results[1]["outputs"]["cdae-em (fine-tuned)"], figs / "denoiser_gallery.png",
                  f"cdae-em denoise --finetune, {results[1]['case']}: 64 random particles")
    real = [r for r in results if r["case"].endswith("_real")]
    if real:
        figure(real[-1], figs / "denoiser_examples_real.png")
    write_report(args, results, speed, ft_cases)


def _weights_made_by(weights: str | None) -> str:
    """Which weights were measured: the file and the command that made it (its metadata)."""
    from cdae_em.denoise.weights import default_weights_path, load_weights

    _, meta = load_weights(weights or default_weights_path())
    return f"{weights or 'the shipped weights'}, made by `{meta.get('command', '?')}`."


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def write_report(args, results: list, speed: dict, ft_cases: list) -> None:
    from benchmarks import topaz_peer

    lines = ["# Denoising on held-out realistic particles", "",
             f"Generated by `python -m benchmarks.denoise {' '.join(sys.argv[1:])}` "
             f"on {time.strftime('%Y-%m-%d')} (torch {torch.__version__}, {args.j} threads). Do not edit by hand.", "",
             f"Weights: {_weights_made_by(args.weights)}", "",
             (sys.modules[__name__].__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "Columns: PSNR (dB) and its gain over the noisy input, mean correlation with the clean image, FRC 0.5 "
             "resolution (A), images/s for the peers as timed in the case (cached from the first run, which may have "
             "shared the CPU; the speed table below times cdae-em and Topaz-Denoise back to back); 'seconds' are the "
             "whole `cdae-em denoise` run including fine-tuning.", ""]
    topaz = topaz_peer.available()
    if topaz:
        lines += [f"Topaz-Denoise: not run ({topaz}).", ""]
    lines += ["## Inference speed (no fine-tuning), timed one after the other on 256 images", "",
              "| box | cdae-em images/s | Topaz-Denoise images/s |", "|---|---|---|"]
    lines += [f"| {box} | {ips['cdae-em']:.0f} | {_fmt(ips.get('Topaz-Denoise'), '.0f')} |" for box, ips in speed.items()]
    real = [r for r in results if r["case"].endswith("_real")]
    white = [r for r in results[len(ft_cases):] if not r["case"].endswith("_real")]
    for title, subset in (("With fine-tuning (`cdae-em denoise --finetune`), 64 px, SNR 0.05", results[:len(ft_cases)]),
                          ("White noise", white),
                          (f"Real-data conditions: detector-like coloured noise, B-factor {REAL_BFACTOR:g} A^2, "
                           f"background normalised as RELION's Extract does, particle {REAL_FILL:.0%} of the box, "
                           "protein bright; scored at the input's box", real)):
        if not subset:
            continue
        lines += ["", f"## {title}", "", "| case | method | PSNR | dPSNR | corr | FRC res | images/s | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in subset:
            for method, m in r["rows"].items():
                note = ", ".join(f"{k} {m[k]}" for k in ("contrast", "used", "written", "box", "seconds")
                                 if m.get(k) is not None) + (m.get("guard") or "")
                lines.append(f"| {r['case']} | {method} | {m['psnr']:.2f} | {m['dpsnr']:+.2f} | {m['corr']:.3f} | "
                             f"{m['frc_res']:.1f} | {_fmt(m['ips'], '.0f')} | {note} |")
    lines += ["", "Figures: `denoiser_examples_bright.png`, `denoiser_examples_dark.png`, `denoiser_examples_real.png` "
              "(noisy / each method / clean), `denoiser_gallery.png` (64 random particles of `cdae-em denoise` output). "
              "'written' is what the self-check let the job write: the model's output, or the reference filter "
              "named (cdae_em.denoise.selfcheck); 'box' the working box the job chose.", ""]
    json_rows = [{"case": r["case"], "rows": r["rows"]} for r in results]
    (args.work / "results.json").write_text(json.dumps({"speed": speed, "results": json_rows}, indent=1))
    args.out.write_text("\n".join(lines))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
