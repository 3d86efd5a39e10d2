"""The MONAI bundle end to end: `python -m monai.bundle run ...` on generated data, tiny CLIP.

The commands run inside the test's process (``helpers.run_bundle_here``: monai.bundle's
``__main__`` under runpy with the command's argv, whose imports are paid already); nothing here
depends on the process boundary, which test_run_safety.py pins for a real bundle process. The
shared few-shot model and its evaluation (conftest.py) are real ``python -m monai.bundle`` runs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

import medad

from helpers import (
    CONFIGS, IMAGE_SIZE, common, copy_bundle, run_bundle_here, run_bundle_logged_in_process, scores_csv_image_auroc,
    sklearn_set_metrics,
)

def as_config(settings: dict) -> dict:
    """CLI overrides as config values (the CLI parses strings, ConfigWorkflow takes objects)."""
    return {key: [1, 2, 3, 4] if key == "levels" else value for key, value in settings.items()}


def missing_properties(files: tuple[str, ...], kind: str, **overrides) -> list[str]:
    """MONAI's own check of the bundle properties a workflow type requires (it builds them)."""
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f"{name}.json") for name in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=kind,
        **{key: str(value) if isinstance(value, Path) else value for key, value in overrides.items()},
    )
    workflow.initialize()
    try:
        return workflow.check_properties()
    finally:
        workflow.finalize()  # gives the bundle's run lock back (MONAI's lifecycle: initialize, run, finalize)


def test_default_run_id_is_defined_everywhere():
    for name, named_id in (("train", "training"), ("evaluate", "evaluating"), ("inference", "inferring")):
        config = json.loads((CONFIGS / f"{name}.json").read_text())
        assert "run" in config and config[named_id] == "@run"


def test_zero_shot_then_few_shot_training_evaluation_and_inference(fewshot_evaluation, synthetic_bmad, bundle_backbone, tmp_path):
    settings = common(synthetic_bmad, bundle_backbone)
    zero = tmp_path / "zero"
    log = run_bundle_here("training", ("train",), zero, epochs=1, **settings)
    assert "Saved checkpoint at epoch: 1" in log
    assert (zero / "models" / "model.pt").is_file()
    assert (zero / "models" / "resume_checkpoint_epoch=1.pt").is_file()

    # Rerunning with other settings does not resume the old run: it stops and says how to start afresh.
    status, _, lines = run_bundle_logged_in_process("training", ("train",), zero, epochs=2, seed=7, **settings)
    stderr = "\n".join(lines)
    assert status == 1
    assert "cannot resume" in stderr and "seed: 111 -> 7" in stderr and "epochs" not in stderr
    assert lines[-1].startswith("To start afresh, delete"), stderr[-2000:]
    # Resuming with the same settings (and more epochs) continues from the saved iteration; the
    # settings hold resolved values: levels left to the default (all 4 blocks here) are [1,2,3,4].
    log = run_bundle_here("training", ("train",), zero, epochs=2, **{k: v for k, v in settings.items() if k != "levels"})
    assert "Restored all variables" in log
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log
    assert [p.name for p in (zero / "models").glob("resume_*.pt")] == ["resume_checkpoint_epoch=2.pt"]

    assert missing_properties(("train",), "train", bundle_root=zero, epochs=2, **as_config(settings)) == []
    assert missing_properties(("train", "evaluate"), "infer", bundle_root=zero, **as_config(settings)) == []
    run_bundle_here("evaluating", ("train", "evaluate"), zero, **settings)
    zero_metrics = json.loads((zero / "eval" / "metrics.json").read_text())
    assert set(zero_metrics) >= {"val_image_auroc", "val_pixel_auroc", "val_pixel_ap", "val_pixel_f1_max", "val_aupro"}
    # ... and equal sklearn's on the zero-shot model's own outputs (computed here) and on scores.csv.
    expected = sklearn_set_metrics(medad.load_detector(zero / "models" / "model.pt", bundle_backbone["clip_weights"]),
                                   synthetic_bmad, "Alpha")
    assert zero_metrics["val_image_auroc"] == pytest.approx(expected["image_auroc"], abs=1e-6)
    assert zero_metrics["val_image_auroc"] == pytest.approx(scores_csv_image_auroc(zero / "eval" / "scores.csv"), abs=1e-6)
    assert zero_metrics["val_pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-4)  # binned: 1e-4 of the range

    # The few-shot model: the session's shared one (conftest.py), trained and evaluated by the same
    # subprocess commands (train + fewshot, k = 2, one epoch; evaluate), in a copy of its bundle folder.
    few = copy_bundle(fewshot_evaluation, tmp_path / "few")
    assert missing_properties(("train", "fewshot"), "train", bundle_root=few, shot=2, epochs=1, **as_config(settings)) == []
    metrics = json.loads((few / "eval" / "metrics.json").read_text())
    assert (few / "eval" / "metrics.csv").is_file() and (few / "eval" / "scores.csv").is_file()

    # The metrics equal sklearn on the same scores, fused over the set as the paper does.
    detector = medad.build_detector(
        [], None, model_name=medad.TINY_MODEL_NAME, image_size=IMAGE_SIZE, pretrained=bundle_backbone["clip_weights"],
        levels=(1, 2, 3, 4), checkpoint=few / "models" / "model.pt",
    )
    assert detector.has_memory and detector.is_calibrated and detector.target == "Alpha"
    expected = sklearn_set_metrics(detector, synthetic_bmad, "Alpha")
    assert metrics["val_image_auroc"] == pytest.approx(expected["image_auroc"], abs=1e-6)
    assert metrics["val_image_auroc"] == pytest.approx(scores_csv_image_auroc(few / "eval" / "scores.csv"), abs=1e-6)
    assert metrics["val_pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-4)  # binned: 1e-4 of the range
    assert metrics["val_pixel_auroc"] >= 0.8, metrics

    # Inference on a folder: one map per image at the image's own size, and a scores table.
    samples = few / "samples"
    samples.mkdir()
    sources = sorted((synthetic_bmad / "Alpha_AD" / "test" / "Ungood" / "img").glob("*.png"))[:3]
    for source in sources:
        Image.open(source).resize((150, 130)).save(samples / source.name)
    inference = {k: v for k, v in settings.items() if k not in ("target", "dataset_dir", "eval_batch_size")}
    assert missing_properties(("inference",), "infer", bundle_root=few, **as_config(inference)) == []
    run_bundle_here("inferring", ("inference",), few, **inference)
    outputs = few / "outputs"
    maps = sorted(outputs.glob("*_anomaly_map.nii.gz"))
    assert [m.name for m in maps] == [f"{s.stem}_anomaly_map.nii.gz" for s in sources]
    assert nib.load(maps[0]).shape[:2] == (150, 130)  # (columns, rows), as MONAI's LoadImage reads the image
    rows = (outputs / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("image,score") and len(rows) == 1 + len(sources)


def test_tracking_with_mlflow(synthetic_bmad, bundle_backbone, tmp_path):
    pytest.importorskip("mlflow", reason="the test extra installs mlflow")
    settings = common(synthetic_bmad, bundle_backbone)
    run_bundle_here("training", ("train",), tmp_path, epochs=1, tracking="mlflow", **settings)
    # Evaluation and inference are tracked too (MONAI's patch needs the evaluator as a component).
    run_bundle_here("evaluating", ("train", "evaluate"), tmp_path, tracking="mlflow", **settings)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(images / "a.png")
    run_bundle_here("inferring", ("inference",), tmp_path, dataset_dir=images, tracking="mlflow",
               num_workers=0, clip_weights=bundle_backbone["clip_weights"])
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [
        ".medad-ledger", ".medad-output", "a_anomaly_map.nii.gz", "overlays", "run_manifest.json", "scores.csv"]
    import mlflow

    # MONAI points mlflow at eval/mlruns; mlflow 3 keeps the runs in a database beside it.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 3 and "metrics.train_loss" in runs.columns and "metrics.val_image_auroc" in runs.columns
    # The evaluation report and its figures, and the inference overlays, are the runs' artifacts.
    client = mlflow.MlflowClient()

    def artifacts(run_id: str, path: str | None = None) -> set[str]:
        found = set()
        for info in client.list_artifacts(run_id, path):
            found |= artifacts(run_id, info.path) if info.is_dir else {info.path}
        return found

    logged = set().union(*(artifacts(run_id) for run_id in runs["run_id"]))
    assert {"report/report.html", "report/figures/image_roc.png", "report/figures/pro.png"} <= logged, logged
    assert {"outputs/overlays/a_overlay.png", "outputs/scores.csv"} <= logged, logged


def test_paper_selection_is_an_overlay_and_its_name_alone_is_refused(synthetic_bmad, bundle_backbone, tmp_path):
    settings = common(synthetic_bmad, bundle_backbone)
    status, _, lines = run_bundle_logged_in_process(
        "training", ("train", "fewshot"), tmp_path / "refused", shot=2, epochs=1, model_selection="paper", **settings,
    )
    assert status == 1
    assert lines[-1] == (
        "medad: model_selection must be one of ['last'], got 'paper': the paper's selection needs "
        "configs/paper_selection.json merged after train.json (and fewshot.json)"
    )
    # The overlay appends the validator to train's handlers; model.pt is still written once, at completion.
    paper = json.loads((CONFIGS / "paper_selection.json").read_text())
    assert [h["_target_"] for h in paper["+train#handlers"]] == ["ValidationHandler"]
    root = tmp_path / "paper"
    log = run_bundle_here("training", ("train", "fewshot", "paper_selection"), root, shot=2, epochs=2, **settings)
    # The validator ran after each epoch, and model.pt is the best epoch by the authors' criterion.
    assert log.count("Key metric: val_selection_score best value") == 2, log[-3000:]
    assert "Epoch[2] Complete" in log and (root / "models" / "model.pt").is_file()
    assert "saved the selected model (model_selected.pt)" in log and not (root / "models" / "model_selected.pt").exists()
    saved = medad.load_detector(root / "models" / "model.pt", bundle_backbone["clip_weights"])
    assert saved.has_memory and saved.is_calibrated


def test_a_target_without_masks_gets_image_metrics_only_and_bf16_runs_on_the_cpu(synthetic_bmad, bundle_backbone, tmp_path):
    settings = {**common(synthetic_bmad, bundle_backbone), "target": "Gamma"}  # Gamma has no masks
    run_bundle_here("training", ("train", "fewshot"), tmp_path, shot=2, epochs=1, **settings)
    detector = medad.load_detector(tmp_path / "models" / "model.pt", bundle_backbone["clip_weights"])
    assert not detector.image_score_from_map  # MVFA's rule without masks: the fused detection score
    thresholds = detector.effective_thresholds()
    # no masks, and image scores that are not the map's maximum: the pixel label falls back on the rule's default
    assert thresholds.image_rule == "support_f1" and (thresholds.pixel, thresholds.pixel_rule) == (0.5, "calibrated_midpoint")
    metrics = {}
    for precision in ("fp32", "bf16"):
        run_bundle_here("evaluating", ("train", "fewshot", "evaluate"), tmp_path, shot=2, precision=precision,
                   output_dir=tmp_path / f"eval_{precision}", **settings)
        metrics[precision] = json.loads((tmp_path / f"eval_{precision}" / "metrics.json").read_text())
        # the image AUROC is sklearn's on the rows of scores.csv (the set-fused scores it is computed on)
        assert metrics[precision]["val_image_auroc"] == pytest.approx(
            scores_csv_image_auroc(tmp_path / f"eval_{precision}" / "scores.csv"), abs=1e-6)
        # no masks: undefined pixel metrics are written as JSON null (strict JSON, not NaN)
        assert all(metrics[precision][f"val_{name}"] is None for name in ("pixel_auroc", "pixel_ap", "aupro"))
    # bf16 is only emulated on this CPU; the numbers stay near fp32's on the tiny model.
    assert abs(metrics["bf16"]["val_image_auroc"] - metrics["fp32"]["val_image_auroc"]) <= 0.1
