"""Does the CUDA path give what the CPU path gives? Runs `cdae-em run` on one simulated stack on
the CPU and on a GPU with the same settings and seed, and compares what a user gets: the denoised
images (correlation between the two runs' images and with the clean ones), the classes (adjusted
Rand index between the runs, F1 against the truth), the self-check's choices, and the wall time.

    python -m benchmarks.gpu_match --gpu 0 --work /tmp/match       # prints a table, writes match.json

CUDA runs the cascade in bf16 autocast, the CPU in float32, so the images differ by rounding; the
run is a match when the images correlate above 0.99 and the class partitions agree (ARI) above 0.9.
Measured results: docs/scale.md (GPU section).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import starfile


def _cli(*args, log: Path | None = None) -> None:
    """``cdae-em ARGS``; its output in ``log`` (printed, the end of it, when it fails)."""
    r = subprocess.run([sys.executable, "-m", "cdae_em", *map(str, args)], capture_output=True, text=True)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"cdae-em {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-4000:]}")


def _stack(star: Path, project_dir: Path | None = None) -> np.ndarray:
    """The images of a STAR file's rows, in order."""
    from cdae_em.io.images import ImageSource

    with ImageSource(star, project_dir=project_dir) as images:
        return images.read(np.arange(len(images))).astype(np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image correlation."""
    from benchmarks.methods import standardise

    return (standardise(a) * standardise(b)).mean(axis=(1, 2))


def main(argv=None) -> int:
    from sklearn.metrics import adjusted_rand_score

    from cdae_em.core.metrics import clustering_scores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="0", help="CUDA device id (default: 0)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--box", type=int, default=96)
    parser.add_argument("--noise", default="coloured")
    parser.add_argument("--j", type=int, default=8)
    args = parser.parse_args(argv)
    sim = args.work / "sim"
    _cli("simulate", "--o", sim, "--n", args.n, "--views", 6, "--in-plane", "--max-shift", 3, "--ctf", "--snr", 0.05,
         "--noise", args.noise, "--bfactor", 100, "--normalise", "--box", args.box, "--seed", 1, "--overwrite")
    runs = {}
    for name, extra in (("cpu", []), ("cuda", ["--gpu", args.gpu])):
        out = args.work / name
        t0 = time.perf_counter()
        _cli("run", "--i", sim / "particles.star", "--o", out, "--K", 6, "--j", args.j, "--seed", 0, "--overwrite", *extra,
             log=args.work / f"{name}.log")
        runs[name] = {"seconds": round(time.perf_counter() - t0, 1), "out": out,
                      "summary": json.loads((out / "summary.json").read_text())}
    clean = _stack(sim / "truth.star", sim)
    truth = starfile.read(sim / "truth.star", always_dict=True)["particles"]["rlnClassNumber"].to_numpy()
    den = {k: _stack(r["out"] / "denoised_particles.star") for k, r in runs.items()}
    if den["cpu"].shape[-1] != clean.shape[-1]:  # written at the working box: scored at the input's
        import torch

        from cdae_em.core.preprocess import fourier_resize

        den = {k: fourier_resize(torch.from_numpy(v).float(), clean.shape[-1]).double().numpy() for k, v in den.items()}
    labels = {k: starfile.read(r["out"] / "particles.star", always_dict=True)["particles"]["rlnClassNumber"].to_numpy()
              for k, r in runs.items()}
    result = {
        "images_cpu_vs_cuda_corr_median": float(np.median(_corr(den["cpu"], den["cuda"]))),
        "images_cpu_vs_cuda_corr_min": float(np.min(_corr(den["cpu"], den["cuda"]))),
        "classes_cpu_vs_cuda_ari": float(adjusted_rand_score(labels["cpu"], labels["cuda"])),
    }
    for k in runs:
        result[f"{k}_seconds"] = runs[k]["seconds"]
        result[f"{k}_corr_with_clean_median"] = round(float(np.median(_corr(den[k], clean))), 4)
        result[f"{k}_class_f1"] = round(clustering_scores(truth - 1, labels[k] - 1)["hungarian_f1"], 3)
        result[f"{k}_selfcheck"] = runs[k]["summary"].get("denoise", {}).get("selfcheck")
    result["match"] = result["images_cpu_vs_cuda_corr_median"] > 0.99 and result["classes_cpu_vs_cuda_ari"] > 0.9
    (args.work / "match.json").write_text(json.dumps(result, indent=2, default=str))
    print("| measure | CPU | CUDA |\n|---|---|---|")
    for m in ("seconds", "corr_with_clean_median", "class_f1"):
        print(f"| {m} | {result[f'cpu_{m}']} | {result[f'cuda_{m}']} |")
    print(f"images CPU vs CUDA: median correlation {result['images_cpu_vs_cuda_corr_median']:.4f} "
          f"(min {result['images_cpu_vs_cuda_corr_min']:.4f}); classes ARI {result['classes_cpu_vs_cuda_ari']:.3f}; "
          f"match: {result['match']}")
    return 0 if result["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
