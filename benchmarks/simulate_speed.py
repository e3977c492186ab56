"""Simulator throughput: projections per second, and full noisy particles written to disk per second.

    python -m benchmarks.simulate_speed [--n 2000] [--j 2]

The 128^3 map is the embedded 64^3 map upsampled, so both boxes project the same structure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdae_em.core.geometry import euler_to_matrix, random_views
from cdae_em.simulate.simulator import MapProjector, SimulationSettings, load_source, simulate
from cdae_em.io.stacks import write_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="particles per measurement")
    parser.add_argument("--j", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.j)
    rng = np.random.default_rng(0)
    base = load_source(None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for box in (64, 128):
            vol = base.volume if box == base.box else F.interpolate(base.volume[None, None], size=(box,) * 3,
                                                                     mode="trilinear", align_corners=False)[0, 0]
            path = Path(tmp) / f"map{box}.mrc"
            write_map(path, vol.numpy(), base.pixel_size * base.box / box)
            rot, tilt = random_views(args.n, rng)
            mats = euler_to_matrix(rot, tilt, rng.uniform(0, 360, args.n))
            t0 = time.perf_counter()
            MapProjector(vol)(mats)
            t_proj = time.perf_counter() - t0
            settings = SimulationSettings(n_particles=args.n, in_plane=True, max_shift=3, ctf=True, snrs=[0.1])
            t0 = time.perf_counter()
            simulate(load_source(path), settings, Path(tmp) / f"sim{box}")
            t_sim = time.perf_counter() - t0
            rows.append((box, args.n / t_proj, args.n / t_sim))
    print(f"simulator speed, {args.n} particles, {args.j} threads")
    print("| box | projections/s | particles/s (projection + shift + CTF + noise + write) |")
    print("|---|---|---|")
    for box, p, s in rows:
        print(f"| {box} | {p:,.0f} | {s:,.0f} |")


if __name__ == "__main__":
    main()
