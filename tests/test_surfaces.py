"""One trained model, one meaning: the same model.pt gives the same score and decision through the
bundle's evaluation (calibrated fusion), its inference and Python; the thresholds it stores are
the ones every surface applies; the few-shot memory exists before model.pt is written whatever
the handler order; and ``amp`` trains on the CPU (bf16 autocast of the frozen blocks, float32
adapters and tokens)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.engines.utils import IterationEvents

import medad
from medad.engine.engines import MVFATrainer, adapter_parameter_groups
from medad.engine.handlers import FewShotMemoryHandler, ModelSaver

from helpers import copy_bundle, run_bundle


def _rows(path: Path, key=lambda image: Path(image).name) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {key(row["image"]): row for row in csv.DictReader(handle)}


def test_evaluation_inference_and_python_agree_on_a_few_shot_model(fewshot_bundle, synthetic_bmad, bundle_backbone, tmp_path):
    root = copy_bundle(fewshot_bundle, tmp_path / "few")  # the shared few-shot model (k = 2, one epoch; conftest.py)
    # No architecture key: evaluation and inference take clip_model, image_size and levels from model.pt.
    weights = {"clip_weights": bundle_backbone["clip_weights"], "num_workers": 0}
    run_bundle("evaluating", ("train", "fewshot", "evaluate"), root, dataset_dir=synthetic_bmad, target="Alpha",
               shot=2, fusion="calibrated", **weights)
    evaluated = _rows(root / "eval" / "scores.csv", key=str)  # good/ and Ungood/ share file names
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["fusion"] == "calibrated"
    detector = medad.load_detector(root / "models" / "model.pt", bundle_backbone["clip_weights"])
    thresholds = detector.effective_thresholds()
    assert metrics["thresholds"] == {
        "image": thresholds.image, "pixel": thresholds.pixel, "image_rule": "support_f1", "pixel_rule": "support_pixel_f1",
    }
    assert {row["threshold_rule"] for row in evaluated.values()} == {"support_f1"}
    assert not any("score_set_fused" in row for row in evaluated.values())  # calibrated: one score only

    images = tmp_path / "images"
    images.mkdir()
    chosen = sorted((synthetic_bmad / "Alpha_AD" / "test" / "Ungood" / "img").glob("*.png"))[:2]
    chosen += sorted((synthetic_bmad / "Alpha_AD" / "test" / "good" / "img").glob("*.png"))[:2]
    for index, path in enumerate(chosen):
        shutil.copy(path, images / f"{index}_{path.name}")
    run_bundle("inferring", ("inference",), root, dataset_dir=images, **weights)
    inferred = _rows(root / "outputs" / "scores.csv")
    for index, path in enumerate(chosen):
        name = f"{index}_{path.name}"
        evaluated_row = evaluated[str(path)]
        prediction = medad.predict_input(detector, images / name)
        for score in (float(inferred[name]["score"]), prediction.score):
            assert score == pytest.approx(float(evaluated_row["score"]), abs=1e-5), name
        assert int(inferred[name]["anomalous"]) == int(evaluated_row["anomalous"]) == int(prediction.anomalous), name


def _support_items(size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for label in (1, 1, 0, 0):
        mask = torch.zeros(1, size, size)
        if label:
            mask[:, 8:20, 8:20] = 1
        items.append({"image": torch.rand(3, size, size, generator=generator), "mask": mask, "label": label,
                      "dataset": "Alpha", "has_mask": True, "index": len(items)})
    return items


def _trainer(detector: medad.MVFADetector, items: list[dict], handlers: list, epochs: int = 1, **kwargs) -> MVFATrainer:
    batch = {key: torch.stack([torch.as_tensor(item[key]) for item in items]) if key != "dataset" else
             [item[key] for item in items] for key in ("image", "mask", "label", "dataset", "has_mask", "index")}
    optimizer = torch.optim.Adam(adapter_parameter_groups(detector), lr=1e-3)
    return MVFATrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=[batch], network=detector,
                       optimizer=optimizer, loss_function=medad.AlignmentLoss(), train_handlers=handlers, **kwargs)


def _fresh_detector(tiny_config, tiny_weights) -> medad.MVFADetector:
    return medad.build_detector(["Alpha"], "Alpha", model_name=medad.TINY_MODEL_NAME, image_size=tiny_config["image_size"],
                                pretrained=tiny_weights["clip"], levels=tiny_config["features"])


def test_the_memory_is_built_before_model_pt_is_saved_whatever_the_handler_order(tiny_config, tiny_weights, tmp_path):
    items = _support_items(tiny_config["image_size"])
    # The memory handler as a trainer argument: attached first, before a saver listed before it.
    detector = _fresh_detector(tiny_config, tiny_weights)
    saver = ModelSaver(tmp_path / "a" / "model.pt")
    _trainer(detector, items, [saver], fewshot_memory=FewShotMemoryHandler(items, batch_size=4)).run()
    saved = medad.load_detector(tmp_path / "a" / "model.pt", tiny_weights["clip"])
    assert saved.has_memory and saved.is_calibrated and saved.effective_thresholds().image_rule == "support_f1"
    # The same handler in the list after the saver comes too late: what the trainer argument prevents.
    detector = _fresh_detector(tiny_config, tiny_weights)
    saver = ModelSaver(tmp_path / "b" / "model.pt")
    _trainer(detector, items, [saver, FewShotMemoryHandler(items, batch_size=4)]).run()
    assert not medad.load_detector(tmp_path / "b" / "model.pt", tiny_weights["clip"]).has_memory


def test_amp_trains_under_bf16_autocast_on_the_cpu(tiny_config, tiny_weights):
    items = _support_items(tiny_config["image_size"])
    detector = _fresh_detector(tiny_config, tiny_weights)
    before = {name: value.clone() for name, value in detector.encoder.det_adapters.state_dict().items()}
    trainer = _trainer(detector, items, [], amp=True)
    seen, losses, block_outputs = [], [], []
    last_block = detector.encoder.tower.blocks[detector.encoder.levels[-1] - 1]
    linear = next(module for module in last_block.modules() if isinstance(module, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, output: block_outputs.append(output.dtype))
    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED,
                              lambda e: seen.extend(t.dtype for t in (*e.state.output["pred"].seg, *e.state.output["pred"].det)))
    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run()
    assert trainer.scaler is None or not trainer.scaler.is_enabled()  # CUDA only: fp16 needs the scaler, bf16 not
    assert len(losses) == 1 and torch.isfinite(losses[0])
    after = detector.encoder.det_adapters.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    # amp lowers the frozen blocks' matrix products alone: adapters and tokens stay float32 islands
    assert block_outputs == [torch.bfloat16]
    assert set(seen) == {torch.float32}


def test_the_trunk_cache_trains_the_same_adapters_as_no_cache(tiny_config, tiny_weights):
    items = _support_items(tiny_config["image_size"])
    trained = []
    for cache_trunk in (False, True):
        torch.manual_seed(0)  # the same initial adapters
        detector = _fresh_detector(tiny_config, tiny_weights)
        initial = {name: value.clone() for name, value in detector.encoder.det_adapters.state_dict().items()}
        _trainer(detector, items, [], epochs=3, cache_trunk=cache_trunk).run()  # the cache serves epochs 2 and 3
        trained.append(detector.encoder.adapter_state())
        assert any(not torch.equal(initial[name], value) for name, value in trained[-1]["det_adapters"].items())
    for kind in ("seg_adapters", "det_adapters"):
        for name, value in trained[0][kind].items():
            torch.testing.assert_close(trained[1][kind][name], value, rtol=0, atol=1e-6, msg=f"{kind}.{name}")
