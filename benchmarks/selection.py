"""The cleaning job: classes of junk-laden particles, then automatic class selection. Writes
docs/selection.md (and .json, the scores kept between runs).

    python -m benchmarks.selection --j 2                                  # held-out 1BHL, 30% and 60% junk
    python -m benchmarks.selection --proteins default --junk 0.3          # the stack the threshold was chosen on

Data: ``cdae-em simulate``'s junk (empty boxes of ice, carbon-film edges, aggregates of 2-3
particles, fragments; equally often) among particles of 8 fixed views, under real-data conditions
(coloured noise, B-factor 150, RELION-normalised background, protein bright, particle 55% of the
64 px box), CTF, random psi, shifts up to 2 px, SNR 0.05. ``default`` is the shipped map (the
protein of the default weights, not held out); the others are the held-out benchmark structures.

Scores (truth.star's cdaeTrueKind): junk recall (junk picks not selected, over all junk picks),
good kept (true particles selected, over all of them), selection precision (true particles among
the selected), the purity of the selected true particles' classes (the share of each class's most
common true view, over the selected true particles), and the fraction of junk in majority-junk
classes (a class counted as junk when most of its members are junk). With ``--relion-bin`` RELION
Class2D, EM (25 iterations) and VDAM (200 mini-batches) as ``benchmarks.class2d`` runs them,
classifies the same stack into the same K on the same threads; their classes are scored by the junk
in majority-junk classes and, since RELION selects no classes by itself, selected by our rule
(`cdae-em classify --classes-from` its last _data.star: the same class score, fit and crowding
rules and threshold as our own jobs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.config import ROOT, log
from benchmarks.datasets import pixel_size_for, structure_path
from benchmarks.report import machine, md_table

FILL, BFACTOR, SNR, VIEWS = 0.55, 150.0, 0.05, 8
RELION_KINDS = ("relion", "vdam")  # RELION Class2D EM and VDAM (``benchmarks.class2d.relion_command``)


def simulate_case(protein: str, junk: float, n: int, box: int, work: Path, seed: int = 0) -> Path:
    from cdae_em.simulate.realism import REAL_NOISE
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

    out = work / f"{protein}_junk{junk:g}_{n}_{box}"
    if not (out / "simulation.json").exists():
        settings = SimulationSettings(n_particles=n, n_views=VIEWS, in_plane=True, max_shift=2.0, ctf=True,
                                      snrs=[SNR], seed=seed, noise=REAL_NOISE, bfactor=BFACTOR, normalise=True,
                                      junk_fraction=junk)
        if protein == "default":
            source = load_source(None, box=box)
        else:
            path = structure_path(protein)
            source = load_source(path, box=box, pixel_size=pixel_size_for(path, box, fill=FILL))
        simulate(source, settings, out)
    return out


def score(case: Path, job: Path) -> dict:
    import starfile

    truth = starfile.read(case / "truth.star", always_dict=True)["particles"]
    kind = truth_kinds(case)
    view = dict(zip(truth["rlnImageName"].str.replace("clean.mrcs", "particles.mrcs"), truth["rlnClassNumber"]))
    p = starfile.read(job / "particles.star", always_dict=True)["particles"]
    kinds = np.array([kind[n] for n in p["rlnImageName"]])
    good = kinds == "particle"
    labels = p["rlnClassNumber"].to_numpy()
    chosen = job / "particles_selected.star"
    selected = set(starfile.read(chosen, always_dict=True)["particles"]["rlnImageName"]) if chosen.exists() else set()
    picked = np.array([n in selected for n in p["rlnImageName"]])
    majority = junk_classes(labels, good)
    kept = picked & good
    views = np.array([view[n] for n in p["rlnImageName"][kept]])
    # purity of the selected good particles' classes: the share of each class's largest true view
    purity = sum(np.bincount(views[labels[kept] == c]).max() for c in np.unique(labels[kept])) / max(kept.sum(), 1)
    summary = json.loads((job / "summary.json").read_text())
    scores = np.asarray(summary.get("class_scores", {}).get("score", []))
    mostly_junk = np.isin(np.arange(1, len(scores) + 1), majority)
    present = np.isin(np.arange(1, len(scores) + 1), labels)
    return {"lowest_good_class_score": float(scores[present & ~mostly_junk].min()) if (present & ~mostly_junk).any() else None,
            "highest_junk_class_score": float(scores[present & mostly_junk].max()) if (present & mostly_junk).any() else None,
"junk_recall": float((~picked & ~good).sum() / max((~good).sum(), 1)),
            "good_kept": float(kept.sum() / max(good.sum(), 1)),
            "precision": float(kept.sum() / max(picked.sum(), 1)),
            "good_view_purity": float(purity),
            "junk_in_junk_classes": junk_in_junk_classes(labels, good),
            "classes_selected": len(summary.get("selection", {}).get("classes", [])),
            "rejected_by_kind": {k: round(float((~picked[kinds == k]).mean()), 3) for k in sorted(set(kinds)) if k != "particle"},
            "scores": summary.get("class_scores", {}).get("score")}


def truth_kinds(case: Path) -> dict:
    """Image name (of particles.mrcs) -> truth.star's cdaeTrueKind."""
    import starfile

    truth = starfile.read(case / "truth.star", always_dict=True)["particles"]
    return dict(zip(truth["rlnImageName"].str.replace("clean.mrcs", "particles.mrcs"), truth["cdaeTrueKind"]))


def junk_classes(labels: np.ndarray, good: np.ndarray) -> list:
    """The classes whose members are mostly junk."""
    return [c for c in np.unique(labels) if (~good[labels == c]).mean() > 0.5]


def junk_in_junk_classes(labels: np.ndarray, good: np.ndarray) -> float:
    """The fraction of the junk in classes whose members are mostly junk."""
    return float(np.isin(labels, junk_classes(labels, good))[~good].mean()) if (~good).any() else 0.0


def relion_classes(case: Path, k: int, j: int, relion: Path, box: int, kind: str = "relion") -> dict:
    """RELION Class2D on the case's particles (``kind`` "relion": EM, "vdam": VDAM, as
    ``benchmarks.class2d`` runs them): its time, peak RSS and junk in majority-junk classes."""
    import shutil

    import starfile

    from benchmarks.class2d import last_iteration, measured, read_labels, relion_command

    out = case / f"{kind}_K{k}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    px = float(starfile.read(case / "particles.star", always_dict=True)["optics"]["rlnImagePixelSize"][0])
    wall, rss = measured(relion_command(kind, relion, k, j, diameter=0.8 * box * px, out=f"{out.name}/run"), case,
                         out / "log.txt")
    labels = read_labels(last_iteration(out, "run_it*_data.star"))
    truth = truth_kinds(case)
    names = list(labels)
    good = np.array([truth[n] == "particle" for n in names])
    return {"junk_in_junk_classes": junk_in_junk_classes(np.array([labels[n] for n in names]), good),
            "wall_s": round(wall, 1), "rss_mib": round(rss), "classes_used": len(set(labels.values()))}


def relion_selected(case: Path, k: int, j: int, kind: str = "relion") -> dict:
    """RELION's classes (``relion_classes``' last iteration) scored and selected by our rule:
    `cdae-em classify --classes-from` its _data.star, scored as our own jobs are; and how well our
    averages of the particles at RELION's poses match RELION's own class averages (the median
    correlation over classes of 10+ particles: a check that its psi and origins are read right)."""
    import mrcfile
    import starfile

    from benchmarks.class2d import last_iteration

    data = last_iteration(case / f"{kind}_K{k}", "run_it*_data.star")
    job = case / f"{kind}_K{k}_selected"
    cmd = [sys.executable, "-m", "cdae_em", "classify", "--i", "particles.star", "--o", job.name, "--K", str(k),
           "--j", str(j), "--classes-from", str(data.relative_to(case)), "--overwrite"]
    with open(case / f"{job.name}.log", "w") as f:
        subprocess.run(cmd, cwd=case, check=True, stdout=f, stderr=subprocess.STDOUT)
    ours = mrcfile.read(job / "class_averages.mrcs")
    theirs = mrcfile.read(str(data).replace("_data.star", "_classes.mrcs"))
    counts = np.bincount(starfile.read(job / "particles.star", always_dict=True)["particles"]["rlnClassNumber"],
                         minlength=k + 1)[1:]
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b, n in zip(ours, theirs, counts) if n >= 10]
    measures = score(case, job)
    return {**{key: measures[key] for key in ("junk_recall", "good_kept", "precision", "good_view_purity",
                                               "classes_selected", "rejected_by_kind")},
            "average_match": round(float(np.median(corr)), 3)}


def relion_classes_cell(run: dict | None) -> str:
    if not run:
        return "not run"
    note = f"; {run['note']}" if run.get("note") else ""
    return f"{run['junk_in_junk_classes']:.3f} ({run['wall_s']:.0f} s, {run['rss_mib']:,} MiB{note})"


def relion_row(selected: dict | None) -> str:
    if not selected:
        return "not run"
    return (f"{selected['junk_recall']:.3f} / {selected['good_kept']:.3f} / {selected['precision']:.3f} / "
            f"{selected['good_view_purity']:.3f} ({selected['average_match']:.2f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proteins", default="1BHL")
    p.add_argument("--junk", default="0.3,0.6", help="junk fractions")
    p.add_argument("--K", type=int, default=20)
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--j", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench_selection")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "selection.md")
    p.add_argument("--redo", action="store_true", help="run our job again (RELION's runs are kept unless "
                                                       "--relion-bin is given too)")
    p.add_argument("--note", help="a note for our rows' wall time (e.g. that other jobs shared the machine)")
    p.add_argument("--rescore", action="store_true", help="score the kept runs again from their output files")
    p.add_argument("--relion-bin", type=Path, help="directory of relion_refine: also run RELION Class2D on each stack")
    args = p.parse_args(argv)
    results_file = args.out.with_suffix(".json")
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.rescore:
        for key, r in results.items():
            protein, junk, k, n, box = key.split("|")
            case = simulate_case(protein, float(junk), int(n), int(box), args.work)
            results[key] = {**r, **score(case, case / f"run_K{k}")}
            results[key].pop("good_view_f1", None)
        results_file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    for protein in args.proteins.split(","):
        for junk in [float(x) for x in args.junk.split(",")]:
            key = f"{protein}|{junk:g}|{args.K}|{args.n}|{args.box}"
            if key in results and not args.redo:
                continue
            case = simulate_case(protein, junk, args.n, args.box, args.work)
            job = case / f"run_K{args.K}"
            cmd = [sys.executable, "-m", "cdae_em", "run", "--i", "particles.star", "--o", job.name, "--K",
                   str(args.K), "--j", str(args.j), "--overwrite"]
            log(f"{key}: {' '.join(cmd[2:])}")
            t = time.perf_counter()
            with open(case / f"{job.name}.log", "w") as f:
                subprocess.run(cmd, cwd=case, check=True, stdout=f, stderr=subprocess.STDOUT)
            # kept: RELION's classes do not depend on ours
            peers = {kind: results[key][kind] for kind in RELION_KINDS if kind in results.get(key, {})}
            results[key] = {**score(case, job), "wall_s": round(time.perf_counter() - t, 1), **peers}
            if args.note:
                results[key]["note"] = args.note
            log(f"{key}: {results[key]}")
            results_file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    asked = [f"{protein}|{float(junk):g}|{args.K}|{args.n}|{args.box}" for protein in args.proteins.split(",")
             for junk in args.junk.split(",")]
    for key in [key for key in asked if key in results] if args.relion_bin else []:
        protein, junk, k, n, box = key.split("|")
        case = simulate_case(protein, float(junk), int(n), int(box), args.work)
        for kind in RELION_KINDS:
            if kind not in results[key] or args.redo:
                log(f"{key}: RELION Class2D ({kind}) ...")
                results[key][kind] = relion_classes(case, int(k), args.j, args.relion_bin, int(box), kind)
            elif "selected" in results[key][kind]:
                continue
            results[key][kind]["selected"] = relion_selected(case, int(k), args.j, kind)
            log(f"{key}: RELION ({kind}) {results[key][kind]}")
            results_file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    rows = []
    for key, r in sorted(results.items()):
        protein, junk, k, n, box = key.split("|")
        rows.append([protein + (" (threshold chosen here)" if protein == "default" else ""), f"{float(junk):.0%}",
                     f"{n} ({k})", box, f"{r['junk_in_junk_classes']:.3f}", f"{r['junk_recall']:.3f}",
                     f"{r['good_kept']:.3f}", f"{r['precision']:.3f}", f"{r['good_view_purity']:.3f}",
                     str(r["classes_selected"]), f"{r['lowest_good_class_score']:.2f} / {r['highest_junk_class_score']:.2f}",
                     ", ".join(f"{k} {v:.2f}" for k, v in r.get("rejected_by_kind", {}).items()) or "n/a",
                     f"{r['wall_s']:.0f}" + (f" ({r['note']})" if r.get("note") else ""),
                     *(cell for kind in RELION_KINDS for cell in (relion_classes_cell(r.get(kind)),
                                                                  relion_row(r.get(kind, {}).get("selected"))))])
    text = "\n".join([
        "# Automatic class selection on junk-laden particles", "",
        f"Generated by `python -m benchmarks.selection` (see its docstring); {machine()}.", "",
        (__doc__ or "").split("\n\n")[2].strip().replace("\n", " "), "",
        (__doc__ or "").split("\n\n")[3].strip().replace("\n", " "), "",
        md_table(["protein", "junk", "particles (K)", "box", "junk in majority-junk classes", "junk recall",
                  "good kept", "selection precision", "good-view purity (selected)", "classes selected",
                  "lowest score of a mostly-good class / highest of a mostly-junk class", "junk rejected, by kind",
                  "wall s", "RELION Class2D EM: junk in majority-junk classes (wall, peak RSS)",
                  "RELION EM's classes, our selection: junk recall / good kept / precision / purity "
                  "(average match)", "RELION Class2D VDAM: junk in majority-junk classes (wall, peak RSS)",
                  "RELION VDAM's classes, our selection: junk recall / good kept / precision / purity "
                  "(average match)"], rows),
        ""])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
