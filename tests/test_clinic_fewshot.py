"""Few-shot the way clinics have data: normal-only adaptation of a zero-shot model, and abnormal
support images without masks (they train the detection adapters only).

The bundle commands run inside the test's process (``helpers.run_bundle_here``): nothing here
depends on the process boundary, and each ``python -m monai.bundle`` process costs ~12 CPU-s of imports."""

from __future__ import annotations

import csv
import shutil
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import medad

from helpers import IMAGE_SIZE, REPORT_GALLERY_SIZE, common, copy_bundle, run_bundle_here
from synthetic import write_dataset


@pytest.fixture(scope="module")
def clinic_bmad(tmp_path_factory) -> Path:
    """Target Alpha with more normal than abnormal support candidates; sources Beta and Gamma."""
    root = tmp_path_factory.mktemp("clinic")
    write_dataset(root, "Alpha", masks=True, seed=0, size=IMAGE_SIZE, counts={"valid": (8, 2), "test": (12, 8)})
    write_dataset(root, "Beta", masks=True, seed=1, size=IMAGE_SIZE)
    write_dataset(root, "Gamma", masks=False, seed=2, size=IMAGE_SIZE)
    return root


def _false_positive_rate(scores_csv: Path) -> float:
    with open(scores_csv, newline="") as handle:
        normal = [row for row in csv.DictReader(handle) if row["label"] == "0"]
    return sum(int(row["anomalous"]) for row in normal) / len(normal)


def test_normal_only_adaptation_of_a_zero_shot_model(clinic_bmad, bundle_backbone, tmp_path):
    settings = common(clinic_bmad, bundle_backbone)
    zero = tmp_path / "zero"
    run_bundle_here("training", ("train",), zero, epochs=1, **settings)
    run_bundle_here("evaluating", ("train", "evaluate"), zero, **settings)
    zero_metrics = json.loads((zero / "eval" / "metrics.json").read_text())

    normal = tmp_path / "normal_only"
    log = run_bundle_here("training", ("train", "fewshot"), normal, shot=8, abnormal_shots=0,
                     init_checkpoint=zero / "models" / "model.pt", **settings)
    assert "normal-only adaptation to 8 normal images" in log and "Epoch[1]" not in log  # no adapter training
    adapted = medad.load_detector(normal / "models" / "model.pt", bundle_backbone["clip_weights"])
    initial = medad.load_detector(zero / "models" / "model.pt", bundle_backbone["clip_weights"])
    for name, value in initial.encoder.state_dict().items():
        assert torch.equal(adapted.encoder.state_dict()[name], value), name
    assert adapted.has_memory and adapted.memory_seg.shape[1] == 8 * 11 * (1 + (IMAGE_SIZE // 14) ** 2)
    thresholds = adapted.effective_thresholds()
    assert thresholds.image_rule == thresholds.pixel_rule == "normal_heldout_max"

    run_bundle_here("evaluating", ("train", "fewshot", "evaluate"), normal, shot=8, **settings)
    metrics = json.loads((normal / "eval" / "metrics.json").read_text())
    assert metrics["val_pixel_auroc"] >= zero_metrics["val_pixel_auroc"] + 0.03, (metrics, zero_metrics)
    # The held-out rule's target: a new normal image exceeds the highest of k held-out scores
    # with probability 1 / (k + 1) = 1/9 here (README, "Your own data"). Decisions are made on
    # single images, with the stored calibration.
    run_bundle_here("evaluating", ("train", "fewshot", "evaluate"), normal, shot=8, fusion="calibrated",
               output_dir=normal / "eval_calibrated", **settings)
    assert _false_positive_rate(normal / "eval_calibrated" / "scores.csv") <= 1 / 9 + 1 / 12  # one image of slack


def _adapters(root: Path, weights: Path) -> dict:
    return medad.load_detector(root / "models" / "model.pt", weights).encoder.adapter_state()


def _changed(before: dict, after: dict) -> dict[str, bool]:
    return {kind: any(not torch.equal(before[kind][k], after[kind][k]) for k in before[kind]) for kind in before}


def test_abnormal_shots_without_masks_train_the_detection_adapters_only(clinic_bmad, bundle_backbone, tmp_path):
    settings = common(clinic_bmad, bundle_backbone)
    weights = bundle_backbone["clip_weights"]
    zero = tmp_path / "zero"
    run_bundle_here("training", ("train",), zero, epochs=1, **{**settings, "target": "Gamma"})
    # Gamma's abnormal images have no masks: from the zero-shot model, k abnormal + k normal
    # support images change the det adapters and leave the seg adapters as they were.
    few = tmp_path / "few"
    run_bundle_here("training", ("train", "fewshot"), few, shot=2, epochs=1, init_checkpoint=zero / "models" / "model.pt",
               **{**settings, "target": "Gamma"})
    assert _changed(_adapters(zero, weights), _adapters(few, weights)) == {"seg_adapters": False, "det_adapters": True}

    # A data set with masks for some abnormal images only: training runs (it stopped at the
    # missing mask before), and the pixel threshold comes from the annotated support images.
    masks = sorted((clinic_bmad / "Alpha_AD" / "valid" / "Ungood" / "anomaly_mask").iterdir())
    masks[0].rename(masks[0].with_suffix(".hidden"))
    try:
        mixed = tmp_path / "mixed"
        run_bundle_here("training", ("train", "fewshot"), mixed, shot=2, epochs=1, **settings)
    finally:
        masks[0].with_suffix(".hidden").rename(masks[0])
    thresholds = medad.load_detector(mixed / "models" / "model.pt", weights).effective_thresholds()
    assert thresholds.image_rule == "support_f1" and thresholds.pixel_rule == "support_pixel_f1"


def _own_layouts(bmad: Path, name: str, root: Path) -> tuple[Path, Path]:
    """The same images as ``bmad/<name>_AD`` in the folder layout and in a MONAI datalist file."""
    folders, listed = root / "folders", root / "listed"
    entries = {"training": [], "test": []}
    for split, key in (("valid", "training"), ("test", "test")):
        for item in medad.io.data.bmad_datalist(bmad, name, split):
            kind = "abnormal" if item["label"] else "normal"
            image = Path(item["image"])
            for base in (folders / split / kind, listed / "images" / split / kind):
                base.mkdir(parents=True, exist_ok=True)
                shutil.copy(image, base / image.name)
            entry = {"image": f"images/{split}/{kind}/{image.name}", "label": item["label"]}
            if item.get("mask"):
                for base in (folders / split / "masks", listed / "masks" / split):
                    base.mkdir(parents=True, exist_ok=True)
                    shutil.copy(item["mask"], base / image.name)
                entry["mask"] = f"masks/{split}/{image.name}"
            entries[key].append(entry)
    (listed / "datalist.json").write_text(json.dumps(entries, indent=1))
    return folders, listed / "datalist.json"


def test_own_data_layouts_give_the_metrics_of_the_bmad_layout(fewshot_evaluation, synthetic_bmad, bundle_backbone, tmp_path):
    folders, datalist = _own_layouts(synthetic_bmad, "Alpha", tmp_path)
    for layout in (folders, datalist):
        assert medad.io.data.dataset_has_masks(layout, "Alpha")
        picks = medad.io.data.fewshot_selection(layout, "Alpha", 2, seed=3)
        reference = medad.io.data.fewshot_selection(synthetic_bmad, "Alpha", 2, seed=3)
        assert [Path(i["image"]).name for i in picks] == [Path(i["image"]).name for i in reference]
        assert [bool(i.get("mask")) for i in picks] == [bool(i.get("mask")) for i in reference]
    settings = common(synthetic_bmad, bundle_backbone)
    # The shared few-shot model (k = 2, one epoch) and its evaluation on the BMAD layout (conftest.py);
    # the other layouts are evaluated with the same command but for dataset_dir, in a copy of the bundle.
    root = copy_bundle(fewshot_evaluation, tmp_path / "model")
    metrics = {"bmad": json.loads((fewshot_evaluation / "eval" / "metrics.json").read_text())}
    for name, dataset_dir in (("folders", folders), ("datalist", datalist)):
        output = root / f"eval_{name}"
        run_bundle_here("evaluating", ("train", "fewshot", "evaluate"), root, shot=2, output_dir=output,
                   report_gallery_size=REPORT_GALLERY_SIZE, **{**settings, "dataset_dir": dataset_dir})
        metrics[name] = json.loads((output / "metrics.json").read_text())
    metrics = {name: {k: v for k, v in values.items() if k.startswith("val_")} for name, values in metrics.items()}
    assert {"val_image_auroc", "val_pixel_auroc", "val_pixel_ap", "val_aupro"} <= set(metrics["bmad"]), metrics
    assert metrics["folders"] == pytest.approx(metrics["bmad"], abs=1e-9)
    assert metrics["datalist"] == pytest.approx(metrics["bmad"], abs=1e-9)


def test_inconsistent_own_data_is_refused_naming_the_entry(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.png", "label": 2}, {"mask": "m.png", "label": 1}], "test": []}))
    with pytest.raises(ValueError) as raised:
        medad.io.data.target_datalist(datalist, "Mine", "valid")
    lines = str(raised.value).splitlines()
    assert lines[0] == f"{datalist}: training[0]: 'label' must be 0 (normal) or 1 (abnormal), got 2"
    assert lines[1].startswith(f"{datalist}: training[1]: no 'image' (a mask without an image)")
    folders = tmp_path / "folders"
    (folders / "test" / "normal").mkdir(parents=True)
    (folders / "test" / "masks").mkdir()
    Image.new("L", (8, 8)).save(folders / "test" / "normal" / "n.png")
    Image.new("L", (8, 8)).save(folders / "test" / "masks" / "lost.png")
    with pytest.raises(ValueError, match=r"masks without an abnormal image of the same name .*\['lost.png'\]"):
        medad.io.data.target_datalist(folders, "Mine", "test")
    (folders / "test" / "masks" / "lost.png").unlink()
    with pytest.raises(ValueError, match="the test split of 'Mine' has no abnormal images: evaluation needs both classes"):
        medad.io.data.target_datalist(folders, "Mine", "test")
    with pytest.raises(FileNotFoundError, match="no data set 'Mine' in any layout medad reads"):
        medad.io.data.target_datalist(tmp_path / "empty", "Mine", "test")
