"""2D classification side by side with RELION: `cdae-em run`, `cdae-em classify` on the raw particles,
RELION Class2D (classic EM) and RELION Class2D with VDAM (``--grad``), on the same simulated particles
and the same threads, one after the other. Prints a table and writes docs/class2d.md.

    python -m benchmarks.class2d --j 2                          # 4 proteins, SNR 0.05
    python -m benchmarks.class2d --j 2 --snrs 0.02,0.1 --proteins 2XHE,1BHL
    python -m benchmarks.class2d --report                       # the table from the cached results only
    python -m benchmarks.class2d --real --methods run           # real-data conditions: docs/class2d_real.md

Data: the held-out structures of ``benchmarks/data`` (none was used to train or tune cdae-em), K fixed
views with ``--per-view`` particles each on average, random in-plane rotation, shifts up to 2 px, CTF
(defocus 1-3 um), one SNR per data set, 64 px, the particle's largest diameter 60% of the box.

Scores: Hungarian-matched F1 and ARI against the true views (``cdae_em.core.metrics.clustering_scores``);
wall time and peak RSS of each program (its largest process, ``benchmarks.measure``); the FRC-0.5 resolution of each matched class
average against the clean, CTF-free projection of its view (after aligning one onto the other),
averaged over the matched classes.

RELION is found on PATH or with ``--relion-bin`` (``../shared/tools/build-relion.sh`` builds it); without
it the RELION rows are skipped with a message. Scores are kept per (protein, SNR, method) in
docs/class2d.json (``--results``), next to the report and in git, so a run only computes what is missing
(``--redo`` recomputes) and the report survives a lost ``--work`` directory; ``--rescore`` needs the
programs' output files there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np

from benchmarks.config import ROOT, log
from benchmarks.datasets import pixel_size_for, structure_path
from benchmarks.report import machine, md_table

METHODS = ("run", "classify", "relion", "vdam")
LABELS = {"run": "`cdae-em run` (defaults)", "classify": "`cdae-em classify` (raw particles)",
          "relion": "RELION Class2D (EM, 25 iter)", "vdam": "RELION Class2D VDAM (200 mini-batches)"}


#: --real: the particles as RELION's Extract writes real data (coloured detector noise, B-factor,
#: normalised background, protein bright, the particle 55% of the box)
REAL = dict(fill=0.55, bfactor=150.0)


def simulate_case(protein: str, snr: float, views: int, per_view: int, box: int, work: Path, seed: int = 0,
                  real: bool = False) -> Path:
    """Simulate (or reuse) one data set; returns its directory (particles.star, clean.mrcs, truth.star)."""
    from cdae_em.simulate.realism import REAL_NOISE, WHITE
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

    path = structure_path(protein)
    out = work / f"{protein}_snr{snr}_{views}x{per_view}_{box}{'_real' if real else ''}"
    if not (out / "simulation.json").exists():
        settings = SimulationSettings(n_particles=views * per_view, n_views=views, in_plane=True, max_shift=2.0,
                                      ctf=True, defocus_range=(10000.0, 30000.0), snrs=[snr], seed=seed,
                                      noise=REAL_NOISE if real else WHITE, bfactor=REAL["bfactor"] if real else 0.0,
                                      normalise=real)
        px = pixel_size_for(path, box, **({"fill": REAL["fill"]} if real else {}))
        simulate(load_source(path, box=box, pixel_size=px), settings, out)
    return out


def clean_views(protein: str, views: int, box: int, real: bool = False) -> np.ndarray:
    """The clean, CTF-free, centred projection of each view (views, box, box), psi = 0."""
    from cdae_em.simulate.simulator import even_views, euler_to_matrix, load_source

    path = structure_path(protein)
    rot, tilt = even_views(views)
    px = pixel_size_for(path, box, **({"fill": REAL["fill"]} if real else {}))
    source = load_source(path, box=box, pixel_size=px)
    return source.project(euler_to_matrix(rot, tilt, np.zeros(views))).cpu().numpy()


def measured(cmd: list[str], cwd: Path, log_file: Path) -> tuple[float, float]:
    """Run ``cmd``; wall time (s) and peak RSS (MiB) of its largest process (benchmarks.measure)."""
    from benchmarks.measure import run_measured

    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    m = run_measured(cmd, cwd, env=env, log_file=log_file)
    if m.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log_file}:\n{log_file.read_text()[-2000:]}")
    return m.wall, m.peak_rss_mib


def relion_command(kind: str, relion: Path, k: int, j: int, diameter: float, out: str) -> list[str]:
    """relion_refine for Class2D as RELION 5's GUI runs it with its defaults (CPU, ``--j`` threads)."""
    cmd = [str(relion / "relion_refine"), "--i", "particles.star", "--o", out, "--K", str(k),
           "--particle_diameter", f"{diameter:.0f}", "--tau2_fudge", "2", "--ctf", "--zero_mask",
           "--flatten_solvent", "--norm", "--scale", "--center_classes", "--oversampling", "1",
           "--psi_step", "12", "--offset_range", "5", "--offset_step", "2", "--dont_combine_weights_via_disc",
           "--pool", "30", "--pad", "2", "--j", str(j), "--random_seed", "0"]
    if kind == "vdam":
        return cmd + ["--grad", "--class_inactivity_threshold", "0.1", "--grad_write_iter", "10", "--iter", "200"]
    return cmd + ["--iter", "25"]


def read_labels(star: Path, classes_col: str = "rlnClassNumber") -> dict:
    """Image name -> class number from a particles STAR file (RELION 3.1+ layout)."""
    import starfile

    data = starfile.read(star, always_dict=True)
    table = data["particles"] if "particles" in data else next(iter(data.values()))
    return dict(zip(table["rlnImageName"].astype(str), table[classes_col].astype(int)))


def last_iteration(directory: Path, pattern: str) -> Path:
    files = sorted(directory.glob(pattern))
    if not files:
        raise RuntimeError(f"no {pattern} in {directory}")
    return files[-1]


def run_method(method: str, case: Path, k: int, j: int, relion: Path | None, box: int, px: float) -> dict:
    """Run one method on one data set; its labels (ordered as truth.star), class averages, time, RSS."""
    out = case / method
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if method in ("run", "classify"):
        cmd = [sys.executable, "-m", "cdae_em", method, "--i", "particles.star", "--o", f"{method}/job", "--K", str(k),
               "--j", str(j)]
    else:
        cmd = relion_command(method, relion, k, j, diameter=0.8 * box * px, out=f"{method}/run")
    wall, rss = measured(cmd, case, out / "log.txt")
    return {**collect(method, case), "wall_s": wall, "rss_mib": rss, "rss_method": "vmhwm", "command": " ".join(cmd)}


def collect(method: str, case: Path) -> dict:
    """The labels and class averages a finished method left in its directory."""
    out = case / method
    if method in ("run", "classify"):
        star, stack = out / "job" / "particles.star", out / "job" / "class_averages.mrcs"
    else:
        star, stack = last_iteration(out, "run_it*_data.star"), last_iteration(out, "run_it*_classes.mrcs")
    with mrcfile.open(stack, permissive=True) as m:
        averages = np.array(m.data, dtype=np.float32)
    stages = {}  # cdae-em's time per stage (its summary.json); RELION has one stage
    if method in ("run", "classify"):
        stages = json.loads((out / "job" / "summary.json").read_text()).get("timings", {})
    return {"labels": read_labels(star), "averages": averages, "stages": stages}


def score(result: dict, case: Path, clean: np.ndarray, px: float) -> dict:
    """F1/ARI against the true views and the class averages' FRC-0.5 resolution to the clean views."""
    import torch

    from cdae_em.core.align import align_pairs, apply_alignment
    from cdae_em.core.metrics import clustering_scores, frc, frc_resolution
    from cdae_em.core.preprocess import particle_mask
    from cdae_em.io.star import read_particles

    truth = read_particles(case / "truth.star").particles
    names = [n.replace("@clean.mrcs", "@particles.mrcs") for n in truth["rlnImageName"].astype(str)]
    views = truth["rlnClassNumber"].to_numpy().astype(int) - 1
    labels = np.array([result["labels"].get(n, 0) for n in names])
    s = clustering_scores(views, labels)
    # one class average per true view: the class holding most of that view's particles (Hungarian)
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix

    classes = np.unique(labels)
    mask = particle_mask(clean.shape[-1], 0.8 * clean.shape[-1]).numpy()  # as RELION's --zero_mask, for every method
    rows, cols = linear_sum_assignment(-contingency_matrix(views, labels))
    res = []
    for v, c in zip(rows, cols):
        avg = torch.from_numpy(result["averages"][classes[c] - 1][None].copy())
        ref = torch.from_numpy(clean[v][None].copy())
        psi, origin, _ = align_pairs(avg, ref, psi_step=1.0, max_shift=clean.shape[-1] / 4)
        aligned = apply_alignment(avg, psi, origin).numpy()[0]
        aligned = (aligned - aligned[mask > 0.5].mean()) * mask  # the average masked (zero outside), not the truth
        res.append(frc_resolution(frc(aligned[None], clean[v][None]), px))
    return {"f1": s["hungarian_f1"], "ari": s["ari"], "frc_res_a": float(np.mean(res)), "stages": result["stages"],
            "wall_s": result["wall_s"], "rss_mib": result["rss_mib"], "rss_method": result.get("rss_method", "wait4"),
            "command": result["command"]}


def ceiling(case: Path, clean: np.ndarray) -> dict:
    """About what a classifier that knew the true views would reach: each particle (phase-flipped, as
    cdae-em's classification sees it) aligned to every clean, CTF-free view and given the best one
    (F1, ARI; not a strict bound: class averages of the particles carry the CTF's envelope and can
    match them better); and the highest normalised cross-correlation between two of the clean views after
    aligning one onto the other (near 1: two views that look the same in 2D)."""
    import torch

    from cdae_em.core.align import align_pairs
    from cdae_em.core.multiref import align_to_references
    from cdae_em.settings import DenoiseSettings
    from cdae_em.core.metrics import clustering_scores
    from cdae_em.io.star import read_particles
    from cdae_em.core.prepare import prepared_images

    views = read_particles(case / "truth.star").particles["rlnClassNumber"].to_numpy().astype(int) - 1
    refs = torch.as_tensor(clean)
    with prepared_images(case / "particles.star", None, prepare=DenoiseSettings(phase_flip=True),
                    device=torch.device("cpu")) as images:
        assigned = align_to_references(images, refs, psi_step=5.0, max_shift=clean.shape[-1] / 8)[0].numpy()
    s = clustering_scores(views, assigned)
    k = len(clean)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    _, _, cc = align_pairs(refs[[b for _, b in pairs]], refs[[a for a, _ in pairs]], psi_step=2.0)
    best = int(torch.argmax(cc))
    return {"f1": s["hungarian_f1"], "ari": s["ari"], "most_alike": float(cc[best]),
            "most_alike_views": [pairs[best][0] + 1, pairs[best][1] + 1]}


def find_relion(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    found = shutil.which("relion_refine")
    return Path(found).parent if found else None


def in_order(results: dict) -> list[str]:
    """The result keys ("protein|snr|method") by protein, SNR and method, as every table lists them."""
    return sorted(results, key=lambda k: (k.split("|")[0], float(k.split("|")[1]), METHODS.index(k.split("|")[2])))


def write_report(results: dict, ceilings: dict, path: Path, args) -> None:
    header = ["protein", "SNR", "particles (K)", "method", "F1", "ARI", "wall s", "peak RSS MiB",
              "class avg FRC0.5 A"]
    rows = []
    for key in in_order(results):
        protein, snr, method = key.split("|")
        r = results[key]
        rows.append([protein, snr, f"{r['n']} ({r['k']})", LABELS[method], f"{r['f1']:.3f}", f"{r['ari']:.3f}",
                     f"{r['wall_s']:.0f}", rss_cell(r), f"{r['frc_res_a']:.1f}"])
    commands = sorted({r["invocation"] for r in results.values()})
    real = bool(getattr(args, "real", False))
    text = ["# 2D classification next to RELION" + (" under real-data conditions" if real else ""), "",
            "Generated by `python -m benchmarks.class2d` (see its docstring); the results merged here came from:", ""]
    text += [f"    {c}" for c in commands]
    text += ["", f"{machine()}.", "",
             "Each data set: a held-out structure (`benchmarks/data/PROVENANCE.md`), K fixed views, random in-plane "
             "rotation, shifts up to 2 px, CTF (defocus 1-3 um), 64 px, "
             + ("under real-data conditions: the particle 55% of the box, B-factor 150 A^2, detector-like coloured "
                "noise (neighbouring pixels correlated 0.2), background normalised as RELION's Extract does, protein "
                "bright; SNR over the whole box as in the white-noise runs, which leaves far less signal where the "
                "views differ (compare the ceilings with docs/class2d.md's). " if real else
                "the particle 60% of the box, white noise. ")
             + "All programs "
             "ran with the same threads, one after the other. F1: Hungarian-matched, macro-averaged over views. Peak "
             "RSS: the largest VmHWM of the program's processes; '<=' marks rows measured before that, with os.wait4, "
             "an upper bound that counted the benchmark's own memory at fork. "
             "Class avg FRC0.5: resolution at which each matched class average's FRC with the clean, CTF-free "
             "projection of its view falls below 0.5 (after alignment; the average masked by a soft circle of 80% of the box, as RELION's --zero_mask does, the clean projection as it is), mean over views (lower is better; Nyquist is 2 px).", "",
             "Commands (per data set, run in its directory):", ""]
    for method in METHODS:
        example = next((r["command"] for k, r in results.items() if k.endswith("|" + method)), None)
        if example:
            text.append(f"- {LABELS[method]}: `{example.replace(sys.executable, 'python')}`")
    text += ["", "## Summary: `cdae-em run` against RELION Class2D (computed from the table below)", "",
             md_table(["protein", "SNR", "F1 cdae-em / RELION", "higher F1", "wall s cdae-em / RELION", "time ratio",
                       "ceiling F1"], summary_rows(results, ceilings)),
             "", "## All results", "", md_table(header, rows), "",
             "## Where `cdae-em`'s time goes", "",
             "Seconds per stage as the job's summary.json records them (denoise: contrast check, inference, "
             "denoised stacks; classify: invariant features, initial classes, alignment rounds and "
             "merge-and-split moves; outputs: class averages, STAR files, gallery); wall: the whole process, "
             "start-up and imports included.", "",
             md_table(["protein", "SNR", "method", "denoise s", "classify s", "outputs s", "wall s"], stage_rows(results)),
             "",
             "## Ceiling: the particles assigned to the true views", "",
             "Each particle (phase-flipped) aligned to every clean, CTF-free view and given the best one: about what "
             "a classifier that knew the true views would reach. A reference point, not a strict bound: class "
             "averages of the particles themselves carry the CTF's envelope and match the particles better than the "
             "CTF-free projections do, and a comparison that weighs each particle by its own CTF tells apart views "
             "that differ in faint detail (1FAT's views 1 and 3), so a classifier can exceed it, on 1FAT by 7-9 "
             "points (docs/notes.md: with the true views and each particle's CTF, 0.958 at SNR 0.05). Most alike views: the "
             "highest normalised cross-correlation between two clean views after aligning one onto the other; near "
             "1, the two views look the same in 2D and their particles can hardly be told apart.", "",
             md_table(["protein", "SNR", "F1", "ARI", "most alike views (CC)"],
                      [[*key.split("|"), f"{c['f1']:.3f}", f"{c['ari']:.3f}",
                        f"{c['most_alike_views'][0]} and {c['most_alike_views'][1]} ({c['most_alike']:.3f})"]
                       for key, c in sorted(ceilings.items())]), ""]
    path.write_text("\n".join(text))


def rss_cell(r: dict) -> str:
    """Peak RSS as measured: the process's own VmHWM (benchmarks.measure), or for rows measured
    before it an upper bound (os.wait4 counted the benchmark's own memory at fork)."""
    return f"{r['rss_mib']:.0f}" if r.get("rss_method") == "vmhwm" else f"<= {r['rss_mib']:.0f}"


def stage_rows(results: dict) -> list:
    """Per data set and cdae-em command: seconds per stage (rows scored before stages were kept: none)."""
    rows = []
    for key in in_order(results):
        protein, snr, method = key.split("|")
        stages = results[key].get("stages") or {}
        if method in ("run", "classify") and stages:
            rows.append([protein, snr, LABELS[method], *(f"{stages[s]:.0f}" if s in stages else "-"
                                                         for s in ("denoise", "classify", "outputs")),
                         f"{results[key]['wall_s']:.0f}"])
    return rows


def summary_rows(results: dict, ceilings: dict) -> list:
    """Per data set: `cdae-em run` next to RELION Class2D (classic EM), where both were run."""
    rows = []
    for key in in_order(results):
        protein, snr, method = key.split("|")
        peer = results.get(f"{protein}|{snr}|relion")
        if method != "run" or peer is None:
            continue
        r = results[key]
        rows.append([protein, snr, f"{r['f1']:.3f} / {peer['f1']:.3f}", "cdae-em" if r["f1"] > peer["f1"] else "RELION",
                     f"{r['wall_s']:.0f} / {peer['wall_s']:.0f}", f"{r['wall_s'] / peer['wall_s']:.2f}",
                     f"{ceilings[f'{protein}|{snr}']['f1']:.3f}" if f"{protein}|{snr}" in ceilings else "-"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proteins", default="1BHL,4ZHL,2XHE,1FAT")
    p.add_argument("--snrs", default="0.05")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--per-view", type=int, default=150)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--j", type=int, default=2)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--real", action="store_true",
                   help="real-data conditions (coloured noise, B-factor 150, normalised background, particle 55%% of "
                        "the box); reported in docs/class2d_real.md / .json unless --out / --results are given")
    p.add_argument("--relion-bin", default=None, help="directory of relion_refine (default: on PATH)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench_class2d")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "class2d.md")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "class2d.json",
                   help="scores of every (protein, SNR, method) measured so far, and the ceilings")
    p.add_argument("--redo", action="store_true", help="recompute cached results")
    p.add_argument("--report", action="store_true", help="only write the report from cached results")
    p.add_argument("--rescore", action="store_true", help="score the cached results again from their output files")
    args = p.parse_args(argv)
    if args.real and args.out == p.get_default("out"):
        args.out = ROOT / "docs" / "class2d_real.md"
    if args.real and args.results == p.get_default("results"):
        args.results = ROOT / "docs" / "class2d_real.json"
    args.work.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.results.read_text()) if args.results.exists() else {}
    results, ceilings = kept.get("results", {}), kept.get("ceilings", {})

    def save() -> None:
        args.results.write_text(json.dumps({"results": results, "ceilings": ceilings}, indent=1, sort_keys=True) + "\n")
    relion = find_relion(args.relion_bin)
    invocation = "python -m benchmarks.class2d " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.rescore:
        for key, r in results.items():
            protein, snr, method = key.split("|")
            case = simulate_case(protein, float(snr), args.views, args.per_view, args.box, args.work, real=args.real)
            px = pixel_size_for(structure_path(protein), args.box, **({"fill": REAL["fill"]} if args.real else {}))
            results[key] = {**r, **score({**collect(method, case), **{k: r[k] for k in ("wall_s", "rss_mib", "command")},
                                          "rss_method": r.get("rss_method", "wait4")},
                                         case, clean_views(protein, args.views, args.box, args.real), px)}
        save()
    if not args.report and not args.rescore:
        for protein in args.proteins.split(","):
            for snr in [float(s) for s in args.snrs.split(",")]:
                case = simulate_case(protein, snr, args.views, args.per_view, args.box, args.work, real=args.real)
                px = pixel_size_for(structure_path(protein), args.box, **({"fill": REAL["fill"]} if args.real else {}))
                clean = clean_views(protein, args.views, args.box, args.real)
                for method in args.methods.split(","):
                    key = f"{protein}|{snr}|{method}"
                    if key in results and not args.redo:
                        continue
                    if method in ("relion", "vdam") and relion is None:
                        log(f"{key}: skipped, no relion_refine on PATH (give --relion-bin; "
                            "../shared/tools/build-relion.sh builds one)")
                        continue
                    log(f"{key}: running ...")
                    r = run_method(method, case, args.views, args.j, relion, args.box, px)
                    results[key] = {**score(r, case, clean, px), "n": args.views * args.per_view, "k": args.views,
                                    "invocation": invocation}
                    log(f"{key}: F1 {results[key]['f1']:.3f} ARI {results[key]['ari']:.3f} "
                        f"{results[key]['wall_s']:.0f} s {results[key]['rss_mib']:.0f} MiB "
                        f"FRC {results[key]['frc_res_a']:.1f} A")
                    save()
    for case_key in sorted({k.rsplit("|", 1)[0] for k in results} - set(ceilings)):
        protein, snr = case_key.split("|")
        log(f"{case_key}: ceiling ...")
        ceilings[case_key] = ceiling(simulate_case(protein, float(snr), args.views, args.per_view, args.box, args.work,
                                                    real=args.real),
                                     clean_views(protein, args.views, args.box, args.real))
        save()
    write_report(results, ceilings, args.out, args)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
