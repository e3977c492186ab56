"""Saving and loading cascade weights as plain tensor files.

A weights file is a ``torch.save`` of a dict holding only tensors, strings and numbers:
``{"format": "cdae-em-weights", "version": 1, "config": {...}, "state_dict": {...},
"metadata": "<json>"}``. It is loaded with ``torch.load(..., weights_only=True)``, which refuses any
file that would run code when unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cdae_em.io.atomic_write import atomic_path
from cdae_em.data import DATA_DIR
from cdae_em.denoise.cascade import Cascade
from cdae_em.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "cdae-em-weights"


def save_weights(model: Cascade, path: str | Path, metadata: dict | None = None, half: bool = False) -> None:
    """Write the cascade's weights (on CPU) and metadata atomically; ``half`` stores them as float16
    (half the size; they load back into float32 parameters)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": 1,
        "config": model.config,
        "state_dict": {k: v.detach().cpu().to(torch.float16 if half and v.is_floating_point() else v.dtype).clone()
                       for k, v in model.state_dict().items()},
        "metadata": json.dumps(metadata or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Cascade, dict]:
    """Load a cascade and its metadata; any problem is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle with code, truncated or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"not a cdae-em weights file, or one that would run code when loaded ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, "not a cdae-em weights file (no 'cdae-em-weights' format tag)")
    config = payload.get("config") or {}
    try:
        model = Cascade(n_blocks=int(config["n_blocks"]), channels=tuple(config["channels"]),
                        dropout=float(config["dropout"]),
                        # weights written before the decoder became a choice used transposed convolutions
                        decoder=str(config.get("decoder", "transpose")))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(path, f"weights do not fit the cascade they describe ({first})") from None
    try:
        metadata = json.loads(payload.get("metadata") or "{}")
    except json.JSONDecodeError:
        metadata = {}
    return model.to(map_location), metadata


def default_weights_path() -> Path:
    """The weights shipped in the package (pre-trained on the embedded map)."""
    return DATA_DIR / "default_weights.pt"


def trained_scale(path: str | Path | None = None) -> tuple[int, tuple[float, float]]:
    """(box, (smallest, largest) particle diameter / box) of the pairs the weights at ``path``
    (default: the shipped ones) were pre-trained on, from their metadata; the shipped weights'
    scale where the metadata does not say."""
    from cdae_em.core.prepare import TRAINED_BOX, TRAINED_FILL

    _, metadata = load_weights(path or default_weights_path())
    pairs = metadata.get("pairs") or {}
    try:
        return int(pairs["box"]), (float(pairs["fill"][0]), float(pairs["fill"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        return TRAINED_BOX, TRAINED_FILL
