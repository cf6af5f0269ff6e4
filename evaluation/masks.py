"""Occlusion patterns of the divergence-triangle paper and the inpainting error."""

from __future__ import annotations

import numpy as np

MASKS = ("P.5", "P.7", "MB10", "B20", "B30")
_REFERENCE_SIDE = 64  # block sides in the paper are given for 64x64 images


def block_side(side_at_64: int, image_side: int) -> int:
    """A block side given for 64x64 images, scaled to ``image_side`` (28: 10->4, 20->9, 30->13)."""
    return max(1, round(side_at_64 * image_side / _REFERENCE_SIDE))


def occlusion_mask(kind: str, n: int, height: int, width: int,
                   rng: np.random.RandomState) -> np.ndarray:
    """Boolean masks ``(n, height, width)``, True = missing.

    ``P.5`` / ``P.7``: each pixel missing with probability 0.5 / 0.7 (salt and pepper);
    ``MB10``: 10 random square blocks of side 10 (at 64x64); ``B20`` / ``B30``: one random
    square block of side 20 / 30 (at 64x64). Blocks lie fully inside the image.
    """
    if kind in ("P.5", "P.7"):
        return rng.rand(n, height, width) < float(kind[1:])
    blocks = {"MB10": (10, 10), "B20": (1, 20), "B30": (1, 30)}
    if kind not in blocks:
        raise ValueError(f"unknown mask {kind!r}; choose from {MASKS}")
    count, side64 = blocks[kind]
    side = min(block_side(side64, min(height, width)), height, width)
    mask = np.zeros((n, height, width), dtype=bool)
    for i in range(n):
        for _ in range(count):
            top = rng.randint(0, height - side + 1)
            left = rng.randint(0, width - side + 1)
            mask[i, top:top + side, left:left + side] = True
    return mask


def inpainting_error(truth: np.ndarray, filled: np.ndarray, mask: np.ndarray,
                     pixel_range: float) -> float:
    """Mean absolute difference on the occluded pixels, divided by the pixel range."""
    if not mask.any():
        raise ValueError("the mask occludes no pixel")
    return float(np.abs(truth[mask] - filled[mask]).mean() / pixel_range)


def reconstruction_mse(truth: np.ndarray, reconstructed: np.ndarray, low: float,
                       high: float) -> dict[str, float]:
    """Per-pixel MSE with pixels mapped to [-1, 1] and to [0, 1]."""
    unit = (np.asarray(truth, dtype=np.float64) - low) / (high - low)
    unit_hat = (np.asarray(reconstructed, dtype=np.float64) - low) / (high - low)
    mse01 = float(np.mean((unit - unit_hat) ** 2))
    return {"mse_pm1": 4.0 * mse01, "mse_01": mse01}
