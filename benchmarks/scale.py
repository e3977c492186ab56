"""Cost as the work grows (issues 13, 26): kNN at 10^5-10^6 feature vectors, `cdae-em run` at 2k-32k
particles in 1 and 2 processes, streamed inference memory, `cdae-em run` at K = 12-100 classes;
results in docs/scale.json, tables in docs/scale.md.

    python -m benchmarks.scale knn [--sizes 100000,1000000] [--work DIR]
    python -m benchmarks.scale run [--sizes 2000,8000,32000] [--procs 1,2] [--work DIR]
    python -m benchmarks.scale inference [--n 100000] [--work DIR]
    python -m benchmarks.scale classes [--K 12,50,100] [--shortlists 8,0] [--subsets 100] [--n 1200] [--rescore]
    python -m benchmarks.scale relion --relion-bin DIR [--K 50] [--n 10000] [--iterations 5]
    python -m benchmarks.scale report          # docs/scale.md from docs/scale.json

Every measuring command adds its rows to docs/scale.json (replacing rows of the same size) and
rewrites docs/scale.md. Run them one at a time on an otherwise idle machine (the numbers are wall
times): on a shared machine, e.g. `flock /tmp/cdae_heavy.lock python -m benchmarks.scale knn`.

kNN data: the 32-d PCA features `cdae-em` fine-tunes with (``neighbours.invariant_features`` +
``reduce_features``) of simulated particles (default map, 64 px, SNR 0.1, CTF, random psi and
shifts) for up to ``--real-n`` vectors; above that, vectors drawn from a Gaussian mixture fitted to
those features (a proxy: the table has the proxy at 10^5 next to the real features, to show how
far it differs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.scale_classes import KEYS, RELION_KEYS, classes_report, cmd_classes, cmd_relion, run_one
from benchmarks.scale_results import REPORT, RESULTS, fmt, log, measured, merge

K = 30


# ----------------------------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------------------------
def real_features(n: int, work: Path, j: int) -> np.ndarray:
    """(n, 32) features of n simulated particles (cached in ``work``)."""
    cache = work / f"features_{n}.npy"
    if cache.exists():
        return np.load(cache)
    from cdae_em.core.neighbours import invariant_features, reduce_features
    from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
    from cdae_em.io.images import ImageSource

    sim = work / f"sim_{n}"
    if not (sim / "simulation.json").exists():
        log(f"simulating {n} particles ...")
        simulate(load_source(None, box=64), SimulationSettings(n_particles=n, in_plane=True, max_shift=3.0, ctf=True,
                                                               snrs=[0.1], seed=0), sim)
    log(f"features of {n} particles ...")
    torch.set_num_threads(j)
    with ImageSource(sim / "particles.star") as images:
        class Rows:
            shape = (images.n, images.box, images.box)

            def __len__(self):
                return images.n

            def __getitem__(self, rows):
                if isinstance(rows, slice):
                    rows = np.arange(*rows.indices(images.n))
                return images.read(np.asarray(rows))

        feats = invariant_features(Rows())
    features = reduce_features(feats, 32).numpy()
    np.save(cache, features)
    return features


def proxy_features(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n vectors from a Gaussian mixture (32 components, full covariances) fitted to ``real``."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(len(real), size=min(len(real), 30000), replace=False)
    gmm = GaussianMixture(32, covariance_type="full", max_iter=30, random_state=seed).fit(real[fit_rows])
    return gmm.sample(n)[0].astype(np.float32)


def knn_rows(x: np.ndarray, label: str, j: int, exact_full: bool) -> list[dict]:
    """Exact and HNSW kNN (k = 30, all vectors as queries) of ``x``: time and recall."""
    from cdae_em.core.knn import HNSW_EF_SEARCH, HNSW_M, HNSW_RERANK, find_neighbours
    from cdae_em.core.neighbours import nearest_neighbours

    torch.set_num_threads(j)
    n = len(x)
    f = torch.from_numpy(np.ascontiguousarray(x))
    rows = []
    if exact_full:
        t0 = time.perf_counter()
        nearest_neighbours(f, K)
        rows.append({"n": n, "data": label, "method": "exact (torch, tiled)", "queries": n,
                     "seconds": time.perf_counter() - t0, "recall": 1.0, "note": "measured"})
    else:  # N^2: time a sample of queries and scale
        q = np.random.default_rng(1).choice(n, size=10000, replace=False)
        t0 = time.perf_counter()
        nearest_neighbours(f, K, queries=torch.from_numpy(q))
        dt = time.perf_counter() - t0
        rows.append({"n": n, "data": label, "method": "exact (torch, tiled)", "queries": n, "seconds": dt * n / len(q),
                     "recall": 1.0, "note": f"extrapolated from {len(q):,} queries ({dt:.0f} s)"})
    q = np.sort(np.random.default_rng(2).choice(n, size=min(n, 4000), replace=False))
    t0 = time.perf_counter()
    nearest_neighbours(f, K, queries=torch.from_numpy(q))
    rows.append({"n": n, "data": label, "method": "exact, fine-tuning subset", "queries": len(q),
                 "seconds": time.perf_counter() - t0, "recall": 1.0, "note": "measured (what `cdae-em` runs)"})
    log(f"HNSW on {n:,} ({label}) ...")
    found = find_neighbours(f, K, method="hnsw", recall_sample=2000, threads=j)
    rows.append({"n": n, "data": label, "method": f"HNSW (faiss, M {HNSW_M}, efSearch {HNSW_EF_SEARCH}, SQ8 + exact re-rank of {HNSW_RERANK})",
                 "queries": n, "seconds": found.seconds, "recall": found.recall,
                 "note": f"measured; includes the recall estimate on 2,000 exact queries ({found.recall_seconds:.0f} s)"})
    for r in rows:
        log(f"  {r}")
    return rows


def cmd_knn(args) -> list[dict]:
    sizes = [int(s) for s in args.sizes.split(",")]
    real = real_features(args.real_n, args.work, args.j)
    rows = []
    for n in sizes:
        if n <= len(real):
            rows += knn_rows(real[:n], "features", args.j, exact_full=n <= 200000)
            if n == len(real) and max(sizes) > len(real):
                rows += knn_rows(proxy_features(real, n), "proxy", args.j, exact_full=False)
        else:
            rows += knn_rows(proxy_features(real, n), "proxy", args.j, exact_full=False)
    return rows


# ----------------------------------------------------------------------------------------------
# `cdae-em run` and streamed inference, in child processes
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(procs: int) -> list[str]:
    """How to start cdae-em in ``procs`` processes on this machine."""
    if procs == 1:
        return [sys.executable, "-m", "cdae_em"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_port", str(free_port()), "-m", "cdae_em"]


def cmd_run(args) -> list[dict]:
    from benchmarks.datasets import make_dataset

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        ds = make_dataset("2XHE", "realistic", n, 64, args.work)
        for procs in [int(p) for p in args.procs.split(",")]:
            out = ds.dir / f"run_{procs}p"
            threads = max(1, args.j // procs)  # the same cores in all: 2 processes x 1 thread on 2 cores
            shutil.rmtree(out, ignore_errors=True)  # a rerun of the same job would resume, not measure
            log(f"cdae-em run, {n:,} particles, {procs} process(es) x {threads} thread(s) ...")
            wall, rss, anon = measured(launcher(procs) + ["run", "--i", str(ds.star), "--o", str(out), "--K", str(ds.n_views),
                                                    "--j", str(threads), "--overwrite", "--log-level", "WARNING"],
                                 ds.dir)
            summary = json.loads((out / "summary.json").read_text())
            tm = summary["timings"]
            rows.append({"n": n, "processes": procs, "threads": threads, "wall": wall, "denoise": tm.get("denoise"),
                         "classify": tm.get("classify"), "outputs": tm.get("outputs"), "peak_rss_mib": rss,
                         "peak_anon_mib": anon,
                         "work_gb": summary["denoise"].get("work_bytes", 0) / 1e9,
                         "classes": _labels(out)})
            # against the 1-process run of this size, from this command or an earlier one
            base = ds.dir / "run_1p" / "particles.star"
            classes = rows[-1].pop("classes")
            rows[-1]["same_classes_as_1"] = _labels(base.parent) == classes if procs > 1 and base.exists() else None
            log(f"  {rows[-1]}")
            merge("run", rows[-1:], ("n", "processes"))  # saved row by row: a 32k run takes the better part of an hour
    return rows


def _labels(out: Path) -> list[int]:
    from cdae_em.io.star import read_particles

    return read_particles(out / "particles.star").particles["rlnClassNumber"].astype(int).tolist()


def cmd_inference(args) -> list[dict]:
    """`cdae-em denoise --no-finetune --no-check` on n particles (read, 3 blocks, write): peak RSS."""
    n = args.n
    sim = args.work / f"sim_{n}"
    if not (sim / "simulation.json").exists():
        from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate

        simulate(load_source(None, box=64), SimulationSettings(n_particles=n, in_plane=True, max_shift=3.0, ctf=True,
                                                               snrs=[0.1], seed=0), sim)
    out = sim / "denoise_job"
    shutil.rmtree(out, ignore_errors=True)
    log(f"streamed inference of {n:,} particles ...")
    wall, rss, anon = measured(launcher(1) + ["denoise", "--i", str(sim / "particles.star"), "--o", str(out), "--no-finetune",
                                        "--no-check", "--j", str(args.j), "--overwrite", "--log-level", "WARNING"], sim)
    summary = json.loads((out / "summary.json").read_text())
    row = {"n": n, "wall": wall, "peak_rss_mib": rss, "peak_anon_mib": anon, "images_per_s": n / summary["timings"]["denoise"],
           "work_gb": summary["denoise"].get("work_bytes", 0) / 1e9}
    log(f"  {row}")
    return [row]


# ----------------------------------------------------------------------------------------------
# results and report
# ----------------------------------------------------------------------------------------------
def same_classes(row: dict) -> str:
    """The run table's "same classes as 1 process" cell: a 1-process row is the reference itself."""
    return "(reference)" if row["processes"] == 1 else fmt(row["same_classes_as_1"])


def report(results: dict) -> str:
    lines = ["# Scale: cost as the work grows", "",
             "Generated by `python -m benchmarks.scale` (see its docstring) from docs/scale.json; numbers are "
             "wall times as measured on the machine named under each table, which was shared with other jobs "
             "(expect +-30%).", ""]
    if results.get("knn"):
        from cdae_em.core import knn
        threshold = round(knn.APPROX_S_PER_VECTOR / knn.EXACT_S_PER_PAIR, -3)
        lines += ["## kNN (k = 30, 32-d features)", "",
                  "All-pairs: every vector's 30 nearest neighbours among all (what fine-tuning on every particle "
                  "would need). `cdae-em` itself asks only for its fine-tuning subset's neighbours (4,000 queries "
                  "by default), exactly, and switches to the approximate index when `cdae_em.core.knn`'s cost "
                  f"model says it is faster (from ~{threshold:,.0f} queries on) and faiss-cpu is installed. Recall: the "
                  "fraction of the exact 30 neighbours found, on 2,000 random queries. 'proxy': Gaussian-mixture vectors fitted to the real features.", "",
                  "| vectors | data | method | queries | seconds | recall@30 | how |", "|---|---|---|---|---|---|---|"]
        for r in sorted(results["knn"], key=lambda r: (r["n"], r["data"], r["method"])):
            lines.append(f"| {r['n']:,} | {r['data']} | {r['method']} | {r['queries']:,} | {fmt(r['seconds'])} | "
                         f"{fmt(r['recall'], 3)} | {r['note']} |")
        lines += ["", f"Machine: {results['machine'].get('knn', '?')}", ""]
    if results.get("run"):
        lines += ["## `cdae-em run` (64 px, defaults, realistic protocol: 2XHE, 12 views, SNR 0.05)", "",
                  "Two processes: `torchrun --nproc_per_node 2`, one thread each, on the same two cores as one "
                  "process with two threads. Peak RSS: the largest single process (VmHWM). It counts file-backed "
                  "pages too: torch's libraries and the pages of the memory-mapped stacks and work arrays read so "
                  "far, which the kernel can drop and re-read. Anonymous: the largest heap/array part (RssAnon, "
                  "sampled every 0.2 s), what the job cannot give back; n/a where not measured.", "",
                  "| particles | processes x threads | wall s | denoise s | classify s | outputs s | peak RSS MiB | "
                  "anonymous MiB | largest .cdae_work GB | same classes as 1 process | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(results["run"], key=lambda r: (r["n"], r["processes"])):
            lines.append(f"| {r['n']:,} | {r['processes']} x {r['threads']} | {fmt(r['wall'])} | {fmt(r['denoise'])} | "
                         f"{fmt(r['classify'])} | {fmt(r['outputs'])} | {fmt(r['peak_rss_mib'], 0)} | "
                         f"{fmt(r.get('peak_anon_mib'), 0)} | {fmt(r['work_gb'], 2)} | {same_classes(r)} | {r.get('note', '')} |")
        lines += ["", f"Machine: {results['machine'].get('run', '?')}", ""]
    if results.get("inference"):
        lines += ["## Streamed inference (`cdae-em denoise --no-finetune --no-check`, 64 px)", "",
                  "| particles | wall s | images/s (denoise stage) | peak RSS MiB | largest .cdae_work GB | note |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(results["inference"], key=lambda r: r["n"]):
            lines.append(f"| {r['n']:,} | {fmt(r['wall'])} | {fmt(r['images_per_s'])} | {fmt(r['peak_rss_mib'], 0)} | "
                         f"{fmt(r['work_gb'], 2)} | {r.get('note', '')} |")
        lines += ["", f"Machine: {results['machine'].get('inference', '?')}", ""]
    lines += classes_report(results)
    missing = [f"`cdae-em run` at {n:,} particles, {p} process(es)" for n in (2000, 8000, 32000) for p in (1, 2)
               if (n, p) not in {(r["n"], r["processes"]) for r in results.get("run", [])}]
    if not any(r["n"] >= 100000 for r in results.get("inference", [])):
        missing.append("streamed inference at 10^5 particles (`python -m benchmarks.scale inference`)")
    if missing:
        lines += ["## Not measured yet", "", *[f"- {m}" for m in missing], ""]
    gpu = [r for r in results.get("gpu", []) if not r["device"].startswith("CPU")]
    n_gpu = f"{gpu[0].get('n', 4000):,}" if gpu else "4,000"
    lines += ["## GPU (`python -m benchmarks.gpu`)", "",
              "Inference of the cascade, one fine-tuning epoch of one block and one alignment round "
              f"({n_gpu} images, 50 references) at 64/128/256 px.", ""]
    if not gpu:
        lines += ["Pending: no GPU has been lent to this project yet; run `python -m benchmarks.gpu` on one.", ""]
    else:
        lines += ["| device | box | inference img/s | fine-tuning epoch s (img/s) | alignment round s (img/s) |",
                  "|---|---|---|---|---|"]
        for r in sorted(gpu, key=lambda r: (r["device"], r["box"])):
            lines.append(f"| {r['device']} | {r['box']} | {r['inference_images_per_s']:,.0f} | "
                         f"{r['finetune_epoch_s']:.2f} ({r['finetune_images_per_s']:,.0f}) | "
                         f"{r['align_round_s']:.2f} ({r['align_images_per_s']:,.0f}) |")
        lines += ["", f"Machine: {results['machine'].get('gpu', '?')}", ""]
    match = results.get("gpu_match")
    if match:
        lines += ["### CUDA against the CPU (`python -m benchmarks.gpu_match`)", "",
                  f"`{match['command']}`: {match['stack']}. CPU {match['cpu_s']} s, CUDA {match['cuda_s']} s.", "",
                  f"- The same: {match['same']}.", f"- Different: {match['differs']}.",
                  f"- Found on the way: {match['found']}.", f"- Not measured: {match['not_measured']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["knn", "run", "inference", "classes", "relion", "report", "run-one"])
    parser.add_argument("--sizes", help="comma list (knn default 100000,1000000; run default 2000,8000,32000)")
    parser.add_argument("--real-n", type=int, default=100000, help="simulated particles for real kNN features")
    parser.add_argument("--procs", default="1,2", help="process counts for `run` (default: 1,2)")
    parser.add_argument("--n", type=int, help="particles for `inference` (default 100000) and `classes` (1200)")
    parser.add_argument("--j", type=int, default=2, help="CPU threads in all (default: 2)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cdae_scale"), help="simulated data (kept for reruns)")
    parser.add_argument("--K", default="12,50,100", help="classes for `classes` (comma list)")
    parser.add_argument("--shortlists", default="8,0", help="`classes`: classify.shortlist values (0: none)")
    parser.add_argument("--subsets", default="100", help="`classes`: --subset-per-class values (0: every particle)")
    parser.add_argument("--protein", default="1BHL", help="`classes`: the junk stack's structure")
    parser.add_argument("--junk", type=float, default=0.3, help="`classes`: the junk stack's junk fraction")
    parser.add_argument("--rescore", action="store_true",
                        help="`classes`: resume the measured jobs (outputs and selection written again), score again")
    parser.add_argument("--relion-bin", type=Path, help="`relion`: directory of relion_refine")
    parser.add_argument("--iterations", type=int, default=5,
                        help="`relion`: stop RELION after this many iterations (25: a whole run; default: 5)")
    parser.add_argument("--note", help="`relion`: a note for its rows (e.g. that other jobs shared the machine)")
    parser.add_argument("--star", help=argparse.SUPPRESS)  # run-one
    parser.add_argument("--o", help=argparse.SUPPRESS)
    parser.add_argument("--shortlist", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--subset", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.what == "run-one":
        args.K = int(args.K)
        run_one(args)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "knn":
        args.sizes = args.sizes or "100000,1000000"
        results = merge("knn", cmd_knn(args), ("n", "data", "method"))
    elif args.what == "run":
        args.sizes = args.sizes or "2000,8000,32000"
        results = merge("run", cmd_run(args), ("n", "processes"))
    elif args.what == "classes":
        args.n = args.n or 1200
        results = merge("classes", cmd_classes(args), KEYS)
    elif args.what == "relion":
        args.n = args.n or 10000
        results = merge("relion_classes", cmd_relion(args), RELION_KEYS)
    elif args.what == "inference":
        args.n = args.n or 100000
        results = merge("inference", cmd_inference(args), ("n",))
    else:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    REPORT.write_text(report(results))
    print(REPORT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
