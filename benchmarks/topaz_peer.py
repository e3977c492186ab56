"""Topaz-Denoise (Bepler et al. 2020) as a benchmark peer: its pretrained 2D denoisers applied to
numpy image stacks.

For benchmarks only: cdae-em itself never imports this module, and topaz-em is not a dependency
of the package (it is GPLv3 and pulls in things we do not need). Install it into the venv with

    pip install --no-deps topaz-em 'setuptools<81'

``--no-deps`` keeps pip from touching torch/numpy. The denoising model code
(``topaz.denoising.models``) needs nothing beyond numpy, torch, scipy and pillow. topaz's loader
for the pretrained weights falls back to ``pkg_resources``, which setuptools>=81 no longer
ships, hence the pin. The weights ship inside the topaz-em wheel, so no network is needed.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# The 2D pretrained models topaz knows by name (topaz.denoising.models.model_name_dict).
# "unet" (unet_L2_v0.2.2) is what `topaz denoise` uses by default.
MODELS_2D = ("unet", "unet-small", "fcnn", "affine", "unet-v0.2.1")

_INSTALL = "pip install --no-deps topaz-em 'setuptools<81'"
_cache: dict[str, torch.nn.Module] = {}


def available() -> str | None:
    """None if topaz's pretrained 2D denoisers can be used here, else a one-line reason."""
    try:
        import topaz.denoising.models  # noqa: F401
    except ImportError as e:
        if getattr(e, "name", None) in ("topaz", "topaz.denoising", "topaz.denoising.models"):
            return f"topaz-em not installed: {_INSTALL}"
        return f"topaz-em import failed ({e}); install: {_INSTALL}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pkg_resources  # noqa: F401
    except ImportError:
        return f"pkg_resources missing (topaz's pretrained-model loader needs it): {_INSTALL}"
    return None


def _load(model: str) -> torch.nn.Module:
    if model not in MODELS_2D:
        raise ValueError(f"unknown topaz 2D model {model!r}; choose from {MODELS_2D}")
    if model not in _cache:
        reason = available()
        if reason is not None:
            raise RuntimeError(reason)
        from topaz.denoising.models import load_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources deprecation warning
            net = load_model(model)  # reads the .sav bundled in the package, map_location="cpu"
        _cache[model] = net.to("cpu").eval()
    return _cache[model]


def denoise_topaz(images: np.ndarray, model: str = "unet", batch_size: int = 16) -> np.ndarray:
    """Denoise a stack with a pretrained Topaz-Denoise model, the way `topaz denoise` does.

    images: (N, box, box) float array; returns (N, box, box) float32.

    Each image is treated as one micrograph passed through `topaz denoise` with its default
    options (topaz-em 0.3.20: no lowpass, no pixel cutoff, no Gaussian filter, no deconvolution,
    not --normalize; patch size 1024 + padding 500, so an image smaller than 1524 px goes through
    the network whole, with no tiling or padding -- the U-Net's pooling copes with any size).
    Per image, exactly as topaz.denoise.denoise_image + Denoise._denoise do:

      1. x = (img - mean) / std, with numpy statistics of that image (population std, ddof=0);
      2. x is standardised again with torch statistics (torch's std is the unbiased one, so this
         only rescales by sqrt((n-1)/n)), fed to the network as (1, 1, box, box), and the
         output is mapped back with the same torch mean/std;
      3. that result is returned to the input's scale: out = std * y + mean (step 1's numbers).

    So the output has the input's intensity scale and offset. The network has no batch-norm, so
    running `batch_size` images at once gives the same result as one at a time. Runs on CPU in
    eval mode under torch.no_grad; torch's thread count is left to the caller. A constant image
    (std 0) is returned unchanged (topaz itself would give NaN).
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected (N, box, box) images, got shape {x.shape}")
    net = _load(model)

    mu = x.mean(axis=(1, 2), keepdims=True)
    sd = x.std(axis=(1, 2), keepdims=True)
    flat = sd == 0
    z = (x - mu) / np.where(flat, 1.0, sd)

    out = np.empty_like(x)
    with torch.no_grad():
        for i in range(0, len(z), batch_size):
            t = torch.from_numpy(z[i:i + batch_size])
            mu_t = t.mean(dim=(1, 2), keepdim=True)
            sd_t = t.std(dim=(1, 2), keepdim=True)  # unbiased, as torch.Tensor.std() in topaz
            sd_t = torch.where(sd_t == 0, torch.ones_like(sd_t), sd_t)
            y = net(((t - mu_t) / sd_t).unsqueeze(1)).squeeze(1)
            out[i:i + batch_size] = (y * sd_t + mu_t).numpy()

    out = sd * out + mu
    out[flat[:, 0, 0]] = x[flat[:, 0, 0]]
    return out.astype(np.float32, copy=False)
