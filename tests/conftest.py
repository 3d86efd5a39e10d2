"""Shared fixtures: the MVFA golden tensors and a detector built on their tiny CLIP."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

# The tests use a tiny CLIP: its operations are too small to split over threads, and on a shared
# 2-core machine extra threads mostly wait (measured 10x slower). Set before torch is imported;
# subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

import medad

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as synthetic.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # product tools: reproduction.py, demo_data.py


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    return load_file(DATA / "mvfa_tiny_golden.safetensors")


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return json.loads((DATA / "mvfa_tiny_config.json").read_text())


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict:
    """Paths of the fixture's CLIP (an open_clip safetensors checkpoint) and MVFA adapters
    (a released-format ``.pth``), both float32."""
    weights = load_file(DATA / "mvfa_tiny_weights.safetensors")
    folder = tmp_path_factory.mktemp("tiny_weights")
    clip_path = folder / "clip.safetensors"
    save_file({k.removeprefix("clip/"): v.float() for k, v in weights.items() if k.startswith("clip/")}, clip_path)
    adapters = {"seg_adapters": {}, "det_adapters": {}}
    for key, value in weights.items():
        if key.startswith("adapters/"):
            kind, name = key.removeprefix("adapters/").split(".", 1)
            adapters[kind][name] = value.float()
    adapter_path = folder / "adapters.pth"
    torch.save(adapters, adapter_path)
    return {"clip": clip_path, "adapters": adapter_path}


@pytest.fixture()
def tiny_detector(tiny_config, tiny_weights) -> medad.MVFADetector:
    """A detector with the golden fixture's CLIP and adapter weights."""
    return medad.build_detector(
        datasets=[tiny_config["object"]],
        target=tiny_config["object"],
        model_name=medad.TINY_MODEL_NAME,
        image_size=tiny_config["image_size"],
        pretrained=tiny_weights["clip"],
        levels=tiny_config["features"],
        checkpoint=tiny_weights["adapters"],
    )


@pytest.fixture(scope="session")
def tiny_clip_path(tiny_weights) -> Path:
    """The fixture's tiny CLIP as an open_clip checkpoint file."""
    return tiny_weights["clip"]


@pytest.fixture(scope="session")
def synthetic_bmad(tmp_path_factory) -> Path:
    """Three generated data sets in the BMAD layout (two with masks), 112 px."""
    from helpers import IMAGE_SIZE
    from synthetic import write_benchmark

    return write_benchmark(tmp_path_factory.mktemp("bmad"), size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def bundle_backbone(tiny_clip_path) -> dict:
    """Bundle overrides for the tiny fixture CLIP (real weights file, no random init)."""
    from helpers import IMAGE_SIZE

    return {"clip_model": medad.TINY_MODEL_NAME, "clip_weights": tiny_clip_path, "image_size": IMAGE_SIZE, "levels": "[1,2,3,4]"}


@pytest.fixture(scope="session")
def random_fewshot_model(tmp_path_factory) -> Path:
    """A few-shot ``model.pt`` on the seeded random tiny backbone at 112 px (the model records
    it: inference needs no backbone keys), with a memory bank and a calibration with labels."""
    from medad.model.checkpoint import save_model

    torch.manual_seed(0)
    detector = medad.build_detector(
        ["Brain"], "Brain", model_name=medad.TINY_MODEL_NAME, image_size=112, pretrained=None, random_init=True,
        levels=(1, 2, 3, 4),
    ).eval()
    with torch.no_grad():
        detector.build_memory(torch.rand(2, 3, 112, 112))
        detector.calibrate(torch.rand(6, 3, 112, 112), labels=torch.tensor([0, 0, 0, 1, 1, 1]))
    path = tmp_path_factory.mktemp("random_fewshot_model") / "model.pt"
    save_model(detector, path)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def fewshot_bundle(synthetic_bmad, bundle_backbone, tmp_path_factory):
    """One bundle folder with the tiny few-shot model of the bundle tests (target Alpha, k = 2,
    one epoch), trained once per session by ``monai.bundle run training`` inside the test process
    (``helpers.run_bundle_here``; real processes are tested in test_run_safety.py and
    test_model_zoo.py): ``models/model.pt``. Shared and read-only: a test that writes into a bundle root
    copies it (``helpers.copy_bundle``); the teardown checks that no test changed a file in it."""
    from helpers import common, run_bundle_here

    root = tmp_path_factory.mktemp("fewshot_bundle") / "bundle"
    run_bundle_here("training", ("train", "fewshot"), root, shot=2, epochs=1, **common(synthetic_bmad, bundle_backbone))
    before = _digest(root)
    yield root
    assert _digest(root) == before, "a test wrote into the shared fewshot_bundle: copy it with helpers.copy_bundle"


@pytest.fixture(scope="session")
def fewshot_evaluation(fewshot_bundle, synthetic_bmad, bundle_backbone, tmp_path_factory):
    """``fewshot_bundle`` evaluated once per session by ``monai.bundle run evaluating`` (in this process)
    with the training's settings (the paper's set fusion, a report gallery of
    ``helpers.REPORT_GALLERY_SIZE``): a copy of the
    bundle folder with ``eval/`` (metrics, scores.csv, report). Shared and read-only, as above."""
    from helpers import REPORT_GALLERY_SIZE, common, copy_bundle, run_bundle_here

    root = copy_bundle(fewshot_bundle, tmp_path_factory.mktemp("fewshot_evaluation") / "bundle")
    log = run_bundle_here("evaluating", ("train", "fewshot", "evaluate"), root, shot=2, report_gallery_size=REPORT_GALLERY_SIZE,
                     **common(synthetic_bmad, bundle_backbone))
    assert "evaluation report written to" in log
    before = _digest(root)
    yield root
    assert _digest(root) == before, "a test wrote into the shared fewshot_evaluation: copy it with helpers.copy_bundle"
