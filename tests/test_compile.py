"""``compile: true``: torch.compile of the frozen trunk, the adapted blocks and the scoring gives
eager execution's maps, scores and adapter gradients (on the CPU), through Python and the bundle;
any other value than true/false ends the run naming the key.

The bundle commands run inside the test's process (``helpers.run_bundle_here``): the bundle's
``compile: true`` detectors then meet the graphs that the Python test's detectors compiled for the
same architecture and shapes (parameters are graph inputs, so any weights pass their guards), and
inductor's in-process and on-disk caches, instead of three processes each compiling them afresh
with ~12 CPU-s of imports; nothing compared here depends on the process boundary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

import medad
from medad.engine.engines import adapter_parameter_groups
from medad.surfaces.workflow import error_summary

from helpers import CONFIGS, IMAGE_SIZE, common, run_bundle_here


def _detector() -> medad.MVFADetector:
    """The seeded random tiny backbone (same weights at every call), few-shot memory and calibration."""
    torch.manual_seed(0)
    detector = medad.build_detector(["Alpha"], "Alpha", medad.TINY_MODEL_NAME, IMAGE_SIZE, random_init=True, levels=(1, 2, 3, 4))
    support = torch.rand(6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    detector.build_memory(support[:3])
    detector.calibrate(support)
    return detector.eval()


def _adapter_gradients(detector: medad.MVFADetector, images: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients of MVFA's loss for the adapters after one step through ``trunk`` and ``adapt``,
    the trainer's path (``None`` for the last level's unused ``fc2``)."""
    detector.train()
    tokens = detector.encoder.adapt(detector.encoder.trunk(images))
    labels = masks.flatten(1).amax(1)
    losses = medad.AlignmentLoss()(tokens.seg, tokens.det, detector.text_features_for(), masks, labels)
    (losses.seg + losses.det).mean().backward()
    detector.eval()
    return [p.grad for group in adapter_parameter_groups(detector) for p in group["params"]]


def test_compiled_paths_match_eager_in_inference_and_training():
    eager, compiled = _detector(), _detector().compile_paths()
    generator = torch.Generator().manual_seed(2)
    for batch in (4, 3):  # a second batch size: the compiled graphs handle a new shape too
        images = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        with torch.no_grad():
            expected, got = eager.predict(images), compiled.predict(images)
        torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.score, expected.score, rtol=1e-4, atol=1e-5)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    masks = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    masks[1, :, 30:60, 40:70] = 1
    gradients = zip(_adapter_gradients(compiled, images, masks), _adapter_gradients(eager, images, masks), strict=True)
    compared = 0
    for got, expected in gradients:
        assert (got is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
            compared += 1
    assert compared == 14  # seg and det: fc1 at the 4 levels, fc2 at all but the last
    # a run property, not a model one: the saved state is the eager detector's
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_bundle_training_and_inference_with_compile_give_the_eager_scores(synthetic_bmad, bundle_backbone, tmp_path):
    root = tmp_path / "run"
    run_bundle_here("training", ("train", "fewshot"), root, shot=2, epochs=1, compile=True, **common(synthetic_bmad, bundle_backbone))
    images = synthetic_bmad / "Alpha_AD" / "test" / "Ungood" / "img"
    weights = {"clip_weights": bundle_backbone["clip_weights"], "num_workers": 0, "dataset_dir": images}
    run_bundle_here("inferring", ("inference",), root, output_dir=root / "eager", **weights)
    run_bundle_here("inferring", ("inference",), root, output_dir=root / "compiled", compile=True, **weights)

    def scores(folder: str) -> dict[str, float]:
        with open(root / folder / "scores.csv", newline="") as handle:
            return {row["image"]: float(row["score"]) for row in csv.DictReader(handle)}

    eager, compiled = scores("eager"), scores("compiled")
    # one row per image of the folder: Alpha's 8 abnormal test images (tests/synthetic.py)
    assert eager.keys() == compiled.keys() and sorted(Path(name).name for name in eager) == sorted(p.name for p in images.iterdir())
    assert len(eager) == 8
    for name, value in eager.items():
        assert compiled[name] == pytest.approx(value, abs=1e-5), name


def test_unknown_compile_value_ends_the_run_naming_the_key(synthetic_bmad, bundle_backbone, tmp_path):
    # In this process through MONAI's ConfigWorkflow (the same configs): a bundle command's last line
    # is error_summary's, as the refusals run in subprocesses by test_run_safety.py and test_bundle.py show.
    settings = {**common(synthetic_bmad, bundle_backbone), "levels": [1, 2, 3, 4]}
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f"{name}.json") for name in ("train", "fewshot")], meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train", bundle_root=str(tmp_path), shot=2, epochs=1, compile="yes",
        **{key: str(value) if isinstance(value, Path) else value for key, value in settings.items()},
    )
    with pytest.raises(Exception) as raised:
        workflow.initialize()
        workflow.run()
    workflow.finalize()
    summary, user_error = error_summary(raised.value)
    assert "compile must be one of [False, True], got 'yes'" in summary and "\n" not in summary and user_error, summary
