"""`python -m benchmarks.scale classes`: `cdae-em run` on one junk-laden stack
(``benchmarks.selection``'s) at several K, with and without the shortlist, and at N above
``subset_per_class`` x K with the classes found on a subset or on every particle; the rows go to
docs/scale.json's "classes" section and the table to docs/scale.md."""

from __future__ import annotations

import json
import shutil
import sys
import time

import numpy as np

from benchmarks.scale_results import RESULTS, fmt, log, measured, merge

KEYS = ("stack", "K", "shortlist", "subset", "threads")
RELION_KEYS = ("stack", "K", "threads", "iterations")  # a whole run and an early stop are kept side by side
QUALITY = ("junk_recall", "good_kept", "precision", "good_view_purity")


def effective_subset(n: int, k: int, per_class: int) -> int:
    """The particles per class the classes are found on (0: every particle), as the job decides."""
    return per_class if per_class and n > per_class * k else 0


def job_name(k: int, shortlist: int, subset: int) -> str:
    return f"run_K{k}_shortlist{shortlist}" + (f"_subset{subset}" if subset else "")


def cmd_classes(args) -> list[dict]:
    """Each K x shortlist x subset-per-class job on the stack (``--rescore``: the measured jobs
    resumed, so that their outputs and selection are written by this version, and scored again)."""
    from benchmarks.selection import score, simulate_case

    case = simulate_case(args.protein, args.junk, args.n, 64, args.work / "selection")
    rows = []
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    measured_rows = {tuple(r.get(key, 0) for key in KEYS): r for r in results.get("classes", [])}
    for k in [int(v) for v in args.K.split(",")]:
        for shortlist in [int(v) for v in args.shortlists.split(",")]:
            for subset in sorted({effective_subset(args.n, k, int(v)) for v in args.subsets.split(",")}):
                out = case / job_name(k, shortlist, subset)
                child = [sys.executable, "-m", "benchmarks.scale", "run-one", "--star", "particles.star", "--o",
                         out.name, "--K", str(k), "--shortlist", str(shortlist), "--subset", str(subset),
                         "--j", str(args.j)]
                if args.rescore:
                    row = measured_rows.get((case.name, k, shortlist, subset, args.j))
                    if row is None or not (out / "summary.json").exists():
                        continue
                    measured(child, case)
                    rows.append({**row, **{key: score(case, out)[key] for key in QUALITY}})
                    merge("classes", rows[-1:], KEYS)
                    continue
                shutil.rmtree(out, ignore_errors=True)
                log(f"cdae-em run {case.name}, K = {k}, shortlist {shortlist or 'none'}, "
                    f"{subset or 'every particle'} a class ...")
                wall, rss, anon = measured(child, case)
                summary = json.loads((out / "summary.json").read_text())
                history = summary.get("classify") or []
                measures = score(case, out)
                rows.append({"stack": case.name, "n": args.n, "K": k, "shortlist": shortlist, "subset": subset,
                             "threads": args.j, "wall": wall, "classify": summary["timings"].get("classify"),
                             "rounds": len(history), "coarse_round_s": mean_seconds(history, "coarse"),
                             "fine_round_s": mean_seconds(history, "fine"),
                             "all_round_s": mean_seconds(history, "fine", "all particles"),
                             "peak_rss_mib": rss, "peak_anon_mib": anon, **{key: measures[key] for key in QUALITY}})
                log(f"  {rows[-1]}")
                merge("classes", rows[-1:], KEYS)
    return rows


RELION_ITERATIONS = 25  # relion_refine's Class2D (EM) iterations, as benchmarks.class2d runs it


def cmd_relion(args) -> list[dict]:
    """RELION Class2D (EM) on the stack at each K, stopped after ``--iterations`` iterations (all 25:
    a whole run); each iteration's time from its files. Its first iterations are the slow ones
    (at 1,200 picks, K = 20: 37 s, 15 s, then 7-9 s each), so the whole run's time is estimated as
    the measured part plus the rest at the mean of the last two iterations measured. A whole run's
    classes are also selected by our rule and scored (``benchmarks.selection.relion_selected``)."""
    import starfile

    from benchmarks.class2d import relion_command
    from benchmarks.measure import run_measured
    from benchmarks.selection import relion_selected, simulate_case

    case = simulate_case(args.protein, args.junk, args.n, 64, args.work / "selection")
    px = float(starfile.read(case / "particles.star", always_dict=True)["optics"]["rlnImagePixelSize"][0])
    rows = []
    for k in [int(v) for v in args.K.split(",")]:
        whole = args.iterations >= RELION_ITERATIONS
        out = case / (f"relion_K{k}" if whole else f"relion_K{k}_first{args.iterations}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        last = out / f"run_it{args.iterations:03d}_data.star"
        log(f"RELION Class2D {case.name}, K = {k}, {args.iterations} of {RELION_ITERATIONS} iterations ...")
        t0 = time.time()
        m = run_measured(relion_command("relion", args.relion_bin, k, args.j, diameter=0.8 * 64 * px,
                                        out=f"{out.name}/run"), case, log_file=out / "log.txt",
                         until=None if whole else last.exists)
        if not last.exists():
            raise RuntimeError(f"RELION stopped before iteration {args.iterations}: see {out / 'log.txt'}")
        ends = [(out / f"run_it{i:03d}_data.star").stat().st_mtime - t0 for i in range(args.iterations + 1)]
        steps = np.diff(ends)
        rest = (RELION_ITERATIONS - args.iterations) * float(np.mean(steps[-2:]))
        rows.append({"stack": case.name, "n": args.n, "K": k, "threads": args.j, "iterations": args.iterations,
                     "seconds": round(ends[-1], 1), "iteration_s": [round(float(x), 1) for x in steps],
                     "estimated_s": round(ends[-1] + rest, 0), "peak_rss_mib": round(m.peak_rss_mib)})
        if whole:
            selected = relion_selected(case, k, args.j)
            rows[-1].update({key: selected[key] for key in QUALITY})
        if args.note:
            rows[-1]["note"] = args.note
        log(f"  {rows[-1]}")
        merge("relion_classes", rows[-1:], RELION_KEYS)
    return rows


def mean_seconds(history: list[dict], search: str, stage: str | None = None) -> float | None:
    """Mean wall time of the classification rounds of one kind of search (summary.json's history):
    of ``stage`` where given, else of the rounds of any other stage (those that find the classes)."""
    times = [h["seconds"] for h in history if h["search"] == search and "seconds" in h
             and (h.get("stage") == stage if stage else h.get("stage") != "all particles")]
    return float(np.mean(times)) if times else None


def run_one(args) -> None:
    """One `cdae-em run` job with ``classify.shortlist`` and ``classify.subset_per_class`` set."""
    import dataclasses

    from cdae_em.commands.common import apply_threads
    from cdae_em.job.runner import run_job
    from cdae_em.settings import build

    settings = build({"particles": args.star, "out_dir": args.o, "classify.n_classes": args.K, "threads": args.j,
                      "classify.subset_per_class": args.subset, "overwrite": True})
    settings = dataclasses.replace(settings, classify=dataclasses.replace(settings.classify, shortlist=args.shortlist))
    apply_threads(settings.threads)
    run_job(settings)


def classes_report(results: dict) -> list[str]:
    """The "Classes" section of docs/scale.md."""
    if not results.get("classes"):
        return []
    lines = ["## Classes: K (`python -m benchmarks.scale classes`)", "",
             "`cdae-em run --K K` on one junk-laden stack (`benchmarks.selection`'s: held-out 1BHL, 30% junk, real-data "
             "conditions, 64 px), each K with the default shortlist (each round searches a particle in full only "
             "against the 8 references that match it best in a cheaper search over all K) and with none (every "
             "reference in full). Subset: with more than `--subset-per-class` x K particles the classes are found "
             "on a random subset of that size and the last fine rounds assign every particle ('all': every "
             "particle in every round). Round times are means over the job's rounds of each kind (summary.json): "
             "coarse and fine on the particles the classes are found on, 'all-particle' the last rounds on every "
             "particle. Junk recall, good kept, selection precision and good-view purity as in docs/selection.md.", "",
             "| stack | K | shortlist | subset a class | threads | wall s | classify s | rounds | coarse round s | "
             "fine round s | all-particle round s | peak RSS MiB | junk recall | good kept | precision | "
             "good-view purity | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["classes"], key=lambda r: (r["stack"], r["K"], -r["shortlist"], -r.get("subset", 0))):
        lines.append(f"| {r['stack']} | {r['K']} | {r['shortlist'] or 'none'} | {r.get('subset') or 'all'} | "
                     f"{r['threads']} | {fmt(r['wall'], 0)} | {fmt(r['classify'], 0)} | {r['rounds']} | "
                     f"{fmt(r['coarse_round_s'])} | {fmt(r['fine_round_s'])} | {fmt(r.get('all_round_s'))} | "
                     f"{fmt(r['peak_rss_mib'], 0)} | {fmt(r['junk_recall'], 3)} | {fmt(r['good_kept'], 3)} | "
                     f"{fmt(r['precision'], 3)} | {fmt(r['good_view_purity'], 3)} | {r.get('note', '')} |")
    lines += ["", f"Machine: {results['machine'].get('classes', '?')}", ""]
    if results.get("relion_classes"):
        ours = {}  # the fastest row of each stack, K and threads that had the machine to itself
        for r in results["classes"]:
            key = (r["stack"], r["K"], r["threads"])
            if not r.get("note") and (key not in ours or r["wall"] < ours[key]["wall"]):
                ours[key] = r
        lines += ["### RELION Class2D on the same stacks (`python -m benchmarks.scale relion`)", "",
                  f"RELION 5 Class2D (EM, {RELION_ITERATIONS} iterations, as `benchmarks.class2d` runs it) on the "
                  "same stack, K and threads. Where stopped early, its whole time is estimated: the measured "
                  "iterations plus the rest at the mean of the last two (its first iterations are the slowest). "
                  "'ours': the fastest `cdae-em run` row above on that stack and K that ran alone (the whole job, "
                  "denoising included). A whole run's classes are selected by our rule (`cdae-em classify "
                  "--classes-from` its last _data.star) and scored as ours are.", "",
                  "| stack | K | threads | iterations run | their s | seconds per iteration | whole run s "
                  "(estimated where stopped) | peak RSS MiB | ours s | ours / RELION | junk recall | good kept | "
                  "precision | good-view purity | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(results["relion_classes"], key=lambda r: (r["stack"], r["K"], r["iterations"])):
            mine = ours.get((r["stack"], r["K"], r["threads"]))
            estimated = r["iterations"] < RELION_ITERATIONS
            lines.append(f"| {r['stack']} | {r['K']} | {r['threads']} | {r['iterations']} | {fmt(r['seconds'], 0)} | "
                         f"{', '.join(f'{x:.0f}' for x in r['iteration_s'])} | "
                         f"{'~' if estimated else ''}{fmt(r['estimated_s'], 0)} | {fmt(r['peak_rss_mib'], 0)} | "
                         f"{fmt(mine['wall'], 0) if mine else 'n/a'} | "
                         f"{fmt(mine['wall'] / r['estimated_s'], 2) if mine else 'n/a'} | "
                         f"{fmt(r.get('junk_recall'), 3)} | {fmt(r.get('good_kept'), 3)} | {fmt(r.get('precision'), 3)} | "
                         f"{fmt(r.get('good_view_purity'), 3)} | {r.get('note', '')} |")
        lines += ["", f"Machine: {results['machine'].get('relion_classes', '?')}", ""]
    return lines
