"""The classification benchmark's ceiling: particles assigned to their true views' clean projections."""

from __future__ import annotations

import numpy as np

from benchmarks.class2d import ceiling, write_report
from cdae_em.core.geometry import euler_to_matrix, even_views
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate


def test_ceiling_finds_the_true_views_and_the_most_alike_pair(tmp_path):
    source = load_source(None, box=32)
    simulate(source, SimulationSettings(n_particles=90, n_views=3, in_plane=True, max_shift=1.0, ctf=True,
                                        snrs=[1.0], seed=4), tmp_path)
    rot, tilt = even_views(3)
    clean = source.project(euler_to_matrix(rot, tilt, np.zeros(3))).cpu().numpy()
    high = ceiling(tmp_path, clean)
    assert high["f1"] > 0.95 and 0.0 < high["most_alike"] < 0.999
    assert sorted(high["most_alike_views"]) == high["most_alike_views"] and set(high["most_alike_views"]) <= {1, 2, 3}
    # two identical "views": their particles cannot be told apart, and the pair is flagged as alike
    twin = clean.copy()
    twin[1] = clean[0]
    low = ceiling(tmp_path, twin)
    assert low["f1"] < 0.9 and low["most_alike_views"] == [1, 2]
    assert low["most_alike"] > 0.97 and low["most_alike"] > high["most_alike"]  # rotation by bilinear interpolation


def test_report_shows_where_cdae_em_time_goes(tmp_path):
    common = {"n": 1200, "k": 8, "f1": 0.9, "ari": 0.8, "rss_mib": 900.0, "frc_res_a": 8.0, "invocation": "x",
              "command": "cmd"}
    results = {"2XHE|0.05|run": {**common, "wall_s": 83.0, "stages": {"denoise": 30.2, "classify": 44.6, "outputs": 1.5},
                                 "rss_method": "vmhwm"},
               "2XHE|0.05|classify": {**common, "wall_s": 48.0},  # scored before stage times were kept
               "2XHE|0.05|relion": {**common, "f1": 0.7, "wall_s": 205.0, "stages": {}}}
    path = tmp_path / "class2d.md"
    write_report(results, {}, path, None)
    text = path.read_text()
    table = text.split("## Where `cdae-em`'s time goes")[1]
    assert "| 2XHE | 0.05 | `cdae-em run` (defaults) | 30 | 45 | 2 | 83 |" in table
    assert "classify` (raw" not in table and "RELION" not in table.split("##")[0]
    assert "| 2XHE | 0.05 | 0.900 / 0.700 | cdae-em | 83 / 205 | 0.40 | - |" in text
    all_rows = text.split("## All results")[1]
    assert "| 83 | 900 | 8.0 |" in all_rows and "| 48 | <= 900 | 8.0 |" in all_rows  # wait4 rows: upper bounds


def test_the_report_comes_from_the_kept_scores_alone(tmp_path):
    """Scores and ceilings live in one JSON file next to the report (docs/class2d.json), so
    ``--report`` rebuilds the tables without the programs' outputs (an empty work directory)."""
    import json

    from benchmarks.class2d import main

    row = {"n": 1200, "k": 8, "f1": 0.912, "ari": 0.8, "rss_mib": 900.0, "frc_res_a": 8.0, "invocation": "x",
           "command": "cmd", "wall_s": 83.0, "stages": {}, "rss_method": "vmhwm"}
    kept = {"results": {"1FAT|0.05|run": row, "1FAT|0.05|relion": {**row, "f1": 0.383, "wall_s": 200.0}},
            "ceilings": {"1FAT|0.05": {"f1": 0.863, "ari": 0.7, "most_alike": 0.98, "most_alike_views": [1, 3]}}}
    scores = tmp_path / "class2d.json"
    scores.write_text(json.dumps(kept))
    out = tmp_path / "class2d.md"
    assert main(["--report", "--results", str(scores), "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    assert "| 1FAT | 0.05 | 0.912 / 0.383 | cdae-em | 83 / 200 | 0.41 | 0.863 |" in out.read_text()
    assert json.loads(scores.read_text()) == kept
