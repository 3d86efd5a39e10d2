"""A small, deterministic anomaly-detection benchmark built from real medical images that ship
inside PyPI packages (nilearn, scikit-image, pydicom), written in the BMAD folder layout.

Each domain samples varied normal views of its source image(s) and turns some of them into
anomalies with :func:`synthesize_anomaly`, whose mask covers exactly the changed pixels::

    <Name>_AD/{valid,test}/good/img/00000.png
    <Name>_AD/{valid,test}/Ungood/img/00000.png
    <Name>_AD/{valid,test}/Ungood/anomaly_mask/00000.png   (domains in DOMAINS_WITH_MASKS)

nilearn, scikit-image and pydicom (the ``demo`` extra) are imported only when a domain's source
is first loaded, so ``import demo_data`` works without them.

A product tool, not part of the installed ``medad`` library: ``scripts/make_demo_data.py`` and
``scripts/demo.py`` import it as a sibling module (``from demo_data import ...``).
"""

from __future__ import annotations

import functools
import math
import shutil
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medad.io.files import atomic_write

__all__ = [
    "ANOMALY_KINDS",
    "DEFAULT_COUNTS",
    "DEMO_DOMAINS",
    "DOMAINS_WITH_MASKS",
    "domain_sampler",
    "make_demo_dataset",
    "synthesize_anomaly",
]

DEMO_DOMAINS = ("Brain_MRI", "Retina_Fundus", "Histology_IHC", "CT_Chest")
#: Domains with pixel-level ground truth; the others are classification-only (no anomaly_mask).
DOMAINS_WITH_MASKS = ("Brain_MRI", "Retina_Fundus", "CT_Chest")
ANOMALY_KINDS = ("lesion", "patch", "texture")
#: Images per split and class; 64 per domain, 256 in all.
DEFAULT_COUNTS = {"valid": {"good": 8, "Ungood": 8}, "test": {"good": 24, "Ungood": 24}}

_SPLITS = ("valid", "test")
_CLASSES = ("good", "Ungood")

Sampler = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Normal views
# ---------------------------------------------------------------------------------------------


def _warp(src: np.ndarray, size: int, center, scale: float, angle: float, flip: bool,
          bicubic: bool = False, cval: float = 0.0) -> np.ndarray:
    """A ``size`` x ``size`` float32 view of ``src`` (H, W[, C]) centred on ``center`` (row, col),
    with ``scale`` source pixels per output pixel, rotated by ``angle`` radians, mirrored if ``flip``."""
    c, s = math.cos(angle), math.sin(angle)
    matrix = scale * np.array([[c, -s], [s, c]]) @ np.diag([1.0, -1.0 if flip else 1.0])  # (row, col)
    # PIL's affine map (x = col, y = row) measures from pixel corners, not centres; its float
    # ("F") resampling is several times faster than scipy.ndimage's.
    offset = np.asarray(center, float) + 0.5 - matrix @ np.full(2, (size - 1) / 2 + 0.5)
    coeffs = (matrix[1, 1], matrix[1, 0], offset[1], matrix[0, 1], matrix[0, 0], offset[0])
    resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    channels = src[..., None] if src.ndim == 2 else src
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., k], np.float32), "F").transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=cval))
        for k in range(channels.shape[-1])], -1)
    return out[..., 0] if src.ndim == 2 else out


def _view_params(rng: np.random.Generator, max_angle_deg: float, full_turn: bool = False) -> tuple[float, bool]:
    angle = rng.uniform(0, 2 * math.pi) if full_turn else math.radians(rng.uniform(-max_angle_deg, max_angle_deg))
    return angle, bool(rng.random() < 0.5)


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x01 * 255), 0, 255).astype(np.uint8)


def _photometric(x01: np.ndarray, rng: np.random.Generator, gain: float, gamma: float, noise: float) -> np.ndarray:
    """Per-channel gain, gamma and Gaussian noise on an image in [0, 1]."""
    channels = 1 if x01.ndim == 2 else x01.shape[-1]
    gains = rng.uniform(1 - gain, 1 + gain, channels).astype(np.float32)
    x = np.clip(x01 * (gains[0] if x01.ndim == 2 else gains), 0, 1) ** rng.uniform(1 / gamma, gamma)
    return x + rng.normal(0, rng.uniform(0.25, 1.0) * noise, x.shape).astype(np.float32)


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # Sources are cached and shared between calls: guard them against in-place edits.
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=1)
def _mni_slices() -> tuple[np.ndarray, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0.5
    area = brain.sum(axis=(0, 1))
    # Axial slices where the brain is large (>= 70% of its largest cross-section), anterior up.
    z = np.flatnonzero(area >= 0.7 * area.max())
    t1 = np.rot90(t1[:, :, z], axes=(0, 1)).transpose(2, 0, 1)
    brain = np.rot90(brain[:, :, z], axes=(0, 1)).transpose(2, 0, 1)
    return _readonly(np.ascontiguousarray(t1 / t1.max()), np.ascontiguousarray(brain))


def _brain_sampler(size: int) -> Sampler:
    slices, brains = _mni_slices()

    def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        k = rng.integers(len(slices))
        rows, cols = np.nonzero(brains[k])
        center = np.array([rows.mean(), cols.mean()]) + rng.normal(0, 3, 2)
        extent = max(np.ptp(rows), np.ptp(cols))
        angle, flip = _view_params(rng, 10)
        scale = extent * rng.uniform(1.05, 1.25) / size
        img = _warp(slices[k], size, center, scale, angle, flip)
        roi = _warp(brains[k].astype(np.float32), size, center, scale, angle, flip) > 0.5
        # Smooth multiplicative bias field, as MRI coil sensitivity gives.
        ramp = np.linspace(-1, 1, size, dtype=np.float32)
        img = img * (1 + rng.uniform(-0.1, 0.1) * ramp[:, None] + rng.uniform(-0.1, 0.1) * ramp[None, :])
        return _to_uint8(_photometric(img, rng, 0.08, 1.2, 0.025)), roi

    return sample


@functools.lru_cache(maxsize=1)
def _retina() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    rgb = Image.fromarray(data.retina()).resize((512, 512), Image.Resampling.LANCZOS)
    img = np.asarray(rgb, dtype=np.float32) / 255
    # The field of view is the bright disc; everything outside is near-black.
    fov = ndimage.binary_fill_holes(img.max(axis=-1) > 0.08)
    fov = ndimage.binary_erosion(ndimage.binary_opening(fov, iterations=2), iterations=3)
    return _readonly(img, fov)


def _retina_sampler(size: int) -> Sampler:
    img, fov = _retina()
    rows, cols = np.nonzero(fov)
    center0 = np.array([rows.mean(), cols.mean()])
    radius = math.sqrt(fov.sum() / math.pi)

    def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        zoom = rng.uniform(1.0, 1.5)
        center = center0 + rng.uniform(-1, 1, 2) * (1 - 1 / zoom) * radius * 0.6
        angle, flip = _view_params(rng, 15)
        scale = 2 * radius * rng.uniform(1.02, 1.08) / zoom / size
        view = _warp(img, size, center, scale, angle, flip)
        roi = _warp(fov.astype(np.float32), size, center, scale, angle, flip) > 0.5
        return _to_uint8(_photometric(view, rng, 0.1, 1.2, 0.012)), roi

    return sample


@functools.lru_cache(maxsize=1)
def _ihc() -> np.ndarray:
    from skimage import data

    return _readonly(np.asarray(data.immunohistochemistry(), dtype=np.float32) / 255)[0]


def _histology_sampler(size: int) -> Sampler:
    img = _ihc()
    side = min(img.shape[:2])

    def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        crop = rng.uniform(0.3, 0.6) * side
        # Keep the rotated crop's corners inside the slide (half-diagonal < crop * 0.71).
        center = rng.uniform(0.72 * crop, side - 0.72 * crop, 2)
        angle, flip = _view_params(rng, 0, full_turn=True)
        view = _warp(img, size, center, crop / size, angle, flip)
        # Tissue has no "inside": the whole view can carry an anomaly.
        return _to_uint8(_photometric(view, rng, 0.04, 1.15, 0.015)), np.ones((size, size), bool)

    return sample


@functools.lru_cache(maxsize=1)
def _ct_slice() -> tuple[np.ndarray, np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    body = ndimage.binary_opening(ndimage.binary_fill_holes(hu > -400), iterations=2)
    return _readonly(hu, body)


def _ct_sampler(size: int) -> Sampler:
    hu, body = _ct_slice()
    side = min(hu.shape)

    def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        crop = rng.uniform(0.7, 1.0) * side
        center = (np.array(hu.shape) - 1) / 2 + rng.uniform(-1, 1, 2) * (side - crop) / 2
        angle, flip = _view_params(rng, 8)
        view = _warp(hu, size, center, crop / size, angle, flip, bicubic=True, cval=-1024)
        roi = _warp(body.astype(np.float32), size, center, crop / size, angle, flip) > 0.5
        view = view + rng.normal(0, rng.uniform(3, 15), view.shape).astype(np.float32)
        # Soft-tissue window with a varied level and width, as CT viewers apply.
        level, width = rng.uniform(20, 60), rng.uniform(350, 450)
        return _to_uint8((view - level + width / 2) / width), roi

    return sample


_SAMPLERS: dict[str, Callable[[int], Sampler]] = {
    "Brain_MRI": _brain_sampler,
    "Retina_Fundus": _retina_sampler,
    "Histology_IHC": _histology_sampler,
    "CT_Chest": _ct_sampler,
}


def domain_sampler(domain: str, size: int = 240) -> Sampler:
    """A function ``rng -> (image, roi)`` drawing varied normal views of a demo domain.

    ``image`` is uint8, ``(size, size)`` (grayscale) or ``(size, size, 3)`` (RGB); ``roi`` is a
    bool ``(size, size)`` map of where anomalies may go (brain, fundus field of view, body; all
    of a histology view). The domain's source is loaded once per process.
    """
    if domain not in _SAMPLERS:
        raise ValueError(f"unknown demo domain {domain!r}; expected one of {DEMO_DOMAINS}")
    return _SAMPLERS[domain](size)


# ---------------------------------------------------------------------------------------------
# Anomalies
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-peak Gaussian-smoothed noise."""
    n = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    n -= n.mean()
    return (n / max(np.abs(n).max(), 1e-8)).astype(np.float32)


def _blob(rng: np.random.Generator, roi: np.ndarray, depth: np.ndarray
          ) -> tuple[np.ndarray, tuple[slice, slice], tuple[int, int], float]:
    """A soft, irregular ellipse inside ``roi`` (``depth``: distance to its border).

    Returns its 8-bit-quantised weight over a window that holds it, the window, the centre and
    the minor radius.
    """
    h, w = roi.shape
    area = min(rng.uniform(0.008, 0.05) * h * w, 0.3 * roi.sum())
    aspect = rng.uniform(0.5, 1.0)
    a = math.sqrt(area / (math.pi * aspect))
    b = a * aspect
    # Centre deep enough in the ROI that most of the blob fits before it is clipped to the ROI.
    candidates = np.argwhere(depth >= min(b, 0.9 * depth.max()))
    cy, cx = (int(v) for v in candidates[rng.integers(len(candidates))])
    reach = math.ceil(1.25 * a)  # the lobes below stretch the radius by at most 1.24
    box = (slice(max(cy - reach, 0), min(cy + reach + 1, h)), slice(max(cx - reach, 0), min(cx + reach + 1, w)))
    yy, xx = np.mgrid[box].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    u = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)) / a
    v = (-(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)) / b
    # A few low angular harmonics make the border lobed rather than a perfect ellipse.
    phi = np.arctan2(v, u)
    lobes = 1 + sum(rng.uniform(0, 0.08) * np.cos(k * phi + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4))
    t = np.clip((1 - np.hypot(u, v) / lobes) / rng.uniform(0.2, 0.4), 0, 1)
    # Quantise to 8 bits: the mask is then exactly where the blend brings anything in.
    weight = np.round(t * t * (3 - 2 * t) * roi[box] * 255) / 255
    return weight.astype(np.float32), box, (cy, cx), b


def _sample_channels(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.map_coordinates(img[..., k], [rows, cols], order=1, mode="reflect")
                     for k in range(img.shape[-1])], -1)


def synthesize_anomaly(image: np.ndarray, rng: np.random.Generator, roi: np.ndarray | None = None,
                       kind: str | None = None, donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Add one synthetic anomaly to a normal ``image`` and return ``(anomalous, mask)``.

    Args:
        image: uint8 ``(H, W)`` or ``(H, W, 3)`` normal image.
        rng: the random generator that decides everything.
        roi: bool ``(H, W)``: where the anomaly may go (default: everywhere).
        kind: one of :data:`ANOMALY_KINDS` (default: drawn at random):
            ``"lesion"``, a bright or dark textured blob with a soft border; ``"patch"``, a
            rotated, rescaled, brightened or darkened patch of ``donor`` (default ``image``)
            from another place, alpha-blended in; ``"texture"``, a local elastic warp plus
            noise texture. Each covers about 1% to 5% of the image.
        donor: an image like ``image`` to take ``"patch"`` content from.

    Returns:
        ``anomalous``, uint8 like ``image``, and ``mask``, bool ``(H, W)``: the pixels whose
        8-bit blending weight is > 0. Every pixel outside ``mask`` equals ``image`` exactly and
        ``mask`` lies inside ``roi``.
    """
    roi = np.ones(image.shape[:2], bool) if roi is None else np.asarray(roi, bool)
    if roi.shape != image.shape[:2] or not roi.any():
        raise ValueError("roi must be a non-empty bool map of the image's height and width")
    kind = ANOMALY_KINDS[rng.integers(len(ANOMALY_KINDS))] if kind is None else kind
    if kind not in ANOMALY_KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {ANOMALY_KINDS}")
    img = image.astype(np.float32).reshape(*image.shape[:2], -1)
    # Distance to the ROI's border, counting the image edge as border (hence the padding).
    depth = ndimage.distance_transform_edt(np.pad(roi, 1))[1:-1, 1:-1]
    # All the work happens in the window around the blob; the rest of the image is untouched.
    weight, box, (cy, cx), radius = _blob(rng, roi, depth)
    inside = weight > 0
    w = weight[..., None]
    here = img[box]
    yy, xx = np.mgrid[box].astype(np.float32)

    if kind == "lesion":
        local = here[inside].mean(axis=0)
        # Bright or dark at random, but dark where a bright lesion would only saturate (bone in a
        # CT window) and bright where a dark one has no room.
        bright = (rng.random() < 0.5 and local.mean() < 170) or local.mean() < 40
        target = local * rng.uniform(1.3, 1.7) + 40 if bright else local * rng.uniform(0.2, 0.55)
        grain = 1 + 0.15 * _smooth_noise(rng, inside.shape, rng.uniform(1, 3))[..., None]
        new = here + rng.uniform(0.6, 0.95) * w * (target * grain - here)
    elif kind == "patch":
        source = img if donor is None else donor.astype(np.float32).reshape(img.shape)
        # Take the patch from elsewhere in the ROI, at least two minor radii away.
        far = np.hypot(*(np.indices(roi.shape) - np.array([cy, cx])[:, None, None])) > 2 * radius
        candidates = np.argwhere((depth >= min(radius, 0.9 * depth.max())) & far)
        if len(candidates) == 0:
            candidates = np.argwhere(roi)
        sy, sx = candidates[rng.integers(len(candidates))]
        angle, zoom = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.6)
        c, s = math.cos(angle) * zoom, math.sin(angle) * zoom
        rows = sy + c * (yy - cy) - s * (xx - cx)
        cols = sx + s * (yy - cy) + c * (xx - cx)
        # Foreign tissue rarely matches the local brightness: scale it up or down by 10-35%.
        gain = rng.uniform(1.1, 1.35) ** rng.choice([-1, 1])
        new = here + rng.uniform(0.75, 1.0) * w * (gain * _sample_channels(source, rows, cols) - here)
    else:
        # Displacements fade out with the weight, so the warp ends at the mask border.
        amplitude = rng.uniform(0.25, 0.5) * radius * weight
        sigma = max(2.0, radius / 4)
        rows = yy + amplitude * _smooth_noise(rng, inside.shape, sigma)
        cols = xx + amplitude * _smooth_noise(rng, inside.shape, sigma)
        texture = _smooth_noise(rng, inside.shape, rng.uniform(0.8, 2.0))[..., None]
        tint = here[inside].mean(axis=0) / max(here[inside].mean(), 1.0)
        # Grey-level standard deviation 25-45: coarse enough to stand out on textured tissue.
        new = _sample_channels(img, rows, cols) + w * rng.uniform(25, 45) / texture.std() * texture * tint
        # Reflect at 0 and 255 so that saturated tissue shows the texture too.
        new = 255 - np.abs(255 - np.abs(new))

    out = img.copy()
    out[box] = np.where(inside[..., None], np.clip(np.round(new), 0, 255), here)
    mask = np.zeros(roi.shape, bool)
    mask[box] = inside
    return out.astype(np.uint8).reshape(image.shape), mask


# ---------------------------------------------------------------------------------------------
# Writing the data set
# ---------------------------------------------------------------------------------------------


def _save_png(array: np.ndarray, path: Path) -> None:
    # Written beside the target, then renamed: readers never see a half-written PNG. Light
    # compression: images are small and zlib's higher levels dominated the run time.
    with atomic_write(path, "wb") as handle:
        Image.fromarray(array).save(handle, format="PNG", compress_level=1)


def _check_counts(counts: Mapping) -> dict[str, dict[str, int]]:
    checked = {}
    for split in _SPLITS:
        per_class = counts.get(split, {})
        checked[split] = {cls: int(per_class.get(cls, 0)) for cls in _CLASSES}
        if any(n < 0 for n in checked[split].values()):
            raise ValueError(f"counts must be >= 0, got {counts!r}")
    unknown = set(counts) - set(_SPLITS) | {c for v in counts.values() for c in v} - set(_CLASSES)
    if unknown:
        raise ValueError(f"unknown splits or classes in counts: {sorted(unknown)}")
    return checked


def make_demo_dataset(output: str | Path, seed: int = 0, size: int = 240, counts: Mapping | None = None,
                      overwrite: bool = False) -> dict[str, dict[str, dict[str, int]]]:
    """Write the demo benchmark (every domain of :data:`DEMO_DOMAINS`) under ``output``.

    Args:
        output: folder to write ``<Name>_AD/...`` into; must be absent or empty unless
            ``overwrite``.
        seed: non-negative seed; the same seed gives byte-identical files.
        size: side of the square images, in pixels.
        counts: ``{"valid"|"test": {"good"|"Ungood": n}}``, default :data:`DEFAULT_COUNTS`.
        overwrite: allow a non-empty ``output``; the ``<Name>_AD`` folders written here are
            replaced, anything else in ``output`` is left alone.

    Returns:
        The number of images written, ``{domain: {split: {class: n}}}``.
    """
    output = Path(output)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    counts = _check_counts(DEFAULT_COUNTS if counts is None else counts)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} is not empty; pass overwrite=True to replace its demo data")
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for domain in DEMO_DOMAINS:
        sample = domain_sampler(domain, size)
        root = output / f"{domain}_AD"
        if root.exists():
            shutil.rmtree(root)
        # A per-domain key from the name keeps each domain's images stable if domains are added.
        key = zlib.crc32(domain.encode())
        for s, split in enumerate(_SPLITS):
            for c, cls in enumerate(_CLASSES):
                img_dir = root / split / cls / "img"
                img_dir.mkdir(parents=True)
                mask_dir = root / split / cls / "anomaly_mask"
                with_mask = cls == "Ungood" and domain in DOMAINS_WITH_MASKS
                if with_mask:
                    mask_dir.mkdir()
                for i in range(counts[split][cls]):
                    rng = np.random.default_rng([seed, key, s, c, i])
                    image, roi = sample(rng)
                    name = f"{i:05d}.png"
                    if cls == "Ungood":
                        donor = sample(rng)[0] if rng.random() < 0.5 else None
                        image, mask = synthesize_anomaly(image, rng, roi, donor=donor)
                        if with_mask:
                            _save_png(mask.astype(np.uint8) * 255, mask_dir / name)
                    _save_png(image, img_dir / name)
        summary[domain] = {split: dict(counts[split]) for split in _SPLITS}
    return summary
