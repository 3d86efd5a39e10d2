"""Small synthetic data sets in the BMAD layout for end-to-end tests (fast to make, easy lesions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    texture = gaussian_filter(rng.normal(size=(size, size)), sigma=6)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-8)
    return 0.25 + 0.3 * texture


def _lesion(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    ry, rx = rng.uniform(0.06, 0.12, size=2) * size
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def write_dataset(root: Path, name: str, masks: bool, seed: int, size: int = 64, counts: dict | None = None) -> None:
    """Write ``<name>_AD`` with valid/test splits of gray textures; abnormal images get a bright
    ellipse (and its mask where ``masks``)."""
    counts = counts or {"valid": (4, 4), "test": (8, 8)}
    rng = np.random.default_rng(seed)
    for split, (n_good, n_bad) in counts.items():
        for cls, n in (("good", n_good), ("Ungood", n_bad)):
            folder = root / f"{name}_AD" / split / cls / "img"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = _background(rng, size)
                if cls == "Ungood":
                    lesion = _lesion(rng, size)
                    image[lesion] = 0.95
                    if masks:
                        mask_dir = root / f"{name}_AD" / split / cls / "anomaly_mask"
                        mask_dir.mkdir(exist_ok=True)
                        Image.fromarray(lesion.astype(np.uint8) * 255).save(mask_dir / f"{i:03d}.png")
                Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def write_benchmark(root: Path, seed: int = 0, size: int = 64) -> Path:
    """Three data sets: two with masks (``Alpha``, ``Beta``) and one without (``Gamma``)."""
    for offset, (name, masks) in enumerate((("Alpha", True), ("Beta", True), ("Gamma", False))):
        write_dataset(root, name, masks, seed + offset, size)
    return root
