"""What medad writes and draws from the model's anomaly maps (the output side; reading and
preparing inputs is :mod:`medad.io.transforms`).

It owns the output transforms of the bundle's inference (``configs/inference.json``):
:class:`MapToInputGridd` (a map back on the input's own pixel or voxel grid), :class:`SaveMapd`
(the map files in :data:`MAP_FORMATS`; :func:`read_map_png` reads a 16-bit PNG map back),
:class:`SaveOverlayd` (``<case>_overlay.png``) and :class:`SaveSliceScoresd`
(``<case>_slice_scores.csv``); and the drawing they share with :mod:`medad.io.report`:
:func:`heat_overlay`, :func:`annotate_overlay` (colour bar of :data:`COLOUR_BAR_WIDTH` pixels and
caption), :func:`input_size` and :func:`at_input_size` (a preprocessed image at its file's own
size). Every file is written atomically (:mod:`medad.io.files`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter, PILWriter
from monai.transforms import Invertd, MapTransform, SaveImage
from PIL import Image, ImageDraw, ImageFont

from medad.io.files import atomic_image_writer, atomic_write, output_stem
from medad.io.transforms import image_source, input_slice_indices, to_rgb

__all__ = [
    "COLOUR_BAR_WIDTH",
    "MAP_FORMATS",
    "MapNibabelWriter",
    "PNG_MAP_RANGE_KEYS",
    "MapToInputGridd",
    "SaveMapd",
    "SaveOverlayd",
    "SaveSliceScoresd",
    "annotate_overlay",
    "at_input_size",
    "heat_overlay",
    "input_size",
    "read_map_png",
]


def _case_name(image: object) -> str:
    """Output file stem of a case (:func:`medad.io.files.output_stem` of its source)."""
    return output_stem(image_source(image))


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
    ``orig_keys``), the grid and affine MONAI's ``LoadImage`` gives the input file (2D images:
    ``(1, columns, rows)``), and marked as one channel first: ``Invertd`` copies the image's meta data,
    whose channel layout (RGB files: channel last) is not the map's, and MONAI's writers would
    otherwise fail on every multi-channel image."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = super().__call__(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["original_channel_dim"] = "no_channel"
        return d


#: Formats of saved anomaly maps (the bundle's ``map_format``, :class:`SaveMapd`).
MAP_FORMATS = ("nifti", "png", "tiff")
#: Text chunks of a 16-bit PNG map: the values its pixels 0 and 65535 stand for (:func:`read_map_png`).
PNG_MAP_RANGE_KEYS = ("anomaly_map_low", "anomaly_map_high")
_PNG_LEVELS = 65535


class MapNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that, asked not to resample (``SaveImage(resample=False)``), writes
    the data with its affine as they are.

    MONAI's writer passes even such data through ``SpatialResample`` (to its own affine), which
    sizes the output from the affine cut down to the data's rank; a one-slice volume's map written
    2D (``squeeze_end_dims``) keeps its 3D affine, and for a sagittal or coronal slice the cut
    (x, y) part of it is singular ("Affine ... is not invertible")."""

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: object) -> None:
        if resample:
            super().set_metadata(meta_dict, resample=resample, **options)
            return
        _, affine, _ = self.get_meta_info(meta_dict)
        if self.output_dtype is None and hasattr(self.data_obj, "dtype"):
            self.output_dtype = self.data_obj.dtype
        self.affine = None if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)


class SaveMapd(MapTransform):
    """Write anomaly maps from :class:`MapToInputGridd` as ``<output_dir>/<case>_anomaly_map.<ext>``
    in each of ``formats`` (:data:`MAP_FORMATS`), with MONAI's ``SaveImage`` and writers, each file
    written atomically (:func:`medad.io.files.atomic_image_writer`):

    - ``"nifti"``: float32 ``.nii.gz`` (``NibabelWriter``; ``nifti_ext=".nii"`` skips gzip) with
      the map's affine: a volume's map on the volume's voxel grid, a 2D image's on the
      ``(columns, rows)`` grid MONAI's ``LoadImage`` reads the image on. Volumes' maps are
      always written as NIfTI, whatever ``formats`` say.
    - ``"png"`` (2D images): a 16-bit gray PNG (``PILWriter``) of the image's own size, each
      map's minimum to maximum scaled to 0 to 65535 (rounded to the nearest level) and that
      range kept in the file's text chunks :data:`PNG_MAP_RANGE_KEYS`: value = low + pixel /
      65535 * (high - low) (:func:`read_map_png`).
    - ``"tiff"`` (2D images): a float32 TIFF (``PILWriter``) of the image's own size with the
      map's values exactly.

    An empty ``formats`` writes no map file at all (the bundle's ``output_format`` ``dicom``,
    whose maps go into DICOM objects instead: :func:`medad.surfaces.workflow.map_formats`).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        formats: str | Sequence[str] = "nifti",
        output_postfix: str = "anomaly_map",
        nifti_ext: str = ".nii.gz",
    ) -> None:
        super().__init__(keys)
        formats = [formats] if isinstance(formats, str) else list(formats)
        if any(f not in MAP_FORMATS for f in formats):
            raise ValueError(f"map_format must be one of {list(MAP_FORMATS)} or a list of them, got {formats!r}")
        if nifti_ext not in (".nii.gz", ".nii"):
            raise ValueError(f"nifti_ext must be '.nii.gz' or '.nii', got {nifti_ext!r}")
        self.formats = formats
        common = {"output_dir": output_dir, "output_postfix": output_postfix, "resample": False,
                  "separate_folder": False, "print_log": False}
        self.nifti = SaveImage(output_ext=nifti_ext, writer=atomic_image_writer(MapNibabelWriter),
                               output_dtype=np.float32, squeeze_end_dims=True, **common)
        pil = atomic_image_writer(PILWriter)
        self.png = SaveImage(output_ext=".png", writer=pil, output_dtype=np.uint16, scale=None, **common)
        self.tiff = SaveImage(output_ext=".tiff", writer=pil, output_dtype=np.float32, scale=None, **common)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            anomaly_map = d[key]
            image = anomaly_map.dim() == 3  # a 2D image's map (1, columns, rows); a volume's is (1, X, Y, Z)
            if self.formats and (not image or "nifti" in self.formats):
                self.nifti(anomaly_map)
            if image and "tiff" in self.formats:
                self.tiff(anomaly_map)
            if image and "png" in self.formats:
                self._save_png(anomaly_map)
        return d

    def _save_png(self, anomaly_map: torch.Tensor) -> None:
        from PIL.PngImagePlugin import PngInfo

        low, high = float(anomaly_map.min()), float(anomaly_map.max())
        levels = ((anomaly_map - low) / max(high - low, 1e-30) * _PNG_LEVELS).round()  # meta data kept
        info = PngInfo()
        for name, value in zip(PNG_MAP_RANGE_KEYS, (low, high)):
            info.add_text(name, repr(value))
        self.png.set_options(write_kwargs={"pnginfo": info})
        self.png(levels)


def read_map_png(path: str | os.PathLike) -> np.ndarray:
    """The anomaly map of a 16-bit PNG that :class:`SaveMapd` wrote, float32 ``(rows, columns)``
    (as PIL and :class:`medad.Prediction` lay out images; MONAI's ``LoadImage`` gives its
    transpose). Read with PIL: MONAI's ``PILReader`` drops the PNG's text chunks, which hold the
    range (:data:`PNG_MAP_RANGE_KEYS`)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {})
        if not all(name in text for name in PNG_MAP_RANGE_KEYS):
            raise ValueError(f"{path}: not an anomaly map PNG of medad (no {' and '.join(PNG_MAP_RANGE_KEYS)} text)")
        low, high = (float(text[name]) for name in PNG_MAP_RANGE_KEYS)
        pixels = np.asarray(image, dtype=np.float64)
    return (low + pixels / _PNG_LEVELS * (high - low)).astype(np.float32)


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
    as background and scored 0, see :func:`medad.engine.volumes.empty_slices`). Items without
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
