"""Bad inputs, interrupted runs and untrusted files: clear errors, no lost work, no executed code."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import medad
from medad.io.checks import DataCheckError, check_items
from medad.io.data import bmad_datalist
from medad.engine.resume import RunSettings
from medad.io.transforms import mvfa_preprocessing

from synthetic import write_dataset
from helpers import bundle_command, common, run_bundle


def png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture()
def good_image(tmp_path) -> Path:
    return png(tmp_path / "good.png", (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))


def test_every_problem_is_reported_at_once(tmp_path, good_image):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good_image.read_bytes()[:60])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    small_mask = png(tmp_path / "small_mask.png", np.zeros((16, 16), np.uint8))
    gray_mask = png(tmp_path / "gray_mask.png", np.full((32, 32), 128, np.uint8))
    nan_image = tmp_path / "nan.tif"
    Image.fromarray(np.full((32, 32), np.nan, np.float32), "F").save(nan_image)
    five = tmp_path / "five_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 5), np.float32), np.eye(4)), five)
    items = [
        {"image": str(good_image), "label": 0},
        {"image": str(truncated), "label": 0},
        {"image": str(empty), "label": 0},
        {"image": str(tmp_path / "missing.png"), "label": 0},
        {"image": str(good_image), "mask": str(small_mask), "label": 1, "has_mask": True},
        {"image": str(good_image), "mask": str(gray_mask), "label": 1, "has_mask": True},
        {"image": str(good_image), "label": 1, "has_mask": True},
        {"image": str(nan_image), "label": 0},
        {"image": str(five), "label": 0},
    ]
    with pytest.raises(DataCheckError) as raised:
        check_items(items, report_dir=tmp_path / "report")
    message = str(raised.value)
    expected = {
        "truncated.png": "unreadable image",
        "empty.png": "empty file",
        "missing.png": "file not found",
        "small_mask.png": "differs from its image",
        "gray_mask.png": "not binary-like",
        "nan.tif": "non-finite",
        "five_channels.nii.gz": "a volume (NIfTI or DICOM): training and evaluation take 2D images",
    }
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in message.splitlines()), (name, message)
    assert message.splitlines()[-1].startswith("7 problem(s) in 7 of 9 items, listed above: fix them, or set on_bad_data")
    assert (tmp_path / "report" / "data_problems.csv").read_text().count("\n") == 1 + 7
    # An abnormal image without a mask is no problem: it counts for image-level metrics only.
    assert not any("good.png" in line for line in message.splitlines())


def test_skip_leaves_bad_items_out_and_writes_the_report(tmp_path, good_image):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    kept = check_items(
        [{"image": str(good_image), "label": 0}, {"image": str(bad), "label": 0}], on_error="skip", report_dir=tmp_path
    )
    assert [item["image"] for item in kept] == [str(good_image)]
    assert "bad.png" in (tmp_path / "data_problems.csv").read_text()


def test_empty_lists_and_unknown_data_sets_are_named(tmp_path):
    with pytest.raises(DataCheckError, match="empty"):
        check_items([])
    write_dataset(tmp_path, "Alpha", masks=True, seed=0, size=16, counts={"test": (1, 1)})
    with pytest.raises(FileNotFoundError, match=r"'Beta' not found.*\['Alpha'\]"):
        bmad_datalist(tmp_path, "Beta")


def test_palette_and_16_bit_images_are_read_as_intensities(tmp_path):
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    palette = Image.fromarray(values).convert("P")
    palette.save(tmp_path / "palette.png")
    sixteen = png(tmp_path / "sixteen.png", values.astype(np.uint16) * 200)
    preprocess = mvfa_preprocessing(8, mask_key=None)
    from_palette = preprocess({"image": str(tmp_path / "palette.png")})["image"]
    torch.testing.assert_close(from_palette[0], torch.as_tensor(values / 255.0, dtype=torch.float32), atol=2e-2, rtol=0)
    from_sixteen = preprocess({"image": str(sixteen)})["image"]
    assert float(from_sixteen.min()) == 0.0 and float(from_sixteen.max()) == 1.0
    assert from_sixteen.shape == (3, 8, 8) and torch.equal(from_sixteen[0], from_sixteen[2])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_give_a_clear_report_or_a_valid_image(tmp_path, data):
    buffer = io.BytesIO()
    Image.fromarray((np.arange(256, dtype=np.uint8).reshape(16, 16))).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "corrupted.png"
    path.write_bytes(bytes(raw))
    try:
        kept = check_items([{"image": str(path), "label": 0}])
    except DataCheckError as error:
        assert "corrupted.png" in str(error)
    else:
        assert kept and mvfa_preprocessing(16, mask_key=None)({"image": str(path)})["image"].shape == (3, 16, 16)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "executed"
    checkpoint = tmp_path / "model.pt"
    torch.save({"seg_adapters": _Payload(marker)}, checkpoint)
    with pytest.raises(ValueError, match="refused: it holds pickled Python objects other than tensors"):
        medad.model.checkpoint.read_checkpoint(checkpoint)
    with pytest.raises(medad.MissingWeightsError, match="Could not load CLIP weights"):
        medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=checkpoint)
    assert not marker.exists()


class _WriteFailed(Exception):
    pass


def _write_half_then_fail(_obj, target, *args, **kwargs) -> None:
    if isinstance(target, (str, os.PathLike)):
        Path(target).write_bytes(b"half a file")
    else:
        target.write(b"half a file")
    raise _WriteFailed


def test_a_failed_checkpoint_save_leaves_no_half_file(tmp_path, monkeypatch):
    from ignite.engine import Engine

    from medad.engine.resume import AtomicCheckpointSaver

    engine = Engine(lambda engine, batch: None)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(2, 2)}, save_final=True, final_filename="model.pt")
    saver.attach(engine)
    monkeypatch.setattr(torch, "save", _write_half_then_fail)
    # MONAI's exception handler then retries and removes the file the failed save never wrote.
    with pytest.raises((_WriteFailed, FileNotFoundError)):
        engine.run([0], max_epochs=1)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_map_write_keeps_the_previous_map(tmp_path, monkeypatch):
    from monai.data import MetaTensor, NibabelWriter
    from monai.transforms import SaveImage

    from medad.io.files import atomic_image_writer

    save_map = SaveImage(
        output_dir=tmp_path, output_postfix="anomaly_map", output_ext=".nii.gz", separate_folder=False,
        writer=atomic_image_writer(NibabelWriter), print_log=False,
    )
    anomaly_map = MetaTensor(torch.rand(1, 6, 6, 3), meta={"filename_or_obj": "case.nii.gz"})
    save_map(anomaly_map)
    monkeypatch.setattr(nib, "save", _write_half_then_fail)
    with pytest.raises(RuntimeError):  # MONAI's SaveImage wraps the writer's error
        save_map(anomaly_map * 2)
    monkeypatch.undo()
    assert [path.name for path in tmp_path.iterdir()] == ["case_anomaly_map.nii.gz"]
    assert np.allclose(nib.load(tmp_path / "case_anomaly_map.nii.gz").get_fdata(), anomaly_map[0].numpy())


def test_killed_training_resumes_to_the_same_adapters(synthetic_bmad, bundle_backbone, tmp_path):
    settings = common(synthetic_bmad, bundle_backbone)
    epochs = 6  # an epoch of this tiny run takes well under a second: room to kill it mid-run
    run_bundle("training", ("train",), tmp_path / "straight", epochs=epochs, **settings)

    interrupted = tmp_path / "interrupted"
    command = bundle_command("training", ("train",), interrupted, epochs=epochs, **settings)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # only the newest resume checkpoint is kept: from the first epoch's end on, one always exists
    saved = lambda: sorted((interrupted / "models").glob("resume_checkpoint_epoch=*.pt"))  # noqa: E731
    deadline = time.time() + 600
    while not saved() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert saved(), process.stderr.read() if process.poll() is not None else "no checkpoint in time"
    process.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up
    process.wait()
    assert not (interrupted / "models" / "model.pt").exists(), "the run ended before it could be killed"
    log = run_bundle("training", ("train",), interrupted, epochs=epochs, **settings)
    assert "Restored all variables" in log

    straight = torch.load(tmp_path / "straight" / "models" / "model.pt", weights_only=True)
    resumed = torch.load(interrupted / "models" / "model.pt", weights_only=True)
    adapters = [key for key in straight if "_adapters." in key]
    assert len(adapters) == 16  # seg and det adapters: fc1 and fc2 weights at each of the 4 levels
    for key in adapters:
        assert torch.equal(straight[key], resumed[key]), key


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_that_settings_value_of_then():
    # a resume checkpoint of an older medad records no `method`: it trained MVFA
    older = {"seed": 111, "image_size": 240, "levels": [6, 12, 18, 24]}
    now = {**older, "method": "mvfa", "memory_size": None}
    assert RunSettings(now).differences(older) == []
    assert RunSettings({**now, "method": "clip"}).differences(older) == ["method: 'mvfa' -> 'clip'"]
    assert RunSettings({**now, "memory_size": 64}).differences(older) == ["memory_size: None -> 64"]
