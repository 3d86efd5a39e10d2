"""Saved anomaly maps overlay their image: a 2D map in NIfTI has the shape, axis order and affine
MONAI's ``LoadImage`` gives the image (``(columns, rows)``), and ``map_format`` also writes it as a
16-bit PNG (range kept in the file) or a float32 TIFF of the image's own size; volumes' maps
stay NIfTI on the voxel grid. JSON that medad writes is strict (``null``, never ``NaN``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from PIL import Image

import medad
from medad.io.files import strict_json
from medad.io.outputs import PNG_MAP_RANGE_KEYS, SaveMapd, read_map_png

from helpers import run_bundle


def strict_loads(text: str):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity``, as JSON parsers
    other than Python's do."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth gradient with noise in [0, 1], (rows, columns), neither symmetric nor square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    return np.clip(0.6 * x / width + 0.3 * (y / height) ** 2 + 0.1 * rng.random((height, width)), 0, 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_fewshot_model) -> dict:
    """One bundle inference with ``map_format`` NIfTI, PNG and TIFF over non-square 2D images."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(random_fewshot_model.read_bytes())
    inputs = root / "inputs"
    inputs.mkdir()
    gray = _picture(260, 300, 0)  # a 300 x 260 PNG: LoadImage reads it as (300, 260)
    Image.fromarray(np.rint(gray * 255).astype(np.uint8)).save(inputs / "wide.png")
    rgb = np.stack([_picture(170, 90, 1), _picture(170, 90, 2), _picture(170, 90, 3)], axis=-1)
    Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).save(inputs / "tall_rgb.png")
    Image.fromarray(np.rint(_picture(64, 96, 4) * 60000).astype(np.uint16)).save(inputs / "sixteen_bit.png")
    run_bundle("inferring", ("inference",), root, dataset_dir=inputs, num_workers=0, map_format=["nifti", "png", "tiff"])
    return {"root": root, "inputs": inputs, "outputs": root / "outputs",
            "detector": medad.load_detector(root / "models" / "model.pt")}


@pytest.mark.parametrize("name", ["wide", "tall_rgb", "sixteen_bit"])
def test_a_2d_nifti_map_is_on_the_grid_load_image_reads_its_image_on(run, name):
    image = LoadImage(image_only=True)(run["inputs"] / f"{name}.png")
    anomaly_map = LoadImage(image_only=True)(run["outputs"] / f"{name}_anomaly_map.nii.gz")
    if name == "wide":
        assert tuple(image.shape) == tuple(anomaly_map.shape) == (300, 260)
    assert tuple(anomaly_map.shape) == tuple(image.shape[:2])  # RGB: (columns, rows, 3)
    np.testing.assert_allclose(np.asarray(anomaly_map.affine), np.asarray(image.affine), atol=1e-6)
    # Python keeps (rows, columns): the same values, transposed.
    prediction = medad.predict_input(run["detector"], run["inputs"] / f"{name}.png")
    assert prediction.anomaly_map.shape == Image.open(run["inputs"] / f"{name}.png").size[::-1]
    np.testing.assert_allclose(anomaly_map.numpy(), prediction.anomaly_map.T, atol=1e-5)


@pytest.mark.parametrize("name", ["wide", "tall_rgb", "sixteen_bit"])
def test_map_format_writes_the_map_as_png_and_tiff_too(run, name):
    nifti = LoadImage(image_only=True)(run["outputs"] / f"{name}_anomaly_map.nii.gz").numpy()
    with Image.open(run["inputs"] / f"{name}.png") as source:
        size = source.size
    # float32 TIFF: the values exactly, read alike by MONAI (PILReader: .tiff is not among
    # LoadImage's default suffixes) and PIL.
    tiff = run["outputs"] / f"{name}_anomaly_map.tiff"
    with Image.open(tiff) as picture:
        assert picture.mode == "F" and picture.size == size
        np.testing.assert_array_equal(np.asarray(picture), nifti.T)
    np.testing.assert_array_equal(LoadImage(image_only=True, reader="PILReader")(tiff).numpy(), nifti)
    # 16-bit PNG of the image's size: each map's own range in 65536 levels, the range in the file.
    png = run["outputs"] / f"{name}_anomaly_map.png"
    with Image.open(png) as picture:
        assert picture.mode == "I;16" and picture.size == size
        low, high = (float(picture.text[key]) for key in PNG_MAP_RANGE_KEYS)
        levels = np.asarray(picture)
    assert levels.min() == 0 and levels.max() == 65535
    assert low == pytest.approx(float(nifti.min()), abs=1e-7) and high == pytest.approx(float(nifti.max()), abs=1e-7)
    np.testing.assert_allclose(read_map_png(png), nifti.T, rtol=0, atol=(high - low) / 65535)


def _map(*spatial: int, name: str) -> MetaTensor:
    """A map as :class:`medad.io.outputs.MapToInputGridd` gives it: one channel first."""
    values = torch.rand(1, *spatial, generator=torch.Generator().manual_seed(0))
    return MetaTensor(values, meta={"filename_or_obj": name, "spatial_shape": np.asarray(spatial)})


def test_save_map_writes_the_formats_asked_for_and_volumes_as_nifti(tmp_path):
    save = SaveMapd(keys="pred", output_dir=tmp_path, formats="tiff")
    save({"pred": _map(30, 20, name="/data/photo.png")})
    save({"pred": _map(8, 9, 5, name="/data/scan.nii.gz")})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo_anomaly_map.tiff", "scan_anomaly_map.nii.gz"]
    volume = LoadImage(image_only=True)(tmp_path / "scan_anomaly_map.nii.gz")
    assert volume.shape == (8, 9, 5)
    # a constant map: its one value, kept exactly
    SaveMapd(keys="pred", output_dir=tmp_path, formats=["png"])(
        {"pred": MetaTensor(torch.full((1, 4, 3), 0.25), meta={"filename_or_obj": "flat.png"})})
    np.testing.assert_array_equal(read_map_png(tmp_path / "flat_anomaly_map.png"), np.full((3, 4), 0.25, np.float32))
    with pytest.raises(ValueError, match=r"map_format must be one of \['nifti', 'png', 'tiff'\]"):
        SaveMapd(keys="pred", output_dir=tmp_path, formats=["nifti", "jpeg"])
    with pytest.raises(ValueError, match="not an anomaly map PNG"):
        Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "plain.png")
        read_map_png(tmp_path / "plain.png")


def test_strict_json_turns_non_finite_values_into_null():
    document = {
        "auroc": float("nan"),
        "nested": [{"ap": float("inf"), "n": np.int64(3)}, (np.float32(0.5), -math.inf)],
        "array": np.array([1.0, np.nan]),
        "tensor": torch.tensor([[0.25, float("nan")]]),
        "kept": ["text", None, True, 2],
    }
    with pytest.raises(ValueError):
        json.dumps(document, allow_nan=False, default=str)
    text = json.dumps(strict_json(document), allow_nan=False)
    assert strict_loads(text) == {
        "auroc": None,
        "nested": [{"ap": None, "n": 3}, [0.5, None]],
        "array": [1.0, None],
        "tensor": [[0.25, None]],
        "kept": ["text", None, True, 2],
    }
    with pytest.raises(ValueError, match="not JSON: NaN"):
        strict_loads(json.dumps({"auroc": float("nan")}))


def test_reproduction_results_are_strict_json(tmp_path):
    from reproduction import GridOptions, write_results

    options = GridOptions(dataset_dir=tmp_path, output=tmp_path)
    row = {"setting": "few-shot", "method": "mvfa", "shot": 2, "target": "Alpha", "pick": "", "has_masks": False,
           "folder": "k2/Alpha", "image_auroc": np.float64(0.75), "pixel_auroc": float("nan")}
    _, json_path = write_results([row], [], options)
    (result,) = strict_loads(json_path.read_text())["results"]
    assert result["image_auroc"] == 0.75 and result["pixel_auroc"] is None
