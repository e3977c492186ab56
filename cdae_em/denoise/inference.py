"""Inference of the cascade over image arrays too large for memory: block by block, batch by batch,
from one (memory-mapped) work array into the next, each process of a distributed run on its rows."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from cdae_em.runtime import distributed
from cdae_em.denoise.cascade import Cascade
from cdae_em.io.memory import Releaser
from cdae_em.denoise.train import autocast
from cdae_em.runtime.progress import report
from cdae_em.runtime.workarrays import shared_work_array


@torch.no_grad()
def run_block(block: torch.nn.Module, src: np.ndarray, dst: np.ndarray, device: torch.device, batch_size: int,
              desc: str, should_stop: Callable[[], None] | None = None) -> None:
    """dst[i] = block(src[i]) for all i, streamed in batches (in a distributed run, each rank its
    own rows of the shared ``dst``, and then waits for the others)."""
    block.eval().to(device)
    lo, hi = distributed.shard(len(src))
    pages = Releaser(src, dst)  # resident memory flat in N (cdae_em.io.memory)
    for start in tqdm(range(lo, hi, batch_size), desc=desc, unit="batch", leave=False, disable=None):
        if should_stop is not None:
            should_stop()
        x = torch.from_numpy(np.array(src[start:min(start + batch_size, hi)])).to(device)
        with autocast(device):
            y = block(x)
        dst[start:start + len(x)] = y.float().cpu().numpy()
        pages.step(2 * x.numel() * 4)
        report(start + len(x) - lo, hi - lo, desc)  # status.json: the images done (of this rank's)
    if isinstance(dst, np.memmap):
        dst.flush()
    pages.now()
    distributed.barrier()


def run_cascade(model: Cascade, inputs: np.ndarray, path: Path, device: torch.device, batch_size: int,
                should_stop: Callable[[], None] | None = None) -> np.ndarray:
    """All blocks of ``model`` over ``inputs``, into the work array ``path`` (one pass per block)."""
    x = inputs
    for j, block in enumerate(model.blocks, start=1):
        nxt = shared_work_array(path.with_name(f"{path.stem}_{j}.npy"), len(inputs), inputs.shape[-1])
        run_block(block, x, nxt, device, batch_size, f"block {j}: denoise", should_stop)
        if j > 1:
            del x
            if distributed.world().main:
                path.with_name(f"{path.stem}_{j - 1}.npy").unlink(missing_ok=True)
        x = nxt
    return x
