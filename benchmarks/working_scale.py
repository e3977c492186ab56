"""The working scale (`--scale auto`, the default, against `--scale native`): denoising quality of
particles larger than the weights were trained on, scored at the input's box; the cost of a job on
the same particles at 64 and 256 px; and, given real particles, the texture the denoiser leaves
outside them. Prints tables and writes docs/working_scale.md.

    python -m benchmarks.working_scale [--quick] [--real PARTICLES.star]

Denoising: the benchmark's proteins (benchmarks.denoise, particle 75% of the box, white noise,
SNR 0.05, CTF, both contrasts) at 128 and 192 px; `cdae-em denoise --no-finetune --no-phase-flip`
with each scale; BM3D given the true noise sigma. Cost: `cdae-em run --K 4` on 200 simulated
particles of the default map at 64 and 256 px (the same views, noise and CTF), wall time and peak
RSS. Texture: std of the outer annulus (r > 0.38 box) over std of the centre disc (r < 0.25 box),
median over particles; a particle on a flat background is well under 0.4.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks import methods as M
from benchmarks.config import ROOT, log
from benchmarks.datasets import PROTEINS
from benchmarks.denoise import Case, cdae_denoise, cached, score, simulate_case
from benchmarks.measure import run_measured


def texture(images: np.ndarray) -> float:
    """Median over particles of std(outer annulus) / std(centre disc)."""
    box = images.shape[-1]
    y, x = np.mgrid[:box, :box] - (box - 1) / 2
    r = np.hypot(x, y) / box
    outer, inner = (r > 0.38) & (r < 0.5), r < 0.25
    return float(np.median([im[outer].std() / im[inner].std() for im in images]))


def denoising(work: Path, j: int, n: int, bm3d_n: int) -> list[dict]:
    rows = []
    for protein, _, _ in PROTEINS:
        for box, dark in ((128, False), (128, True), (192, False)):
            case = Case(protein, box, 0.05, dark, n)
            star, noisy, clean, px = simulate_case(case, work)
            d = work / case.name
            row = {"case": case.name, "noisy": score(noisy, clean, noisy, px)["dpsnr"]}
            for scale in ("native", "auto"):
                est, summary = cdae_denoise(star, d / f"cdae_{scale}", j, ["--no-finetune", "--scale", scale], box=box)
                s = score(est, clean, noisy, px)
                row[scale] = {"dpsnr": s["dpsnr"], "corr": s["corr"], "box": summary["denoise"]["box"],
                              "seconds": summary["timings"]["denoise"]}
            est, _ = cached(d / "bm3d.npz", lambda: M.bm3d(noisy[:bm3d_n], M.noise_sigma_standardised(case.snr)))
            s = score(est, clean, noisy, px)
            row["bm3d"] = {"dpsnr": s["dpsnr"], "corr": s["corr"], "images": len(est)}
            log(json.dumps(row))
            rows.append(row)
    return rows


def cost(work: Path, j: int, n: int) -> list[dict]:
    rows = []
    for box, scale in ((64, "auto"), (256, "auto"), (256, "native")):
        sim = work / f"default_map_{box}"
        if not (sim / "particles.star").exists():
            cmd = [sys.executable, "-m", "cdae_em", "simulate", "--o", str(sim), "--n", str(n), "--views", "4",
                   "--in-plane", "--max-shift", str(2.0 * box / 64), "--ctf", "--snr", "0.05", "--box", str(box),
                   "--j", str(j), "--seed", "1"]
            made = run_measured(cmd)
            if made.returncode != 0:
                raise SystemExit(made.output[-3000:])
        out = work / f"run_{box}_{scale}"
        cmd = [sys.executable, "-m", "cdae_em", "run", "--i", str(sim / "particles.star"), "--o", str(out), "--K", "4",
               "--scale", scale, "--j", str(j), "--overwrite"]
        m = run_measured(cmd)
        if m.returncode != 0:
            raise SystemExit(m.output[-3000:])
        summary = json.loads((out / "summary.json").read_text())
        evaluation = run_measured([sys.executable, "-m", "cdae_em", "evaluate", "--job", str(out), "--truth",
                                   str(sim / "truth.star")])
        f1 = (json.loads((out / "evaluation.json").read_text())["clustering"]["hungarian_f1"]
              if evaluation.returncode == 0 else None)
        row = {"box": box, "scale": scale, "working_box": summary["denoise"]["box"], "wall_s": m.wall,
               "peak_rss_mib": m.peak_rss_mib, "f1": f1, "timings": summary["timings"]}
        log(json.dumps(row))
        rows.append(row)
    return rows


def real_texture(star: Path, work: Path, j: int) -> list[dict]:
    import mrcfile

    rows = []
    for scale in ("native", "auto"):
        out = work / f"real_{scale}"
        images, summary = cdae_denoise(star, out, j, ["--no-finetune", "--scale", scale, "--phase-flip"])
        raw = np.asarray(mrcfile.read(next(iter(sorted(star.parent.glob("*.mrcs"))))), dtype=np.float32)
        rows.append({"scale": scale, "box": summary["denoise"]["box"], "texture": texture(images),
                     "raw_texture": texture(raw)})
        log(json.dumps(rows[-1]))
    return rows


def report(den: list[dict], cst: list[dict], real: list[dict], real_star: str | None) -> str:
    lines = ["# Working scale", "", "Made by `python -m benchmarks.working_scale` (its docstring says what each part does).",
             "", "## Denoising particles larger than the weights were trained on (scored at the input's box)", "",
             "| case | cdae-em native: box, dPSNR, corr | cdae-em auto: box, dPSNR, corr | BM3D (true sigma): dPSNR, corr |",
             "|---|---|---|---|"]
    for r in den:
        a, b, c = r["native"], r["auto"], r["bm3d"]
        lines.append(f"| {r['case']} | {a['box']}, {a['dpsnr']:+.2f}, {a['corr']:.3f} | {b['box']}, {b['dpsnr']:+.2f}, "
                     f"{b['corr']:.3f} | {c['dpsnr']:+.2f}, {c['corr']:.3f} ({c['images']} images) |")
    lines += ["", "## Cost of a job on the same particles at 64 and 256 px (`cdae-em run --K 4`)", "",
              "| box | scale | working box | wall s | peak RSS MiB | F1 | denoise s | classify s | outputs s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in cst:
        t = r["timings"]
        f1 = "" if r["f1"] is None else f"{r['f1']:.3f}"
        lines.append(f"| {r['box']} | {r['scale']} | {r['working_box']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{f1} | {t.get('denoise', 0):.1f} | {t.get('classify', 0):.1f} | {t.get('outputs', 0):.1f} |")
    if real:
        lines += ["", f"## Texture outside real particles ({real_star})", "",
                  "| scale | working box | texture (denoised) | texture (raw) |", "|---|---|---|---|"]
        lines += [f"| {r['scale']} | {r['box']} | {r['texture']:.3f} | {r['raw_texture']:.3f} |" for r in real]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="fewer particles")
    parser.add_argument("--j", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench_scale_working")
    parser.add_argument("--real", type=Path, help="a STAR file of real particles (its stack beside it)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "working_scale.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    n, bm3d_n, n_cost = (96, 16, 200) if args.quick else (200, 16, 400)
    den = denoising(args.work, args.j, n, bm3d_n)
    cst = cost(args.work, args.j, n_cost)
    real = real_texture(args.real, args.work, args.j) if args.real else []
    text = report(den, cst, real, args.real.name if args.real else None)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
