"""The methods compared: classical denoisers (scikit-image, bm3d), the cascade's pieces, and the
clustering baselines (raw pixels, PCA, a plain convolutional autoencoder)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


# ----------------------------------------------------------------------------------------------
# classical denoisers; each takes standardised images and the noise sigma in those units
# ----------------------------------------------------------------------------------------------
def standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x - x.mean(axis=(1, 2), keepdims=True)) / np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-6)


def noise_sigma_standardised(snr: float) -> float:
    """Noise std of a standardised noisy image (clean variance 1, noise variance 1/snr)."""
    return float(np.sqrt((1.0 / snr) / (1.0 + 1.0 / snr)))


def tv(images: np.ndarray, sigma: float, factor: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    x = standardise(images)
    return np.stack([denoise_tv_chambolle(im, weight=factor * sigma) for im in x]).astype(np.float32)


def nlm(images: np.ndarray, sigma: float, factor: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    x = standardise(images)
    return np.stack([denoise_nl_means(im, h=factor * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                                      fast_mode=True) for im in x]).astype(np.float32)


def full_psd(shape, box: int, sigma: float) -> np.ndarray:
    """BM3D's ``sigma_psd`` for noise of standard deviation ``sigma`` with the power spectrum of
    ``shape`` (a ``cdae_em.simulate.realism.NoiseShape``): the power per coefficient of the full
    FFT grid, box^2 sigma^2 on average, as the bm3d package defines it for white noise."""
    from cdae_em.simulate.realism import noise_psd

    half = noise_psd(box, shape).double().numpy()
    full = np.zeros((box, box))
    full[:, :half.shape[1]] = half
    fy, fx = np.meshgrid(np.arange(box), np.arange(box), indexing="ij")
    mirror = fx >= half.shape[1]
    full[mirror] = half[(-fy[mirror]) % box, (-fx[mirror]) % box]
    return full * (box * box) * sigma**2


def bm3d(images: np.ndarray, sigma) -> np.ndarray:
    """BM3D of each standardised image; ``sigma`` a noise std, or a full PSD (``full_psd``)."""
    import bm3d as _bm3d

    if not hasattr(np, "trapz"):  # bm4d's coloured-noise path calls np.trapz, gone in numpy 2.4
        np.trapz = np.trapezoid

    x = standardise(images)
    return np.stack([_bm3d.bm3d(im, sigma_psd=sigma) for im in x]).astype(np.float32)


@torch.no_grad()
def cascade_apply(model, images: np.ndarray, upto: int | None, batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        out.append(model(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])), upto=upto).numpy())
    return np.concatenate(out).astype(np.float32)


def equalise(images: np.ndarray, box: int) -> np.ndarray:
    """The histogram equalisation ``cdae-em denoise`` applies (same mask as ``write_denoised``)."""
    from cdae_em.core.preprocess import equalise_histogram, soft_circular_mask

    mask = soft_circular_mask(box, radius=0.9 * box / 2 - 2, width=4)
    return np.concatenate([equalise_histogram(torch.from_numpy(np.ascontiguousarray(images[s:s + 512])), mask).numpy()
                           for s in range(0, len(images), 512)]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# a plain convolutional autoencoder, for the "CAE + k-means" baseline
# ----------------------------------------------------------------------------------------------
class ConvAutoencoder(nn.Module):
    """conv(1->16, s2) - conv(16->32, s2) - conv(32->32, s2) - linear -> latent (64); mirrored decoder."""

    def __init__(self, box: int, latent: int = 64):
        super().__init__()
        m = box // 8
        self.m = m
        self.enc = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * m * m, latent))
        self.dec_fc = nn.Linear(latent, 32 * m * m)
        self.dec = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        return self.dec(self.dec_fc(z).reshape(len(x), 32, self.m, self.m))[:, 0]


def cae_latent(images: np.ndarray, epochs: int, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """Train a ConvAutoencoder briefly (Adam, MSE reconstruction of the noisy input) and return latents."""
    torch.manual_seed(seed)
    x = torch.from_numpy(standardise(images))
    model = ConvAutoencoder(x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = nn.functional.mse_loss(model(x[idx]), x[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return torch.cat([model.encode(x[s:s + 512]) for s in range(0, len(x), 512)]).numpy()


# ----------------------------------------------------------------------------------------------
# clustering baselines
# ----------------------------------------------------------------------------------------------
def kmeans(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def ward(features: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(features)


def pca(features: np.ndarray, n: int = 32, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=min(n, len(features) - 1), random_state=seed).fit_transform(features)
