"""Training the cascade: pre-training on simulated pairs and kNN-mean fine-tuning (Lei & Yang 2021,
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

from cdae_em.denoise.cascade import DAEBlock, standardise
from cdae_em.runtime.progress import report
from cdae_em.settings import TrainSettings

log = logging.getLogger(__name__)


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


def block_loss(block: DAEBlock, inputs: torch.Tensor, targets: torch.Tensor,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the block's output and the target, in units of ``scale`` (per image, (N, 1, 1)),
    by default the input's standard deviation.

    Scaling by each image's own spread makes the loss independent of intensity scales, which differ
    between data sets. In pre-training every block's loss is in units of the noisy particle's
    spread (``scale``): a later block's input, a denoised image, is nearly flat at very low SNR, and
    dividing by its own spread would let those hopeless images dominate the loss.
    """
    x, mean, std = standardise(inputs)
    if scale is None:
        return nn.functional.mse_loss(block.net(x).float(), (targets - mean) / std)
    return nn.functional.mse_loss((block.net(x).float() * std + mean - targets) / scale, torch.zeros_like(targets))


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
    opt = _optimiser(block.parameters(), settings.optimizer, settings.lr)
    torch.manual_seed(settings.seed)
    model, part = _data_parallel(block, device)
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
            if len(idx) < part.size:
                continue  # too few for one image per rank
            mine = np.array_split(idx, part.size)[part.rank]  # the same global batch as one process, split
            x, t = _batch(inputs, mine, device), _batch(targets, mine, device)
            with autocast(device):
                loss = block_loss(model, x, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(mine)
            count += len(mine)
        if part.size > 1:
            from cdae_em.runtime.distributed import all_reduce_sum

            total, count = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        record = {"epoch": epoch, "train_loss": total / max(count, 1), "seconds": 0.0}
        if len(val_rows):
            record["val_loss"] = evaluate_block(block, inputs, targets, val_rows, device, settings.batch_size * 4)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(record)
        report(epoch, settings.epochs, "epoch")
        log.info("%s epoch %d/%d: train loss %.4f%s (%.1f s)", desc, epoch, settings.epochs, record["train_loss"],
                 f", validation loss {record['val_loss']:.4f}" if "val_loss" in record else "", record["seconds"])
    block.eval()
    return history


def _data_parallel(block: DAEBlock, device: torch.device):
    """(what ``block_loss`` trains, this process's World): in a distributed run the block's network
    wrapped in DistributedDataParallel (gradients averaged over ranks, each rank a slice of every
    batch), else the block itself."""
    from cdae_em.runtime import distributed

    part = distributed.world()
    if part.size == 1:
        return block, part
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return SimpleNamespace(net=DistributedDataParallel(_Net(block), device_ids=ids)), part


class _Net(nn.Module):
    """A block's ``net`` (the autoencoder on standardised images) as a module's forward, for DDP."""

    def __init__(self, block: DAEBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.net(x)


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


@dataclass
class PretrainSettings:
    """How the cascade is pre-trained on simulated pairs (``cdae_em.simulate.pretrain_data``).

    Every block learns to predict the *clean* image, and block j+1 is trained on block j's outputs,
    which is what it receives in the cascade. The paper's SNR ladder (0.1 -> 0.4 -> 0.6 -> clean)
    trains each block towards a noisier target; with independent noise in the target the MSE
    minimiser is the same (the clean image's conditional mean, as in Noise2Noise), so clean targets
    only remove gradient noise.
    """

    steps: tuple[int, ...] = (2400, 800, 800)  # optimiser steps per block
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"  # or "rmsprop" (the paper's)
    val_pairs: int = 256
    eval_every: int = 100
    # block j+1 starts from block j's trained weights: a denoiser applied to a denoised image
    # changes it little, a far better start than the paper's ladder weights (block 1 applied twice
    # lost 0.3 dB on the validation pairs, the 0.1 block 2 after block 1 1.4 dB)
    start_from_previous: bool = True
    seed: int = 0


def _optimiser(params, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (rmsprop or adam)")


@torch.no_grad()
def _through(blocks, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """``x`` passed through the (frozen, eval-mode) ``blocks``."""
    if not blocks:
        return x
    out = []
    for start in range(0, len(x), batch_size):
        y = x[start:start + batch_size].to(device)
        for b in blocks:
            with autocast(device):
                y = b.eval()(y).float()
        out.append(y.cpu())
    return torch.cat(out)


def _psnr_gain(estimate: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor) -> float:
    from cdae_em.core.metrics import psnr

    c = clean.numpy()
    return float(psnr(estimate.numpy(), c).mean() - psnr(noisy.numpy(), c).mean())


def pretrain(sampler, out_dir, settings: PretrainSettings, device: torch.device,
             channels: tuple[int, ...] | None = None, dropout: float = 0.5, decoder: str | None = None,
             metadata: dict | None = None, should_stop: Callable[[], None] | None = None, init=None):
    """Algorithm 1, line 1 (see ``PretrainSettings``): train the blocks one after the other on
    pairs drawn from ``sampler`` (a ``cdae_em.simulate.pretrain_data.PairSampler``); writes
    ``out_dir/cdae_weights.pt`` (settings, validation losses and PSNR gains in its metadata) and
    ``out_dir/pretrain.json``. Resumable: each finished block is saved as ``block{j}.pt``.
    ``init``: a ``Cascade`` to start from (its shape is kept; ``dropout`` applies to the training).
    """
    import json
    from pathlib import Path

    from cdae_em.io.atomic_write import write_text
    from cdae_em.denoise.cascade import DEFAULT_CHANNELS, DEFAULT_DECODER, Cascade
    from cdae_em.denoise.weights import load_weights, save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if init is not None:
        c = init.config
        model = Cascade(n_blocks=c["n_blocks"], channels=tuple(c["channels"]), dropout=dropout, decoder=c["decoder"])
        model.load_state_dict(init.state_dict())
        if len(settings.steps) != len(model.blocks):
            raise ValueError(f"--steps gives {len(settings.steps)} blocks, the initial weights have {len(model.blocks)}")
    else:
        model = Cascade(n_blocks=len(settings.steps), channels=tuple(channels or DEFAULT_CHANNELS), dropout=dropout,
                        decoder=decoder or DEFAULT_DECODER)
    model = model.to(device)
    val_noisy, val_clean = sampler.sample(settings.val_pairs, np.random.default_rng([settings.seed, 999]),
                                          validation=True)
    history = []
    for j, block in enumerate(model.blocks):
        done = out / f"block{j + 1}.pt"
        if done.exists():
            finished, meta = load_weights(done, map_location=device)
            block.load_state_dict(finished.blocks[j].state_dict())
            history.append(meta["history"][j])
            log.info("block %d: already pre-trained (resuming)", j + 1)
            continue
        frozen = list(model.blocks[:j])
        if j > 0 and settings.start_from_previous:
            block.load_state_dict(model.blocks[j - 1].state_dict())
        val_in = _through(frozen, val_noisy, device)
        val_scale = val_noisy.std(dim=(-2, -1), keepdim=True)
        rng = np.random.default_rng([settings.seed, j + 1])
        torch.manual_seed(settings.seed + j + 1)
        opt = _optimiser(block.parameters(), settings.optimizer, settings.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps[j], eta_min=settings.lr * 0.05)
        record = {"block": j + 1, "input": "noisy" if j == 0 else f"block {j} output", "target": "clean",
                  "steps": settings.steps[j], "evaluations": []}

        def evaluate(step: int, train_loss: float | None) -> None:
            block.eval()
            with torch.no_grad():
                val_out = _through([block], val_in, device)
                loss = float(block_loss(block, val_in.to(device), val_clean.to(device), val_scale.to(device)))
            entry = {"step": step, "val_loss": round(loss, 5), "val_psnr_gain_db": round(_psnr_gain(val_out, val_noisy, val_clean), 3)}
            if train_loss is not None:
                entry["train_loss"] = round(train_loss, 5)
            record["evaluations"].append(entry)
            log.info("block %d step %d: validation loss %.4f, PSNR gain over the noisy input %+.2f dB",
                     j + 1, step, entry["val_loss"], entry["val_psnr_gain_db"])
            block.train()

        t0 = time.perf_counter()
        evaluate(0, None)
        running, count = 0.0, 0
        for step in tqdm(range(1, settings.steps[j] + 1), desc=f"pre-train block {j + 1}", unit="step",
                         leave=False, disable=None):
            if should_stop is not None:
                should_stop()
            noisy, clean = sampler.sample(settings.batch_size, rng)
            x = _through(frozen, noisy, device).to(device)
            block.train()
            with autocast(device):
                loss = block_loss(block, x, clean.to(device), noisy.std(dim=(-2, -1), keepdim=True).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running, count = running + float(loss.detach()), count + 1
            if step % settings.eval_every == 0 or step == settings.steps[j]:
                evaluate(step, running / count)
                running, count = 0.0, 0
        block.eval()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        history.append(record)
        save_weights(model, done, {**(metadata or {}), "history": history})
    meta = {**(metadata or {}), "pairs": sampler.describe(), "pretrain": asdict(settings), "history": history}
    save_weights(model.cpu(), out / "cdae_weights.pt", meta, half=True)
    write_text(out / "pretrain.json", json.dumps(meta, indent=2, default=str))
    return model, history
