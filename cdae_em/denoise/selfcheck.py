"""A ground-truth-free check of a denoiser on the user's own particles (blind-spot loss).

Hide a sparse grid of pixels (every ``spacing``-th pixel in y and x, one offset at a time), fill
each hidden pixel with the mean of its four neighbours, denoise, and compare the output at the
hidden pixels with the pixel values that were hidden. Pixel noise is independent between pixels,
so at a hidden pixel the output cannot have seen that pixel's noise, and

    E[(f(x_hidden) - x)^2] = E[(f(x_hidden) - clean)^2] + noise variance

(the Noise2Self argument, Batson & Royer 2019): the loss ranks denoisers by their error against
the unknown clean images, up to a constant shared by all of them. A model that invents structure
(blobs, texture) has a larger error than one that does not, so this is how cdae-em chooses the
contrast polarity to run the model in and whether fine-tuning helped. Losses are in units of each
image's variance, so images of any scale weigh the same.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cdae_em.denoise.train import autocast

if TYPE_CHECKING:
    from cdae_em.denoise.cascade import Cascade
    from cdae_em.settings import DenoiseSettings

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor], torch.Tensor]


def _hide(images: torch.Tensor, dy: int, dx: int, spacing: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with the pixels (dy + i * spacing, dx + j * spacing) replaced by the mean of their 4
    neighbours (reflected at the edges), and the boolean mask of those pixels."""
    box_y, box_x = images.shape[-2:]
    mask = torch.zeros((box_y, box_x), dtype=torch.bool, device=images.device)
    mask[dy::spacing, dx::spacing] = True
    kernel = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]], device=images.device)
    padded = F.pad(images[:, None], (1, 1, 1, 1), mode="reflect")
    neighbours = F.conv2d(padded, kernel[None, None])[:, 0]
    return torch.where(mask, neighbours, images), mask


@torch.no_grad()
def blind_spot_loss(denoise: Denoiser | None, images: torch.Tensor, spacing: int = 4, n_masks: int = 2,
                    seed: int = 0, batch_size: int = 128, should_stop: Callable[[], None] | None = None) -> float:
    """Mean blind-spot loss of ``denoise`` on ``images`` (N, box, box); ``None`` scores the
    neighbour-mean fill itself (a 4-pixel mean filter: the bar any denoiser should clear)."""
    rng = np.random.default_rng(seed)
    offsets = rng.choice(spacing * spacing, size=min(n_masks, spacing * spacing), replace=False)
    var = images.var(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    total, count = 0.0, 0
    for offset in offsets:
        dy, dx = divmod(int(offset), spacing)
        for start in range(0, len(images), batch_size):
            if should_stop is not None:
                should_stop()
            x = images[start:start + batch_size]
            hidden, mask = _hide(x, dy, dx, spacing)
            out = hidden if denoise is None else denoise(hidden).float()
            err = ((out - x) ** 2 / var[start:start + batch_size])[:, mask]
            total += float(err.sum())
            count += err.numel()
    return total / max(count, 1)


def check_rows(n: int, seed: int, size: int = 256) -> np.ndarray:
    """The particles kept out of fine-tuning to check the denoiser on (sorted, seeded)."""
    size = min(size, max(4, n // 5))
    return np.sort(np.random.default_rng([seed, 4242]).choice(n, size=min(size, n), replace=False))


def cascade_fn(model: Cascade, device: torch.device):
    def apply(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model.eval()(x).float()
    return apply


def choose_polarity(model: Cascade, images: torch.Tensor, settings: DenoiseSettings,
                    device: torch.device, should_stop: Callable[[], None] | None = None) -> tuple[int, dict]:
    """+1 (protein bright) or -1 (dark), as ``settings.contrast`` says or, for "auto", whichever
    polarity gives the pre-trained cascade the lower blind-spot loss on ``images``; with the
    losses for the summary."""
    record = {"check_particles": len(images), "blind_spot_loss": {}}
    record["blind_spot_loss"]["4-neighbour mean"] = round(blind_spot_loss(None, images, seed=settings.seed), 5)
    if settings.contrast in ("bright", "dark"):
        sign = 1 if settings.contrast == "bright" else -1
        record["contrast"] = settings.contrast + " (given)"
    else:
        losses = {}
        for s in (1, -1):
            model.set_polarity(s)
            losses[s] = blind_spot_loss(cascade_fn(model, device), images, seed=settings.seed, should_stop=should_stop)
        sign = 1 if losses[1] <= losses[-1] else -1
        record["blind_spot_loss"]["pre-trained, protein bright"] = round(losses[1], 5)
        record["blind_spot_loss"]["pre-trained, protein dark"] = round(losses[-1], 5)
        record["contrast"] = "bright" if sign > 0 else "dark"
        log.info("protein contrast: %s (blind-spot loss %.4f bright vs %.4f dark; the denoised stacks keep "
                 "the input's contrast)", record["contrast"], losses[1], losses[-1])
    return sign, record


def finetuning_helped(model: Cascade, pretrained: Cascade, images: torch.Tensor, record: dict,
                       device: torch.device, should_stop: Callable[[], None] | None = None) -> bool:
    """Blind-spot losses of the fine-tuned and pre-trained cascades on the held-out particles;
    False (and a warning) when fine-tuning made the result worse."""
    tuned = blind_spot_loss(cascade_fn(model, device), images, should_stop=should_stop)
    base = blind_spot_loss(cascade_fn(pretrained, device), images, should_stop=should_stop)
    finite = bool(np.isfinite(tuned))  # a diverged fine-tuning gives NaN: not finite, not helped
    record["blind_spot_loss"]["fine-tuned"] = round(tuned, 5) if finite else None
    record["blind_spot_loss"]["pre-trained"] = round(base, 5)
    helped = finite and tuned <= base
    record["used"] = "fine-tuned" if helped else "pre-trained (fine-tuning made the held-out loss worse)"
    if helped:
        log.info("fine-tuning check: blind-spot loss on %d held-out particles %.4f -> %.4f", len(images), base, tuned)
    else:
        log.warning("fine-tuning made the denoiser worse on %d held-out particles (blind-spot loss %.4f -> %.4g): "
                    "writing the pre-trained cascade's output instead", len(images), base, tuned)
    bar = record["blind_spot_loss"]["4-neighbour mean"]
    best = min(tuned, base) if finite else base
    if best >= bar:
        record["warning"] = "the denoiser does no better than a 4-pixel mean filter on these particles"
        log.warning("the denoiser does no better than a 4-pixel mean filter on these particles "
                    "(blind-spot loss %.4f vs %.4f): check the contrast (--contrast) and the weights", best, bar)
    return helped
