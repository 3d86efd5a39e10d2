"""Inference as users run it: every image format through the bundle's ``inferring``, bad files and
bad models with one clear last line, blank images, file modes, whole-folder overwrite, and the
same answer from the bundle and from Python for the same model."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import medad
from medad.model.checkpoint import CheckpointError
from medad.io.checks import check_items
from medad.io.discovery import list_inputs
from medad.io.files import StagedOutput, atomic_write

from helpers import run_bundle_here, run_bundle_logged_in_process

# The model's own input size; images come in other sizes and aspect ratios.
SIZE = 112


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory, random_fewshot_model) -> Path:
    """A bundle root with a few-shot ``models/model.pt`` on the seeded random tiny backbone (the
    model records it: inference needs no backbone keys), calibrated with labels."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(random_fewshot_model.read_bytes())
    return root


@pytest.fixture(scope="module")
def detector(trained_root) -> medad.MVFADetector:
    return medad.load_detector(trained_root / "models" / "model.pt")


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, width)[None, :] * np.linspace(0.3, 1, height)[:, None]
    return np.clip(base + 0.2 * rng.random((height, width)), 0, 1)


def write_formats(folder: Path) -> dict[str, tuple[int, int]]:
    """One file per kind of image users have; returns each file's (rows, columns)."""
    folder.mkdir(parents=True)
    gray = (_texture(130, 150, 0) * 255).astype(np.uint8)
    rgb = np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], axis=-1)
    sizes = {}

    def save(name: str, image: Image.Image) -> None:
        image.save(folder / name)
        sizes[name] = (image.height, image.width)

    save("gray.png", Image.fromarray(gray))
    save("gray_alpha.png", Image.fromarray(gray).convert("LA"))
    save("rgb.png", Image.fromarray(rgb))
    save("rgb_jpeg.jpg", Image.fromarray(rgb))
    save("rgba.png", Image.fromarray(rgb).convert("RGBA"))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save("four_channels.tiff", Image.fromarray(rgb).convert("RGBA").resize((90, 200)))
    save("sixteen_bit.png", Image.fromarray((_texture(64, 96, 1) * 60000).astype(np.uint16)))
    save("float.tiff", Image.fromarray(_texture(80, 70, 2).astype(np.float32) * 300, mode="F"))
    save("blank.png", Image.fromarray(np.full((50, 60), 1200, np.uint16)))
    return sizes


def read_scores(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {Path(row["image"]).name: row for row in csv.DictReader(handle)}


def test_every_image_format_through_inferring_matches_python(trained_root, detector, tmp_path):
    inputs = tmp_path / "inputs"
    sizes = write_formats(inputs)
    run_bundle_here("inferring", ("inference",), trained_root, dataset_dir=inputs, num_workers=0)
    outputs = trained_root / "outputs"
    rows = read_scores(outputs / "scores.csv")
    assert set(rows) == set(sizes)
    threshold = detector.effective_thresholds()
    assert threshold.image_rule == "support_f1"
    for name, (height, width) in sizes.items():
        stem = Path(name).stem
        saved = nib.load(outputs / f"{stem}_anomaly_map.nii.gz")
        assert saved.shape == (width, height), name  # the image's grid as MONAI's LoadImage reads it
        assert (outputs / "overlays" / f"{stem}_overlay.png").is_file()
        # Python, on the file and on the same pixels as a PIL image, gives the bundle's answer.
        for source in (inputs / name, Image.open(inputs / name)):
            prediction = medad.predict_input(detector, source)
            assert prediction.score == pytest.approx(float(rows[name]["score"]), abs=1e-5), name
            assert prediction.anomalous == bool(int(rows[name]["anomalous"])), name
        np.testing.assert_allclose(prediction.anomaly_map, np.asarray(saved.dataobj).T, atol=1e-5)  # (rows, columns)
    # Blank images follow the empty-slice rule of volumes: score 0, reported, not flagged.
    assert rows["blank.png"]["blank"] == "1" and float(rows["blank.png"]["score"]) == 0.0
    assert rows["blank.png"]["anomalous"] == "0"
    assert {row["blank"] for name, row in rows.items() if name != "blank.png"} == {"0"}
    assert medad.predict_input(detector, np.zeros((40, 40), np.uint8)).blank


def _failing_run(root: Path, **overrides) -> list[str]:
    """The stderr lines of an ``inferring`` run that must end with status 1, run inside this process
    (``helpers.run_bundle_logged_in_process``): its status and last lines do not depend on the
    process boundary, which test_run_safety.py pins for a real bundle process."""
    status, stdout, lines = run_bundle_logged_in_process("inferring", ("inference",), root, num_workers=0, **overrides)
    assert status == 1, stdout[-3000:] + "\n".join(lines)[-3000:]
    return lines


def test_bad_inputs_end_with_one_summary_and_skip_runs_the_rest(trained_root, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray((_texture(40, 50, 3) * 255).astype(np.uint8)).save(inputs / "good.png")
    (inputs / "zero_bytes.png").write_bytes(b"")
    (inputs / "not_an_image.png").write_text("hello")
    Image.new("L", (1, 1)).save(inputs / "one_pixel.png")
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes((trained_root / "models" / "model.pt").read_bytes())

    lines = _failing_run(root, dataset_dir=inputs)
    assert lines[-1] == (
        "3 problem(s) in 3 of 4 items, listed above: fix them, or set on_bad_data to skip to leave those inputs out"
    )
    expected = {"zero_bytes.png": "empty file", "not_an_image.png": "unreadable image", "one_pixel.png": "image too small"}
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in lines[-5:]), (name, lines[-5:])
    assert not (root / "outputs").exists()  # nothing half-written, nothing that blocks the rerun

    run_bundle_here("inferring", ("inference",), root, dataset_dir=inputs, num_workers=0, on_bad_data="skip")
    assert set(read_scores(root / "outputs" / "scores.csv")) == {"good.png"}
    report = (root / "outputs" / "input_problems.csv").read_text()
    assert all(name in report for name in expected)


def test_volumes_with_frames_or_singular_affines_are_named(tmp_path):
    frames = tmp_path / "frames.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 6, 3).astype(np.float32), np.eye(4)), frames)
    single = tmp_path / "single_frame.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 6, 1).astype(np.float32), np.eye(4)), single)
    singular = tmp_path / "singular.nii.gz"
    image = nib.Nifti1Image(np.random.rand(20, 20, 6).astype(np.float32), None)
    image.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a zero slice axis
    image.header.set_qform(None, code=0)
    nib.save(image, singular)
    items = [{"image": str(path)} for path in (frames, single, singular)]
    with pytest.raises(ValueError) as raised:
        check_items(items, volumes=True)
    lines = str(raised.value).splitlines()
    assert any("frames.nii.gz" in line and "several frames" in line for line in lines)
    assert any("singular.nii.gz" in line and "singular" in line for line in lines)
    assert not any("single_frame" in line for line in lines)
    assert lines[-1].startswith("2 problem(s) in 2 of 3 items")


def test_inputs_whose_outputs_would_collide_are_refused(tmp_path):
    Image.new("L", (20, 20)).save(tmp_path / "scan.png")
    Image.new("L", (20, 20)).save(tmp_path / "scan.jpg")
    with pytest.raises(ValueError, match=r"would overwrite each other \(scan.jpg and scan.png -> scan_\*\)"):
        list_inputs(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file (0 bytes), not a model"),
        ("truncated", "not a complete PyTorch checkpoint (truncated"),
        ("foreign", "neither a medad model (models/model.pt) nor released MVFA adapters"),
        ("pickle", "refused: it holds pickled Python objects other than tensors"),
        ("resume", "a resume checkpoint: use models/model.pt"),
    ],
)
def test_bad_model_files_name_the_file_and_what_it_is_not(trained_root, tmp_path, content, message):
    path = tmp_path / "model.pt"
    good = trained_root / "models" / "model.pt"
    if content == "truncated":
        path.write_bytes(good.read_bytes()[:4000])
    elif content == "foreign":
        torch.save({"conv.weight": torch.zeros(3)}, path)
    elif content == "pickle":
        torch.save({"seg_adapters": Path("not a tensor")}, path)
    elif content == "resume":
        torch.save({"model": torch.load(good, weights_only=True), "optimizer": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as raised:
        medad.load_detector(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


def test_a_bad_model_ends_the_bundle_run_with_its_reason(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (20, 20)).save(inputs / "a.png")
    lines = _failing_run(tmp_path, dataset_dir=inputs)
    assert lines[-1] == f"medad: {tmp_path / 'models' / 'model.pt'}: empty file (0 bytes), not a model: was it copied or downloaded completely?"


def test_architecture_keys_that_contradict_the_model_are_refused(trained_root):
    with pytest.raises(CheckpointError, match=r"made for levels=\(1, 2, 3, 4\), but levels=\[6, 12, 18, 24\] was given"):
        medad.load_detector(trained_root / "models" / "model.pt", expect={"levels": [6, 12, 18, 24], "image_size": None})
    with pytest.raises(CheckpointError, match="trained on the seeded randomly initialised backbone"):
        medad.load_detector(trained_root / "models" / "model.pt", clip_weights="openai")


def test_outputs_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "table.csv") as handle:
            handle.write("a,b\n")
        assert stat.S_IMODE((tmp_path / "table.csv").stat().st_mode) == 0o644
        os.umask(0o077)
        with atomic_write(tmp_path / "private.csv") as handle:
            handle.write("a,b\n")
        assert stat.S_IMODE((tmp_path / "private.csv").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_overwrite_replaces_the_previous_outputs_as_a_whole(tmp_path):
    output = tmp_path / "outputs"
    first = StagedOutput(output)
    staging = Path(first.prepare())
    (staging / "old_anomaly_map.nii.gz").write_text("old")
    first.publish()
    assert sorted(p.name for p in output.iterdir()) == [".medad-output", "old_anomaly_map.nii.gz"]
    with pytest.raises(FileExistsError, match=r"not empty \(old_anomaly_map.nii.gz\).*overwrite"):
        StagedOutput(output).prepare()
    second = StagedOutput(output, overwrite=True)
    staging = Path(second.prepare())
    (staging / "new_anomaly_map.nii.gz").write_text("new")
    assert (output / "old_anomaly_map.nii.gz").is_file()  # untouched until the run completes
    second.publish()
    assert sorted(p.name for p in output.iterdir()) == [".medad-output", "new_anomaly_map.nii.gz"]
    failed = StagedOutput(output, overwrite=True)
    (Path(failed.prepare()) / "partial.nii.gz").write_text("half")
    failed.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    assert sorted(p.name for p in output.iterdir()) == [".medad-output", "new_anomaly_map.nii.gz"]
