"""Training the cascade: SNR-ladder pre-training and kNN-mean fine-tuning (Lei & Yang 2021,
Algorithm 1), on image arrays that may be memory-mapped (only batches are ever in memory).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cdae_em.cascade import DAEBlock, standardise

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """How one block is trained. The paper: RMSprop, MSE, 20 epochs."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "rmsprop"  # or "adam"
    val_fraction: float = 0.1
    seed: int = 0


def autocast(device: torch.device):
    """Mixed precision (bfloat16) on CUDA; a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batch(array, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of a (memory-mapped) array as a float32 tensor on ``device`` (read in sorted order)."""
    order = np.argsort(rows)
    data = np.asarray(array[rows[order]], dtype=np.float32)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return torch.from_numpy(data[inverse]).to(device, non_blocking=True)


def block_loss(block: DAEBlock, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between the block's output and the target, both in the input's standardised units.

    Scaling the target by the input's own mean and std makes the loss independent of each image's
    intensity scale, which differs between data sets and between blocks of the cascade.
    """
    x, mean, std = standardise(inputs)
    return nn.functional.mse_loss(block.net(x).float(), (targets - mean) / std)


def train_block(
    block: DAEBlock,
    inputs,
    targets,
    settings: TrainSettings,
    device: torch.device,
    desc: str = "train",
    rows: np.ndarray | None = None,
    should_stop: Callable[[], None] | None = None,
) -> list[dict]:
    """Train ``block`` to map ``inputs[i]`` to ``targets[i]``; returns per-epoch losses.

    ``inputs`` and ``targets`` are arrays (N, box, box), possibly memory-mapped; ``rows`` restricts
    training to those indices. A held-out ``val_fraction`` of them gives a validation loss
    (dropout off) after every epoch. ``should_stop`` is called between batches (abort hook).
    """
    rng = np.random.default_rng(settings.seed)
    rows = np.arange(len(inputs)) if rows is None else np.asarray(rows)
    rows = rng.permutation(rows)
    n_val = int(round(len(rows) * settings.val_fraction)) if len(rows) >= 10 else 0
    val_rows, train_rows = rows[:n_val], rows[n_val:]
    block.to(device)
    params = block.parameters()
    if settings.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=settings.lr)
    elif settings.optimizer == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=settings.lr)
    else:
        raise ValueError(f"unknown optimizer {settings.optimizer!r} (rmsprop or adam)")
    torch.manual_seed(settings.seed)
    history = []
    if len(val_rows):
        start_loss = evaluate_block(block, inputs, targets, val_rows, device, settings.batch_size * 4)
        history.append({"epoch": 0, "val_loss": start_loss})
        log.info("%s: validation loss before training %.4f", desc, start_loss)
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        block.train()
        order = rng.permutation(train_rows)
        total, count = 0.0, 0
        batches = range(0, len(order), settings.batch_size)
        for start in tqdm(batches, desc=f"{desc} epoch {epoch}", unit="batch", leave=False, disable=None):
            if should_stop is not None:
                should_stop()
            idx = order[start:start + settings.batch_size]
            x, t = _batch(inputs, idx, device), _batch(targets, idx, device)
            with autocast(device):
                loss = block_loss(block, x, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        record = {"epoch": epoch, "train_loss": total / max(count, 1), "seconds": 0.0}
        if len(val_rows):
            record["val_loss"] = evaluate_block(block, inputs, targets, val_rows, device, settings.batch_size * 4)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(record)
        log.info("%s epoch %d/%d: train loss %.4f%s (%.1f s)", desc, epoch, settings.epochs, record["train_loss"],
                 f", validation loss {record['val_loss']:.4f}" if "val_loss" in record else "", record["seconds"])
    block.eval()
    return history


@torch.no_grad()
def evaluate_block(block: DAEBlock, inputs, targets, rows: np.ndarray, device: torch.device, batch_size: int = 128) -> float:
    """Mean loss of ``block`` (eval mode) over ``rows``."""
    block.eval()
    total = 0.0
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        with autocast(device):
            total += float(block_loss(block, _batch(inputs, idx, device), _batch(targets, idx, device))) * len(idx)
    return total / max(len(rows), 1)


def settings_dict(settings: TrainSettings) -> dict:
    return asdict(settings)


def pretrain(
    source,
    out_dir,
    sim_settings,
    train_settings: TrainSettings,
    device: torch.device,
    channels: tuple[int, ...] | None = None,
    dropout: float = 0.5,
    metadata: dict | None = None,
    keep_ladder: bool = False,
):
    """Algorithm 1, line 1: pre-train block j on SNR-ladder pairs (level j -> level j+1).

    Simulates the ladder (``sim_settings.snrs``, e.g. 0.1, 0.4, 0.6, clean: one more level than
    blocks) from ``source`` into ``out_dir/ladder``, trains each block on its pair of levels, and
    writes ``out_dir/cdae_weights.pt`` with the settings and per-epoch losses in its metadata.
    """
    import json
    import shutil
    from pathlib import Path

    from cdae_em.cascade import DEFAULT_CHANNELS, Cascade
    from cdae_em.simulate import level_name, simulate
    from cdae_em.weights import save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    levels = list(sim_settings.snrs)
    if len(levels) < 2:
        raise ValueError("an SNR ladder needs at least two levels")
    ladder_dir = out / "ladder"
    manifest = simulate(source, sim_settings, ladder_dir, overwrite=True, single_name=None)
    stacks = [ladder_dir / (manifest["clean"] if s is None else manifest["levels"][level_name(s)]["stack"]) for s in levels]
    arrays = [np.load(p, mmap_mode="r") if p.suffix == ".npy" else _mrc_array(p) for p in stacks]
    model = Cascade(n_blocks=len(levels) - 1, channels=tuple(channels or DEFAULT_CHANNELS), dropout=dropout)
    history = []
    for j, block in enumerate(model.blocks):
        name = f"block {j + 1} ({level_name(levels[j])} -> {level_name(levels[j + 1])})"
        log.info("pre-training %s on %d pairs", name, len(arrays[j]))
        settings = TrainSettings(**{**asdict(train_settings), "seed": train_settings.seed + j})
        history.append({"block": j + 1, "input": level_name(levels[j]), "target": level_name(levels[j + 1]),
                        "epochs": train_block(block, arrays[j], arrays[j + 1], settings, device, desc=f"block {j + 1}")})
    meta = {
        **(metadata or {}),
        "simulation": manifest["settings"],
        "source": manifest["source"],
        "train": asdict(train_settings),
        "history": history,
    }
    save_weights(model.cpu(), out / "cdae_weights.pt", meta)
    (out / "pretrain.json").write_text(json.dumps(meta, indent=2))
    del arrays
    if not keep_ladder:
        shutil.rmtree(ladder_dir, ignore_errors=True)
    return model, history


def _mrc_array(path):
    """A memory-mapped MRC stack as a read-only (N, box, box) array."""
    import mrcfile

    return mrcfile.mmap(path, mode="r").data
