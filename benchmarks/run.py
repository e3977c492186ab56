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
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.config import ROOT, config, log
from benchmarks.datasets import PROTOCOLS, make_dataset
from benchmarks.report import figure_examples, figure_scale, machine, md_table, write_report
from benchmarks.tables import (calibrate_peers, knn_table, scale_table, settings_label, simulate_speed, speed_table,
                               table1_for, table2_for)


def main(argv=None) -> int:
    """The command line (``python -m benchmarks.run``); returns the exit code."""
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
    from cdae_em.denoise.weights import default_weights_path, load_weights

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


if __name__ == "__main__":
    raise SystemExit(main())
