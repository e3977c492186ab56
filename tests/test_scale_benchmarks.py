"""The scale benchmarks' scripts run (tiny sizes on CPU; their numbers mean nothing here)."""

from __future__ import annotations

import json

from benchmarks import gpu, scale


def test_gpu_script_runs_on_cpu(capsys):
    assert gpu.main(["--device", "cpu", "--boxes", "32", "--n", "8", "--refs", "2", "--batch", "8", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "| CPU" in out and "| 32 |" in out


def test_report_renders_every_section():
    results = {
        "machine": {"knn": "m", "run": "m", "inference": "m", "classes": "m"},
        "classes": [{"stack": "s", "n": 1200, "K": 50, "shortlist": s, "threads": 2, "wall": 300.0, "classify": 250.0,
                     "rounds": 30, "coarse_round_s": 4.4, "fine_round_s": None if s else 30.7, "peak_rss_mib": 1100.0,
                     "junk_recall": 0.8, "good_kept": 0.9, "precision": 0.95, "good_view_purity": 0.5} for s in (0, 8)]
        + [{"stack": "s", "n": 10000, "K": 50, "shortlist": 8, "subset": 100, "threads": 2, "wall": 900.0,
            "classify": 800.0, "rounds": 40, "coarse_round_s": 10.0, "fine_round_s": 20.0, "all_round_s": 70.0,
            "peak_rss_mib": 1200.0, "junk_recall": 0.8, "good_kept": 0.9, "precision": 0.95, "good_view_purity": 0.5}],
        "knn": [{"n": 100000, "data": "features", "method": "exact (torch, tiled)", "queries": 100000,
                 "seconds": 48.0, "recall": 1.0, "note": "measured"}],
        "run": [{"n": 2000, "processes": 1, "threads": 2, "wall": 100.0, "denoise": 60.0, "classify": 30.0,
                 "outputs": 5.0, "peak_rss_mib": 900.0, "peak_anon_mib": 612.0, "work_gb": 0.1,
                 "same_classes_as_1": True},
                {"n": 2000, "processes": 2, "threads": 1, "wall": 100.0, "denoise": 60.0, "classify": 30.0,
                 "outputs": 5.0, "peak_rss_mib": 900.0, "work_gb": 0.1, "same_classes_as_1": True,
                 "note": "an older build"}],
        "inference": [{"n": 100000, "wall": 1000.0, "peak_rss_mib": 800.0, "images_per_s": 100.0, "work_gb": 3.3}],
        "gpu": [{"device": "CPU (2 threads)", "box": 64, "inference_images_per_s": 1.0, "finetune_epoch_s": 1.0,
                 "finetune_images_per_s": 1.0, "align_round_s": 1.0, "align_images_per_s": 1.0}],
    }
    text = scale.report(results)
    assert "| 100,000 | features | exact (torch, tiled)" in text and "| 2,000 | 2 x 1 |" in text
    assert text.split("| 2,000 | 2 x 1 |")[1].splitlines()[0].rstrip().endswith("| yes | an older build |")  # same classes, note
    assert text.split("| 2,000 | 1 x 2 |")[1].splitlines()[0].rstrip().endswith("| (reference) |  |")  # not compared with itself
    assert "| 900 | 612 | 0.10 | (reference)" in text  # the anonymous peak next to the RSS
    assert "| 900 | n/a | 0.10 | yes" in text  # a row measured before the anonymous peak was
    assert "Pending: no GPU" in text  # CPU smoke rows are not a GPU table
    rows = [line for line in text.splitlines() if line.startswith("| s | 50 |")]
    assert rows[0].startswith("| s | 50 | 8 | 100 | 2 | 900 | 800 | 40 | 10.0 | 20.0 | 70.0 | 1,200 |")  # on a subset
    assert rows[1].startswith("| s | 50 | 8 | all | 2 | 300 | 250 | 30 | 4.4 | n/a | n/a | 1,100 | 0.800 |")
    assert rows[2].startswith("| s | 50 | none | all | 2 | 300 | 250 | 30 | 4.4 | 30.7 |")  # a row from before subsets


def test_benchmarks_report_carries_the_scale_tables():
    from benchmarks.config import config
    from benchmarks.report import scale_section

    assert scale_section(config("tiny")) == ""  # the smoke test's report stays small
    section = scale_section(config("quick"))
    if not scale.RESULTS.exists():
        assert section == ""
        return
    assert section.startswith("## Scale at 2,000-32,000 particles")
    assert "### `cdae-em run`" in section and "\n## " not in section  # scale.md's sections nested under it
    results = json.loads(scale.RESULTS.read_text())
    for row in results.get("run", []):
        assert f"| {row['n']:,} | {row['processes']} x {row['threads']} |" in section


def test_classes_rows_name_the_subset_the_job_uses():
    """A job finds its classes on a subset only above subset_per_class x K particles; the benchmark
    records (and names its job directory by) what the job does."""
    from benchmarks.scale_classes import effective_subset, job_name, mean_seconds
    from cdae_em.classify.stage import _subset
    from cdae_em.settings import ClassifySettings

    for n, k, per_class in [(1200, 12, 100), (10000, 50, 100), (10000, 50, 200), (100000, 100, 0)]:
        chosen = _subset(n, ClassifySettings(n_classes=k, subset_per_class=per_class))
        assert effective_subset(n, k, per_class) * k == (0 if chosen is None else len(chosen))
    assert job_name(50, 8, 0) == "run_K50_shortlist8" and job_name(50, 8, 100) == "run_K50_shortlist8_subset100"
    history = [{"search": "coarse", "stage": "refine", "seconds": 1.0}, {"search": "fine", "stage": "refine", "seconds": 2.0},
               {"search": "fine", "stage": "all particles", "seconds": 9.0}]
    assert (mean_seconds(history, "fine"), mean_seconds(history, "fine", "all particles")) == (2.0, 9.0)


def test_relion_comparison_takes_our_fastest_run_that_had_the_machine_to_itself():
    """'ours / RELION' compares with the fastest of our rows at that stack and K, leaving out rows
    whose note says they shared the machine (their times are inflated)."""
    from benchmarks.scale_classes import classes_report

    base = {"stack": "s", "n": 1200, "K": 50, "shortlist": 8, "threads": 2, "classify": 1.0, "rounds": 30,
            "coarse_round_s": 1.0, "fine_round_s": 1.0, "peak_rss_mib": 1.0, "junk_recall": 0.8, "good_kept": 0.9,
            "precision": 0.9, "good_view_purity": 0.5}
    results = {"machine": {"classes": "m", "relion_classes": "m"},
               "classes": [{**base, "wall": 400.0}, {**base, "wall": 250.0, "subset": 100},
                           {**base, "wall": 90.0, "subset": 50, "note": "shared the cores"}],
               "relion_classes": [{"stack": "s", "n": 1200, "K": 50, "threads": 2, "iterations": 25, "seconds": 500.0,
                                   "iteration_s": [20.0] * 25, "estimated_s": 500.0, "peak_rss_mib": 40.0}]}
    row = [line for line in classes_report(results) if line.startswith("| s | 50 | 2 | 25 |")]
    assert row and [cell.strip() for cell in row[0].split("|")][9:11] == ["250", "0.50"]


def test_a_whole_relion_run_shows_how_our_selection_scores_its_classes():
    """The RELION table carries the junk recall, good kept, precision and purity of a whole run's
    classes under our selection rule, and its note; a run stopped early shows n/a there."""
    from benchmarks.scale_classes import classes_report

    row = {"stack": "s", "n": 1200, "threads": 2, "seconds": 500.0, "iteration_s": [20.0], "estimated_s": 500.0,
           "peak_rss_mib": 40.0}
    results = {"machine": {"classes": "m", "relion_classes": "m"},
               "classes": [{"stack": "s", "n": 1200, "K": 50, "shortlist": 8, "threads": 2, "wall": 250.0,
                            "classify": 1.0, "rounds": 30, "coarse_round_s": 1.0, "fine_round_s": 1.0,
                            "peak_rss_mib": 1.0, "junk_recall": 0.8, "good_kept": 0.9, "precision": 0.9,
                            "good_view_purity": 0.5}],
               "relion_classes": [{**row, "K": 50, "iterations": 25, "junk_recall": 0.812, "good_kept": 0.987,
                                   "precision": 0.93, "good_view_purity": 0.41, "note": "shared the cores"},
                                  {**row, "K": 12, "iterations": 4}]}
    lines = classes_report(results)
    whole = [line for line in lines if line.startswith("| s | 50 | 2 | 25 |")][0]
    early = [line for line in lines if line.startswith("| s | 12 | 2 | 4 |")][0]
    assert [cell.strip() for cell in whole.split("|")][11:16] == ["0.812", "0.987", "0.930", "0.410", "shared the cores"]
    assert [cell.strip() for cell in early.split("|")][11:15] == ["n/a"] * 4
