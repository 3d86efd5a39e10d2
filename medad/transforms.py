"""MONAI dictionary transforms that prepare images and masks for MVFA.

MVFA's input is RGB in [0, 1] at 240 x 240 (bicubic; masks nearest), without CLIP's mean/std
normalisation. The pipeline is MONAI's (``LoadImaged``, ``EnsureChannelFirstd``, ``Resized``,
...); the few transforms here fill gaps MONAI does not cover, each said where it is defined.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Resized,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    ScaleIntensityRanged,
)
from PIL import Image

from medad.io import atomic_write

__all__ = [
    "BinarizeMaskd",
    "SaveOverlayd",
    "FillMissingMaskd",
    "ToRGBd",
    "UnitIntensityd",
    "mvfa_preprocessing",
    "normalise_pil_mode",
]

# PIL modes whose pixel values are not intensities (palette indices, alpha, CMYK, 1-bit).
_CONVERT_TO_RGB = {"P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa", "La"}


def normalise_pil_mode(image: Image.Image) -> Image.Image:
    """PIL ``converter`` for MONAI's ``PILReader``: palette, alpha and other non-intensity modes
    become RGB, while grayscale, RGB and 16-bit images keep their values and bit depth."""
    return image.convert("RGB") if image.mode in _CONVERT_TO_RGB else image


class UnitIntensityd(MapTransform):
    """Scale intensities to [0, 1]: 8-bit data by 1/255 (as MVFA), anything else (16-bit PNG,
    CT, MR, float) by a per-image percentile window.

    Needed because MONAI's intensity transforms pick one rule for all inputs, while a folder
    may mix 8-bit and 16-bit images; the data must be loaded with its native dtype.
    """

    def __init__(
        self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.eight_bit = ScaleIntensityRange(a_min=0, a_max=255, b_min=0, b_max=1, clip=True, dtype=torch.float32)
        self.window = ScaleIntensityRangePercentiles(
            lower=lower, upper=upper, b_min=0, b_max=1, clip=True, dtype=torch.float32
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            is_eight_bit = image.dtype in (torch.uint8, np.uint8)
            d[key] = self.eight_bit(image) if is_eight_bit else self.window(image)
        return d


class ToRGBd(MapTransform):
    """Channel-first images with 1 (gray), 2 (gray + alpha), 3 or 4 (RGBA) channels to 3 (RGB).

    CLIP takes RGB; MONAI has ``RepeatChannel`` but nothing that also drops alpha channels.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = image.shape[0]
            if channels in (1, 2):
                d[key] = image[:1].repeat(3, *([1] * (image.dim() - 1)))
            elif channels in (3, 4):
                d[key] = image[:3]
            else:
                raise ValueError(f"{key}: expected 1-4 channels (gray, gray+alpha, RGB, RGBA), got {channels}")
        return d


class BinarizeMaskd(MapTransform):
    """Binarise masks at half their value range: 127.5 for 0-255 masks (MVFA's ``> 0.5`` after
    ``ToTensor``), 0.5 for 0-1 masks. MONAI's ``AsDiscreted`` needs one fixed threshold."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key].float()
            d[key] = (mask > (127.5 if mask.max() > 1 else 0.5)).float()[:1]
        return d


class FillMissingMaskd(MapTransform):
    """Give items without a mask (normal images, data sets without annotations) an all-zero mask
    of the image's size, so that batches always carry one. MONAI has no such fill transform."""

    def __init__(self, keys: KeysCollection, like: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.like = like

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        reference = d[self.like]
        for key in self.keys:
            if d.get(key) is None:
                # zeros_like keeps the reference's type, so loaded and filled masks collate together
                d[key] = torch.zeros_like(reference[:1], dtype=torch.float32)
        return d


def mvfa_preprocessing(image_size: int = 240, image_key: str = "image", mask_key: str | None = "mask") -> Compose:
    """MONAI pipeline from file paths to MVFA inputs: ``image`` (3, S, S) RGB in [0, 1] and, with
    ``mask_key``, ``mask`` (1, S, S) in {0, 1} (zeros where an item has no mask)."""
    reader = PILReader(converter=normalise_pil_mode, reverse_indexing=False)  # keep (rows, columns)
    size = (image_size, image_size)
    steps: list = [
        LoadImaged(keys=image_key, reader=reader, dtype=None, image_only=True),
        EnsureChannelFirstd(keys=image_key),
        UnitIntensityd(keys=image_key),
        ToRGBd(keys=image_key),
        Resized(keys=image_key, spatial_size=size, mode="bicubic", anti_aliasing=True),
        # bicubic overshoots: clip back into [0, 1]
        ScaleIntensityRanged(keys=image_key, a_min=0, a_max=1, b_min=0, b_max=1, clip=True),
    ]
    if mask_key is not None:
        steps += [
            LoadImaged(keys=mask_key, reader=reader, dtype=None, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys=mask_key, allow_missing_keys=True),
            Resized(keys=mask_key, spatial_size=size, mode="nearest", allow_missing_keys=True),
            BinarizeMaskd(keys=mask_key, allow_missing_keys=True),
            FillMissingMaskd(keys=mask_key, like=image_key),
        ]
    return Compose(steps)


class SaveOverlayd(MapTransform):
    """Write ``<output_dir>/<image file stem>_overlay.png``: the anomaly map as a heat map over
    the model's input image (both at the model's resolution).

    Colours span ``value_range`` (default: each map's own minimum to maximum, which shows where
    a map is highest, not how high). MONAI's savers write arrays, not blended pictures.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        alpha: float = 0.5,
        value_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys)
        self.output_dir, self.image_key = Path(output_dir), image_key
        self.alpha, self.value_range = alpha, value_range

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.image_key]).detach().float().cpu()
        source = getattr(d[self.image_key], "meta", {}).get("filename_or_obj", "image")
        for key in self.key_iterator(d):
            heat = torch.as_tensor(d[key]).detach().float().cpu()[0]
            low, high = self.value_range or (float(heat.min()), float(heat.max()))
            level = ((heat - low) / max(high - low, 1e-12)).clamp(0, 1)
            # A black-red-yellow-white ramp ("hot"), computed here to keep matplotlib optional.
            colour = torch.stack([(3 * level).clamp(0, 1), (3 * level - 1).clamp(0, 1), (3 * level - 2).clamp(0, 1)])
            blended = (1 - self.alpha) * image[:3] + self.alpha * colour
            pixels = (blended.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            path = self.output_dir / f"{Path(str(source)).name.split('.')[0]}_overlay.png"
            with atomic_write(path, "wb") as handle:
                Image.fromarray(pixels).save(handle, format="PNG")
        return d
