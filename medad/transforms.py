"""MONAI dictionary transforms that prepare images and masks for MVFA, and save its outputs.

MVFA's input is RGB in [0, 1] at 240 x 240 (bicubic; masks nearest), without CLIP's mean/std
normalisation. The pipeline is MONAI's (``LoadImaged``, ``EnsureChannelFirstd``, ``Resized``,
``Orientationd``, ...); the few transforms here fill gaps MONAI does not cover, each said where
it is defined.

Intensity policy (:class:`UnitIntensityd`): 8-bit data is divided by 255 (as MVFA); any other
data (16-bit PNG/TIFF, CT, MR, float) is windowed per image, or per volume, between its 0.5th
and 99.5th percentiles; a CT window (a preset of :data:`CT_WINDOWS` or ``[center, width]`` in
HU) replaces that for CT. Volumes keep their voxel grid here; :mod:`medad.volumes` cuts them into
slices and resizes those to the model's size batch by batch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PILReader
from monai.data.utils import to_affine_nd
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    Invertd,
    ScaleIntensityRanged,
)
from PIL import Image, ImageDraw, ImageFont

from medad.io import atomic_write, output_stem

__all__ = [
    "COLOUR_BAR_WIDTH",
    "CT_WINDOWS",
    "SLICE_PLANES",
    "BinarizeMaskd",
    "EnsureSliceAxisd",
    "FillMissingMaskd",
    "LoadInputd",
    "MapToInputGridd",
    "SaveOverlayd",
    "SaveSliceScoresd",
    "ToRGBd",
    "annotate_overlay",
    "heat_overlay",
    "at_input_size",
    "input_size",
    "UnitIntensityd",
    "input_slice_indices",
    "mvfa_preprocessing",
    "normalise_pil_mode",
    "to_rgb",
    "window_range",
]

#: CT display windows ``(center, width)`` in Hounsfield units (the usual radiology presets).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

#: Orientation (MONAI/nibabel axis codes) a volume is brought to before it is cut into slices:
#: the slices of each plane lie along the last axis, and every axis points to R, A or S.
SLICE_PLANES: dict[str, str] = {"axial": "RAS", "coronal": "RSA", "sagittal": "ASR"}

# PIL modes whose pixel values are not intensities (palette indices, alpha, CMYK, 1-bit).
_CONVERT_TO_RGB = {"P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa", "La"}


def normalise_pil_mode(image: Image.Image) -> Image.Image:
    """PIL ``converter`` for MONAI's ``PILReader``: palette, alpha and other non-intensity modes
    become RGB, while grayscale, RGB and 16-bit images keep their values and bit depth."""
    return image.convert("RGB") if image.mode in _CONVERT_TO_RGB else image


def _source(image: object, default: str = "image") -> str:
    """The file (or DICOM series folder) an image was read from, for messages and file names."""
    return str(getattr(image, "meta", {}).get("filename_or_obj", default))


def _case_name(image: object) -> str:
    """Output file stem of a case (:func:`medad.io.output_stem` of its source)."""
    return output_stem(_source(image))


def window_range(window: str | Sequence[float]) -> tuple[float, float]:
    """The intensity range ``(low, high)`` of a CT window: a name in :data:`CT_WINDOWS` or
    ``[center, width]`` in Hounsfield units."""
    if isinstance(window, str):
        if window.lower() not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; known: {sorted(CT_WINDOWS)} or [center, width]")
        center, width = CT_WINDOWS[window.lower()]
    else:
        values = [float(v) for v in window]
        if len(values) != 2 or values[1] <= 0:
            raise ValueError(f"a CT window is [center, width] with width > 0, got {window!r}")
        center, width = values
    return center - width / 2, center + width / 2


def _to_unit(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``image`` scaled from [low, high] to [0, 1] and clipped, as a new float32 tensor (of the
    input's type, meta data kept); in place after one copy, so that a large volume costs one
    float32 copy (MONAI's intensity transforms make several)."""
    unit = image.to(torch.float32, copy=True)
    return unit.sub_(low).div_(max(high - low, 1e-12)).clamp_(0, 1)


class UnitIntensityd(MapTransform):
    """Scale intensities to [0, 1]: 8-bit data by 1/255 (as MVFA), anything else (16-bit PNG,
    CT, MR, float) by a percentile window over the whole image or volume (``lower`` to
    ``upper`` percentiles, linear interpolation; a constant image becomes 0), or, with
    ``window``, all data by a fixed CT window (see :func:`window_range`). Values outside the
    window are clipped; non-finite values (NaN backgrounds of some NIfTI files) count as the
    image's minimum.

    Needed because MONAI's intensity transforms pick one rule for all inputs, while a folder
    may mix 8-bit and 16-bit images; the data must be loaded with its native dtype.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        window: str | Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper = lower, upper
        self.window = None if window is None else window_range(window)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.is_floating_point() and not bool(torch.isfinite(image).all()):
                finite = image[torch.isfinite(image)]
                if finite.numel() == 0:
                    raise ValueError(f"{_source(image, key)}: no finite intensity values")
                low, high = float(finite.min()), float(finite.max())
                image = torch.nan_to_num(image, nan=low, posinf=high, neginf=low)
            if self.window is not None:
                low, high = self.window
            elif image.dtype == torch.uint8:
                low, high = 0.0, 255.0
            else:
                # numpy on the native dtype: torch.quantile takes floats only, and at most 2**24 values
                values = torch.as_tensor(image).detach().cpu().numpy()
                low, high = (float(v) for v in np.percentile(values, [self.lower, self.upper]))
            d[key] = _to_unit(image, low, high)
        return d


def to_rgb(image: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """Images with 1 (gray), 2 (gray + alpha), 3 or 4 (RGBA) channels along ``channel_dim`` to
    3 channels (RGB): gray is repeated, alpha dropped."""
    channels = image.shape[channel_dim]
    if channels in (1, 2):
        return image.narrow(channel_dim, 0, 1).repeat_interleave(3, dim=channel_dim)
    if channels in (3, 4):
        return image.narrow(channel_dim, 0, 3)
    raise ValueError(f"expected 1-4 channels (gray, gray+alpha, RGB, RGBA), got {channels}")


class ToRGBd(MapTransform):
    """Channel-first images with 1 (gray), 2 (gray + alpha), 3 or 4 (RGBA) channels to 3 (RGB).

    CLIP takes RGB; MONAI has ``RepeatChannel`` but nothing that also drops alpha channels.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = to_rgb(d[key])
            except ValueError as error:
                raise ValueError(f"{_source(d[key], key)}: {error}") from error
        return d


class LoadInputd(LoadImaged):
    """``LoadImaged`` whose errors name the file that could not be read and why (MONAI's name
    the transform, and pydicom's not even the file)."""

    def __call__(self, data: Mapping[Hashable, object], reader: object | None = None) -> dict:
        try:
            return super().__call__(data, reader)
        except Exception as error:  # each reader raises its own types
            names = ", ".join(str(data[key]) for key in self.key_iterator(dict(data)))
            raise ValueError(f"{names}: cannot read ({type(error).__name__}: {error})") from error


class EnsureSliceAxisd(MapTransform):
    """Give channel-first 2D images ``(C, H, W)`` a slice axis of size 1, ``(C, H, W, 1)``, so that
    a single DICOM frame or a 2D NIfTI runs as a one-slice volume (the saved map drops the axis
    again: ``SaveImaged(squeeze_end_dims=True)``); 3D volumes pass unchanged. MONAI has no
    transform adding a spatial axis."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.dim() == 3:
                image = image.unsqueeze(-1)
                if isinstance(image, MetaTensor):
                    image.affine = to_affine_nd(3, image.affine)
            elif image.dim() != 4:
                raise ValueError(
                    f"{_source(image, key)}: expected a 2D image or a 3D volume, got {image.dim() - 1} "
                    f"spatial dimensions (shape {tuple(image.shape)} with channels first)"
                )
            d[key] = image
        return d


def input_slice_indices(image: MetaTensor) -> tuple[int, list[int]]:
    """For a volume preprocessed with ``mvfa_preprocessing(volume=True)``: the voxel axis of the
    input file that its slices (its last axis) run along, and each slice's index on that axis,
    which is also its index in the saved anomaly map (same geometry as the input)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    original = np.asarray(image.meta.get("original_affine", affine), dtype=np.float64)
    to_input = np.linalg.solve(original, affine)  # processing voxel -> input voxel: a signed permutation
    axis = int(np.argmax(np.abs(to_input[:3, 2])))
    depth = image.shape[-1]
    indices = np.rint(to_input[axis, 2] * np.arange(depth) + to_input[axis, 3]).astype(int)
    return axis, indices.tolist()


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


def mvfa_preprocessing(
    image_size: int = 240,
    image_key: str = "image",
    mask_key: str | None = "mask",
    window: str | Sequence[float] | None = None,
    volume: bool = False,
    slice_plane: str = "axial",
) -> Compose:
    """MONAI pipeline from file paths to MVFA inputs.

    2D images (PNG, JPEG, BMP, TIFF; 8- or 16-bit, gray, RGB, palette): ``image`` (3, S, S) RGB in
    [0, 1] at ``S = image_size`` and, with ``mask_key``, ``mask`` (1, S, S) in {0, 1} (zeros where
    an item has no mask).

    ``volume=True``: NIfTI files, DICOM files and DICOM series folders through MONAI's default
    reader selection, as ``image`` (C, H, W, D) in [0, 1] at the volume's own voxel grid,
    reoriented (MONAI ``Orientationd``, exact and undone by ``Invertd``) so that the slices of
    ``slice_plane`` (``"axial"``, ``"coronal"``, ``"sagittal"``) lie along the last axis: the
    voxel axis nearest to that anatomical direction in the file's affine, so oblique and
    flipped acquisitions slice the same way. The inferer resizes the slices to ``image_size``
    batch by batch (:mod:`medad.volumes`). 2D files become one-slice volumes.

    ``window``: intensity policy, see :class:`UnitIntensityd`.
    """
    if volume:
        if mask_key is not None:
            raise ValueError("volume preprocessing reads images only: pass mask_key=None")
        if slice_plane not in SLICE_PLANES:
            raise ValueError(f"unknown slice_plane {slice_plane!r}; expected one of {sorted(SLICE_PLANES)}")
        return Compose([
            LoadInputd(keys=image_key, dtype=None, image_only=True),
            EnsureChannelFirstd(keys=image_key),
            EnsureSliceAxisd(keys=image_key),
            Orientationd(keys=image_key, axcodes=SLICE_PLANES[slice_plane], labels=None),
            UnitIntensityd(keys=image_key, window=window),
        ])
    reader = PILReader(converter=normalise_pil_mode, reverse_indexing=False)  # keep (rows, columns)
    size = (image_size, image_size)
    steps: list = [
        LoadInputd(keys=image_key, reader=reader, dtype=None, image_only=True),
        EnsureChannelFirstd(keys=image_key),
        UnitIntensityd(keys=image_key, window=window),
        ToRGBd(keys=image_key),
        Resized(keys=image_key, spatial_size=size, mode="bicubic", anti_aliasing=True),
        # bicubic overshoots: clip back into [0, 1]
        ScaleIntensityRanged(keys=image_key, a_min=0, a_max=1, b_min=0, b_max=1, clip=True),
    ]
    if mask_key is not None:
        steps += [
            LoadInputd(keys=mask_key, reader=reader, dtype=None, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys=mask_key, allow_missing_keys=True),
            Resized(keys=mask_key, spatial_size=size, mode="nearest", allow_missing_keys=True),
            BinarizeMaskd(keys=mask_key, allow_missing_keys=True),
            FillMissingMaskd(keys=mask_key, like=image_key),
        ]
    return Compose(steps)


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, low: float, high: float, alpha: float) -> torch.Tensor:
    """``heat`` (H, W) as a heat map blended over ``image`` (C, H, W) in [0, 1]: (3, H, W) in [0, 1]."""
    level = ((heat - low) / max(high - low, 1e-12)).clamp(0, 1)
    return ((1 - alpha) * to_rgb(image) + alpha * _hot(level)).clamp(0, 1)


def _hot(level: torch.Tensor) -> torch.Tensor:
    """A black-red-yellow-white ramp ("hot") of ``level`` in [0, 1], any shape: RGB ``(3, *shape)``."""
    return torch.stack([(3 * level).clamp(0, 1), (3 * level - 1).clamp(0, 1), (3 * level - 2).clamp(0, 1)])


def _to_pil(picture: torch.Tensor) -> Image.Image:
    return Image.fromarray((picture * 255).round().byte().permute(1, 2, 0).numpy())


#: Width in pixels of the colour bar margin :func:`annotate_overlay` adds to the right of a picture.
COLOUR_BAR_WIDTH = 64


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` pixels (a fixed bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


def annotate_overlay(
    picture: Image.Image, low: float, high: float, caption: str | None = None, marks: Mapping[str, float] | None = None
) -> Image.Image:
    """``picture`` with a colour bar of the heat ramp over ``[low, high]`` in a margin of
    :data:`COLOUR_BAR_WIDTH` pixels on its right (labelled with both ends and ``marks``, e.g. the
    pixel threshold, drawn as lines across the bar), and ``caption`` written on a dark band at
    its bottom left. The result is ``(width + COLOUR_BAR_WIDTH) x height``."""
    width, height = picture.size
    canvas = Image.new("RGB", (width + COLOUR_BAR_WIDTH, height), (24, 24, 24))
    canvas.paste(picture.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font_size = max(9, min(14, height // 12))
    font = _font(font_size)
    top, bottom = 6, max(7, height - 6)
    level = torch.linspace(1, 0, bottom - top).reshape(-1, 1)
    canvas.paste(_to_pil(_hot(level).expand(3, -1, 12)), (width + 6, top))
    span = max(high - low, 1e-12)
    labels = {f"{high:.3g}": high, f"{low:.3g}": low, **{f"{name} {value:.3g}": value for name, value in (marks or {}).items()}}
    for text, value in labels.items():
        y = top + round((1 - min(max((value - low) / span, 0.0), 1.0)) * (bottom - top - 1))
        if text not in (f"{high:.3g}", f"{low:.3g}"):
            draw.line([(width + 4, y), (width + 20, y)], fill=(0, 200, 255), width=2)
        y_text = min(max(y, font_size // 2 + 1), height - font_size // 2 - 1)  # whole labels at the ends
        draw.text((width + 22, y_text), text, fill=(235, 235, 235), font=font, anchor="lm")
    if caption:
        box = draw.textbbox((4, height - 3), caption, font=font, anchor="ld")
        draw.rectangle((0, box[1] - 3, box[2] + 4, height), fill=(0, 0, 0))
        draw.text((4, height - 3), caption, fill=(255, 255, 255), font=font, anchor="ld")
    return canvas


def input_size(image: torch.Tensor) -> tuple[int, int]:
    """``(rows, columns)`` of the file a preprocessed 2D image ``(C, S, S)`` came from: the size
    before ``mvfa_preprocessing``'s resize (the image's own size where it was not resized)."""
    for operation in reversed(getattr(image, "applied_operations", None) or []):
        if operation.get("class") == "Resize" and operation.get("orig_size") is not None:
            rows, columns = operation["orig_size"]
            return int(rows), int(columns)
    return int(image.shape[-2]), int(image.shape[-1])


def at_input_size(image: torch.Tensor, heat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A preprocessed 2D image ``(3, S, S)`` and its map ``(S, S)`` resized (bicubic, bilinear) to
    the input file's own ``(rows, columns)`` (:func:`input_size`): ``(3, H, W)`` and ``(H, W)``."""
    size = input_size(image)
    pixels = torch.as_tensor(image).detach().float().cpu()
    if tuple(pixels.shape[-2:]) == size:
        return pixels, heat
    resized = torch.nn.functional.interpolate(pixels[None], size=size, mode="bicubic", align_corners=False)[0]
    heat = torch.nn.functional.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(0, 1), heat


class MapToInputGridd(Invertd):
    """MONAI's ``Invertd`` for anomaly maps: the map ``(1, S, S)`` (or a volume's) is brought back
    to the input's pixel or voxel grid by inverting ``transform`` (the preprocessing of
    ``orig_keys``), and marked as one channel first: ``Invertd`` copies the image's meta data,
    whose channel layout (RGB files: channel last) is not the map's, and MONAI's writers would
    otherwise fail on every multi-channel image."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = super().__call__(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["original_channel_dim"] = "no_channel"
        return d


class SaveOverlayd(MapTransform):
    """Write ``<output_dir>/<case>_overlay.png``: the anomaly map as a heat map over the image.

    2D images: the model's input image and map, resized to the input file's own size and aspect
    ratio (:func:`at_input_size`), ``W x H`` for a ``W x H`` file. Volumes from
    ``mvfa_preprocessing(volume=True)`` (``(C, H, W, D)`` image, ``(1, H, W, D)`` map): a strip of
    the ``top_slices`` slices with the highest ``slice_scores_key`` values (the per-slice maximum
    of the map where that key is missing), most anomalous first, each captioned with its index in
    the input file (see :func:`input_slice_indices`), shown as radiologists do (axial: anterior
    up, the patient's right on the left) and with the pixel spacing's aspect ratio.

    Colours span ``value_range``: give one range for every image a model scores (the bundle's
    inference gives :meth:`medad.MVFADetector.map_scale` of its model unless ``overlay_range``
    is set), so that overlays compare; ``None`` stretches each map, or volume, over its own
    minimum to maximum, which shows where a map is highest, not how high. A colour bar of that
    range (with ``pixel_threshold`` marked) fills a margin of :data:`COLOUR_BAR_WIDTH` pixels on
    the right, and the item's ``score_key`` value is written on the picture with its decision at
    ``threshold`` (``abnormal`` when ``score >= threshold``; ``blank`` where ``blank_key`` is
    true). MONAI's savers write arrays, not blended pictures.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        alpha: float = 0.5,
        value_range: Sequence[float] | None = None,
        slice_scores_key: str = "slice_scores",
        top_slices: int = 3,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        score_key: str = "score",
        blank_key: str = "blank",
    ) -> None:
        super().__init__(keys)
        if value_range is not None and not (len(value_range) == 2 and float(value_range[0]) < float(value_range[1])):
            raise ValueError(f"value_range must be [low, high] with low < high, got {value_range!r}")
        self.output_dir, self.image_key = Path(output_dir), image_key
        self.alpha, self.value_range = alpha, value_range
        self.slice_scores_key, self.top_slices = slice_scores_key, top_slices
        self.threshold, self.pixel_threshold = threshold, pixel_threshold
        self.score_key, self.blank_key = score_key, blank_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.image_key]).detach().float().cpu()
        for key in self.key_iterator(d):
            heat = torch.as_tensor(d[key]).detach().float().cpu()[0]
            low, high = (float(v) for v in self.value_range) if self.value_range else (float(heat.min()), float(heat.max()))
            if heat.dim() == 3:
                picture = self._strip(d, image, heat, low, high)
            else:
                picture = _to_pil(heat_overlay(*at_input_size(d[self.image_key], heat), low, high, self.alpha))
            marks = {"t": self.pixel_threshold} if self.pixel_threshold is not None else None
            picture = annotate_overlay(picture, low, high, self._caption(d), marks)
            with atomic_write(self.output_dir / f"{_case_name(d[self.image_key])}_overlay.png", "wb") as handle:
                picture.save(handle, format="PNG")
        return d

    def _caption(self, d: Mapping) -> str | None:
        """``score 0.42: abnormal (>= 0.3)``, or ``blank``, for the picture; ``None`` without a score."""
        if self.blank_key in d and bool(torch.as_tensor(d[self.blank_key]).all()):
            return "blank: score 0"
        if self.score_key not in d:
            return None
        score = float(torch.as_tensor(d[self.score_key]).reshape(-1)[0])
        if self.threshold is None:
            return f"score {score:.3g}"
        decision = "abnormal" if score >= self.threshold else "normal"
        return f"score {score:.3g}: {decision} ({'>=' if score >= self.threshold else '<'} {self.threshold:.3g})"

    def _strip(self, d: Mapping, image: torch.Tensor, heat: torch.Tensor, low: float, high: float) -> Image.Image:
        scores = d.get(self.slice_scores_key)
        scores = heat.amax(dim=(0, 1)) if scores is None else torch.as_tensor(scores).detach().float().cpu()
        order = torch.argsort(scores, descending=True, stable=True)[: self.top_slices].tolist()
        _, input_index = input_slice_indices(d[self.image_key])
        affine = np.asarray(d[self.image_key].affine, dtype=np.float64)
        spacing_x, spacing_y = np.linalg.norm(affine[:3, 0]), np.linalg.norm(affine[:3, 1])
        width, height = image.shape[1], image.shape[2]  # displayed columns run along x, rows along y
        unit = min(spacing_x, spacing_y)
        size = (max(1, round(width * spacing_x / unit)), max(1, round(height * spacing_y / unit)))
        caption, gap = 12, 4
        strip = Image.new("RGB", (len(order) * (size[0] + gap) - gap, size[1] + caption))
        draw = ImageDraw.Draw(strip)
        for n, k in enumerate(order):
            panel = heat_overlay(image[..., k], heat[..., k], low, high, self.alpha)
            # in-plane axes point to R/A (or R/S, A/S): flip both and put y on the rows, so that
            # anterior (superior) is up and the patient's right (anterior) is on the left
            panel = panel.flip(1, 2).transpose(1, 2)
            left = n * (size[0] + gap)
            strip.paste(_to_pil(panel).resize(size, Image.BILINEAR), (left, caption))
            draw.text((left + 1, 0), f"#{input_index[k]} {float(scores[k]):.3g}", fill=(255, 255, 255))
        return strip


class SaveSliceScoresd(MapTransform):
    """Write ``<output_dir>/<case>_slice_scores.csv`` for a volume: one row per slice with
    ``axis`` (the input's voxel axis the slices run along), ``slice`` (the index on that axis, in
    the input file and in the saved map), ``score`` and ``empty`` (1 where the slice was skipped
    as background and scored 0, see :func:`medad.volumes.empty_slices`). Items without
    ``keys`` (2D images) are passed through.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        empty_key: str = "empty_slices",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.image_key, self.empty_key = Path(output_dir), image_key, empty_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            scores = torch.as_tensor(d[key]).detach().float().cpu().tolist()
            empty = torch.as_tensor(d.get(self.empty_key, torch.zeros(len(scores)))).bool().cpu().tolist()
            axis, indices = input_slice_indices(d[self.image_key])
            rows = sorted(zip(indices, scores, empty))
            path = self.output_dir / f"{_case_name(d[self.image_key])}_slice_scores.csv"
            with atomic_write(path, newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["axis", "slice", "score", "empty"])
                writer.writerows([axis, index, f"{score:.6g}", int(is_empty)] for index, score, is_empty in rows)
        return d
