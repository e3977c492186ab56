"""A ground-truth-free check of a denoiser on the user's own particles, and the guard built on it.

The check estimates, for each candidate denoiser f, the correlation of its output f(x) with the
unknown clean image s, which is what the benchmarks score (PSNR after standardising both images
is a function of it) and what classification compares; unlike the squared error it does not
reward a blur for shrinking the image. With x = s + n, n Gaussian of covariance C, Stein's lemma
gives E<f(x), n> = E tr(C J_f(x)) (J_f the Jacobian of f), so

    <f(x), s>  is estimated without bias by  <f(x), x> - tr(C J_f(x)),

the last term by Monte Carlo (Ramani et al. 2008): b^T (f(x + eps b) - f(x)) / eps with a probe b
drawn from N(0, C), the same probes for every candidate. Divided by ||f(x)|| (both centred) and by
the clean images' norm (sqrt(||x||^2 - tr C), one value for the stack) it estimates the
correlation. It scores the very output the job writes, for any f, and with the noise's real
covariance it is not fooled by noise correlated between neighbouring pixels (a real detector's:
0.2 on real particles), as a blind-spot check that hides single pixels was (docs/denoiser.md).

The noise model comes from the particles themselves (``cdae_em.core.noise.estimate_noise``): each
image's variance and the stack's correlation between pixels, measured on the background. A stack
with too little background for that falls back to white noise, and says so.

Candidates: the model (in either contrast polarity, pre-trained or fine-tuned) and trivial
references, the ring mean and Gaussian blurs over a range of widths (the blur best matched to
the data's SNR is the one that scores best). A model that invents structure (texture, blobs)
correlates less with the clean image than a blur that does not.

The guard: where the best reference's score exceeds the model's by more than ``MARGIN_SE``
standard errors (paired over the checked particles), the job writes the best reference filter's
output instead of the model's (and clusters that), and says so in the log, the summary and
status.json; ``--force-model`` keeps the model's output regardless.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cdae_em.core.noise import NoiseModel, estimate_noise
from cdae_em.denoise.train import autocast

if TYPE_CHECKING:
    from cdae_em.denoise.cascade import Cascade
    from cdae_em.settings import DenoiseSettings

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor], torch.Tensor]

EPS = 1e-2  # Monte Carlo divergence step, in units of the noise standard deviation
MARGIN_SE = 2.0  # the model loses where the best reference scores this many standard errors above it
REFERENCE_SIGMAS = (0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # Gaussian blurs compared with the model, pixels
RING = "ring mean"


def _ring_kernel(device=None) -> torch.Tensor:
    """The mean of the 16 pixels at Chebyshev distance 2 (the border of a 5x5 square)."""
    k = torch.ones(5, 5, device=device)
    k[1:-1, 1:-1] = 0.0
    return k / k.sum()


def _gaussian_kernel(sigma: float, device=None) -> torch.Tensor:
    half = max(1, int(math.ceil(3 * sigma)))
    c = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(c**2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def reference_kernels(device=None) -> dict[str, torch.Tensor]:
    """The trivial denoisers the model must beat, as convolution kernels by name."""
    kernels = {RING: _ring_kernel(device)}
    kernels.update({f"gaussian blur {s:g} px": _gaussian_kernel(s, device) for s in REFERENCE_SIGMAS})
    return kernels


def filter_images(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``images`` (N, box, box) convolved with ``kernel`` (odd square), edges reflected (or
    replicated where the kernel is wider than the box)."""
    half = kernel.shape[-1] // 2
    mode = "reflect" if half < min(images.shape[-2:]) else "replicate"
    padded = F.pad(images[:, None].float(), (half, half, half, half), mode=mode)
    return F.conv2d(padded, kernel[None, None].to(images.device))[:, 0]


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=(-2, -1), keepdim=True)


@torch.no_grad()
def scores(denoisers: dict[str, Denoiser], images: torch.Tensor, noise: NoiseModel | None = None, seed: int = 0,
           batch_size: int = 128, should_stop: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """Per image, each denoiser's estimated correlation with the clean image (module docstring);
    every denoiser sees the same images and the same probes. Higher is better."""
    noise = noise or estimate_noise(images)
    box = images.shape[-1]
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in denoisers}
    signal = []  # per image: the clean image's energy, ||x||^2 - tr(C) (centred)
    for start in range(0, len(images), batch_size):
        if should_stop is not None:
            should_stop()
        x = images[start:start + batch_size].float()
        part = NoiseModel(noise.variance[start:start + batch_size], noise.correlation, noise.white)
        probe = part.probes(box, g, x.device)
        xc = _centred(x)
        signal.append(((xc**2).sum((-2, -1)) - box * box * part.variance.to(x.device)).cpu())
        for name, f in denoisers.items():
            fx = f(x).float()
            fc = _centred(fx)
            divergence = (_centred(probe) * (f(x + EPS * probe).float() - fx)).sum((-2, -1)) / EPS
            norm = fc.norm(dim=(-2, -1))
            inner = (fc * xc).sum((-2, -1)) - divergence  # estimates <f(x), clean>
            out[name].append(torch.where(norm > 0, inner / norm.clamp_min(1e-12), torch.zeros_like(norm)).cpu())
    # one clean-image energy for the stack (per image it is too noisy at low SNR): a common scale
    energy = float(torch.cat(signal).mean())
    scale = math.sqrt(energy) if energy > 0 else 1.0
    return {name: torch.cat(r) / scale for name, r in out.items()}


def score(denoise: Denoiser, images: torch.Tensor, seed: int = 0, batch_size: int = 128,
          should_stop: Callable[[], None] | None = None) -> float:
    """Mean estimated correlation of one denoiser's output with the clean images; higher is better."""
    return float(scores({"f": denoise}, images, None, seed, batch_size, should_stop)["f"].mean())


class KernelFilter(torch.nn.Module):
    """A reference filter as a module: a candidate of the self-check, and streamed over work arrays
    as a cascade block is where the guard writes it."""

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        self.register_buffer("kernel", kernel.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return filter_images(x.float(), self.kernel)


def check_rows(n: int, seed: int, size: int = 256, held_out: bool = True) -> np.ndarray:
    """The particles to check the denoiser on (sorted, seeded): up to ``size``; a fifth of the
    particles at most where they are ``held_out`` of fine-tuning, any of them otherwise."""
    size = min(size, max(4, n // 5) if held_out else n)
    return np.sort(np.random.default_rng([seed, 4242]).choice(n, size=min(size, n), replace=False))


def cascade_fn(model: Cascade, device: torch.device, exact: bool = False) -> Denoiser:
    """The cascade as a denoiser: as the job runs it (bf16 on CUDA), or in float32 (``exact``,
    for the self-check's small steps)."""
    def apply(x: torch.Tensor) -> torch.Tensor:
        if exact:
            return model.eval()(x.float()).float()
        with autocast(device):
            return model.eval()(x).float()
    return apply


def _in_polarity(model: Cascade, sign: int, device: torch.device) -> Denoiser:
    """``model`` run in polarity ``sign`` (set at each call: the candidates take turns)."""
    run = cascade_fn(model, device, exact=True)

    def apply(x: torch.Tensor) -> torch.Tensor:
        model.set_polarity(sign)
        return run(x)
    return apply


def new_record(images: torch.Tensor) -> tuple[dict, NoiseModel]:
    """The self-check's record for the summary, with the noise model of the checked particles."""
    noise = estimate_noise(images)
    if noise.white:
        log.warning("%d particles of %d px have too little background to measure their noise's correlation: "
                    "the self-check assumes white noise", len(images), images.shape[-1])
    return {"check_particles": len(images), "score": "estimated correlation with the clean image",
            **noise.describe(), "correlation": {}}, noise


def _means(per_image: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in per_image.items()}


def choose_polarity(model: Cascade, images: torch.Tensor, settings: DenoiseSettings, device: torch.device,
                    record: dict, noise: NoiseModel, should_stop: Callable[[], None] | None = None) -> int:
    """+1 (protein bright) or -1 (dark), as ``settings.contrast`` says or, for "auto", whichever
    polarity scores better with the pre-trained cascade on ``images``; noted in ``record``."""
    if settings.contrast in ("bright", "dark"):
        record["contrast"] = settings.contrast + " (given)"
        return 1 if settings.contrast == "bright" else -1
    candidates = {"pre-trained, protein bright": _in_polarity(model, 1, device),
                  "pre-trained, protein dark": _in_polarity(model, -1, device)}
    found = _means(scores(candidates, images, noise, settings.seed, should_stop=should_stop))
    bright, dark = found["pre-trained, protein bright"], found["pre-trained, protein dark"]
    sign = 1 if bright >= dark else -1
    record["correlation"].update({k: round(v, 4) for k, v in found.items()})
    record["contrast"] = "bright" if sign > 0 else "dark"
    log.info("protein contrast: %s (estimated correlation with the clean images %.3f bright vs %.3f dark; the "
             "denoised stacks keep the input's contrast)", record["contrast"], bright, dark)
    return sign


def finetuning_helped(model: Cascade, pretrained: Cascade, images: torch.Tensor, record: dict, noise: NoiseModel,
                      device: torch.device, should_stop: Callable[[], None] | None = None) -> bool:
    """The fine-tuned and pre-trained cascades' scores on the held-out particles; False (and a
    warning) when fine-tuning made the result worse."""
    found = _means(scores({"fine-tuned": cascade_fn(model, device, exact=True),
                           "pre-trained": cascade_fn(pretrained, device, exact=True)}, images, noise,
                          should_stop=should_stop))
    tuned, base = found["fine-tuned"], found["pre-trained"]
    finite = bool(np.isfinite(tuned))  # a diverged fine-tuning gives NaN: not finite, not helped
    record["correlation"]["fine-tuned"] = round(tuned, 4) if finite else None
    record["correlation"]["pre-trained"] = round(base, 4)
    helped = finite and tuned >= base
    record["used"] = "fine-tuned" if helped else "pre-trained (fine-tuning made the held-out score worse)"
    if helped:
        log.info("fine-tuning check: estimated correlation on %d held-out particles %.3f -> %.3f", len(images),
                 base, tuned)
    else:
        log.warning("fine-tuning made the denoiser worse on %d held-out particles (estimated correlation "
                    "%.3f -> %.4g): writing the pre-trained cascade's output instead", len(images), base, tuned)
    return helped


@dataclass
class Verdict:
    """The guard's decision: which denoiser's output the job writes and clusters."""

    model_wins: bool
    reference: str  # the best reference filter's name
    kernel: torch.Tensor  # its kernel (used where the model lost)
    use_model: bool  # model_wins, or forced


def guard(model: Cascade, images: torch.Tensor, record: dict, noise: NoiseModel, settings: DenoiseSettings,
          device: torch.device, should_stop: Callable[[], None] | None = None) -> Verdict:
    """Compare the model (as the job will run it) with the reference filters on the checked
    particles (``images``, as the model sees them); record the scores and the decision in
    ``record`` and log it."""
    kernels = reference_kernels(device)
    denoisers = {"model": cascade_fn(model, device, exact=True), **{k: KernelFilter(v) for k, v in kernels.items()}}
    per_image = scores(denoisers, images, noise, settings.seed, should_stop=should_stop)
    found = _means(per_image)
    best = max(kernels, key=lambda k: found[k])
    mine = found["model"]
    diff = per_image[best] - per_image["model"]
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    finite = bool(np.isfinite(mine))
    model_wins = finite and found[best] - mine <= MARGIN_SE * se
    use_model = model_wins or settings.force_model
    record["references"] = {k: round(found[k], 4) for k in kernels}
    record["correlation"]["model"] = round(mine, 4) if finite else None
    record["best_reference"] = best
    record["model_minus_best_reference"] = round(mine - found[best], 4) if finite else None
    record["difference_standard_error"] = round(se, 4)
    record["verdict"] = "model" if model_wins else "reference"
    record["written"] = "model" if use_model else best
    if model_wins:
        log.info("denoiser self-check on %d particles: estimated correlation with the clean images %.3f for the "
                 "model, %.3f for the best reference filter (%s)", len(images), mine, found[best], best)
        return Verdict(True, best, kernels[best].cpu(), True)
    lost = (f"the model does worse than a {best} on these particles (estimated correlation with the clean images "
            f"{mine:.3f} vs {found[best]:.3f}, more than {MARGIN_SE:g} standard errors of {se:.3f})")
    if use_model:
        record["warning"] = lost + "; its output was written anyway (--force-model)"
    else:
        record["warning"] = (lost + f": the denoised stack and the classes use the {best} instead "
                             "(--force-model keeps the model's output)")
    log.warning("denoiser self-check: %s", record["warning"])
    return Verdict(False, best, kernels[best].cpu(), use_model)
