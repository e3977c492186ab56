"""The classification benchmark's ceiling: particles assigned to their true views' clean projections."""

from __future__ import annotations

import numpy as np

from benchmarks.class2d import ceiling
from cdae_em.geometry import euler_to_matrix, even_views
from cdae_em.simulate import SimulationSettings, load_source, simulate


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
