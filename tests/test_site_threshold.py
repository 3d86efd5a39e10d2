"""One decision users can act on: support and calibration images never evaluated in any layout,
site thresholds chosen with a stated guarantee and stored in model.pt, and the same score, decision
and p-value from evaluation, inference and Python.

The statistical checks compare :mod:`medad.model.decision` with independent oracles: brute-force
counting over the definition, and the exact distribution of conformal ranks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare

import medad
from medad.io.data import fewshot_selection, fitted_records, leave_out_fitted, shares_pool, target_datalist
from medad.model.decision import conformal_p_values, conformal_threshold, decision_rates, sensitivity_threshold

from helpers import IMAGE_SIZE, common, run_bundle_here
from synthetic import write_dataset


# ----------------------------------------------------------------- the rules, against oracles


def test_conformal_p_values_are_uniform_on_exchangeable_normals_and_not_on_shifted_ones():
    rng = np.random.default_rng(0)
    n, trials = 19, 4000  # p takes the values k / 20, k = 1..20, each with probability 1 / 20
    calibration = rng.gamma(2.0, size=(trials, n))
    same = rng.gamma(2.0, size=trials)
    ranks = np.array([round(conformal_p_values([s], c)[0] * (n + 1)) for s, c in zip(same, calibration)])
    assert chisquare(np.bincount(ranks, minlength=n + 2)[1:]).pvalue > 1e-3
    shifted = rng.gamma(2.0, size=trials) + 0.5  # not exchangeable: the test must see it
    ranks = np.array([round(conformal_p_values([s], c)[0] * (n + 1)) for s, c in zip(shifted, calibration)])
    assert chisquare(np.bincount(ranks, minlength=n + 2)[1:]).pvalue < 1e-6


def test_the_conformal_threshold_flags_exactly_the_p_values_at_most_alpha_and_holds_its_fpr():
    rng = np.random.default_rng(1)
    alpha, rates = 0.1, []
    for _ in range(300):
        calibration = rng.normal(size=49)
        threshold = conformal_threshold(calibration, alpha)
        held_out = rng.normal(size=200)
        brute_p = np.array([(1 + np.sum(calibration >= s)) / 50 for s in held_out])  # the definition, counted
        assert np.array_equal(held_out >= threshold, brute_p <= alpha)
        rates.append(np.mean(held_out >= threshold))
    # E[FPR] = floor(alpha (n + 1)) / (n + 1) = 5 / 50 exactly; 300 x 200 draws: standard error ~0.003
    assert np.mean(rates) <= alpha + 0.01
    assert np.mean(rates) > alpha - 0.02  # and not trivially conservative


def test_a_conformal_threshold_needs_enough_normals_and_says_how_many():
    with pytest.raises(ValueError, match="needs at least 19 normal calibration images, got 10"):
        conformal_threshold(np.arange(10.0), 0.05)


def test_sensitivity_threshold_and_rates_match_counting():
    rng = np.random.default_rng(2)
    abnormal, normal = rng.normal(1, 1, size=37), rng.normal(0, 1, size=51)
    threshold = sensitivity_threshold(abnormal, 0.8)
    assert np.mean(abnormal >= threshold) >= 0.8
    assert np.mean(abnormal >= np.nextafter(threshold, np.inf)) < 0.8  # the highest such threshold
    scores, labels = np.r_[abnormal, normal], np.r_[np.ones(37, int), np.zeros(51, int)]
    rates = decision_rates(scores, labels, threshold)
    assert rates["sensitivity"] == np.sum(abnormal >= threshold) / 37
    assert rates["specificity"] == np.sum(normal < threshold) / 51
    low, high = rates["specificity_ci"]
    assert low < rates["specificity"] < high


# ----------------------------------------------------------------- leak-free in every layout


def _flat(root: Path, seed: int, counts: tuple[int, int] = (16, 8)) -> Path:
    """The ``normal/``, ``abnormal/``, ``masks/`` layout without split folders (one pool)."""
    write_dataset(root / "gen", "Alpha", masks=True, seed=seed, size=IMAGE_SIZE, counts={"test": counts})
    source = root / "gen" / "Alpha_AD" / "test"
    flat = root / "own"
    shutil.copytree(source / "good" / "img", flat / "normal")
    shutil.copytree(source / "Ungood" / "img", flat / "abnormal")
    shutil.copytree(source / "Ungood" / "anomaly_mask", flat / "masks")
    shutil.rmtree(root / "gen")
    return flat


def _layouts(root: Path) -> dict[str, Path]:
    bmad = root / "bmad"
    write_dataset(bmad, "Alpha", masks=True, seed=3, size=32)
    split = root / "split"
    for name in ("valid", "test"):
        for cls, folder in (("good", "normal"), ("Ungood", "abnormal")):
            shutil.copytree(bmad / "Alpha_AD" / name / cls / "img", split / name / folder)
    datalist = root / "datalist.json"
    entries = {key: [{"image": str(p), "label": int(p.parent.name == "abnormal")} for p in sorted((split / name).rglob("*.png"))]
               for key, name in (("training", "valid"), ("test", "test"))}
    datalist.write_text(json.dumps(entries))
    return {"bmad": bmad, "split folders": split, "datalist": datalist, "one pool": _flat(root / "flat", seed=4)}


def test_no_support_image_is_evaluated_in_any_layout(tmp_path):
    for layout, folder in _layouts(tmp_path).items():
        support = fewshot_selection(folder, "Alpha", 2, seed=5)
        evaluated, left_out = leave_out_fitted(target_datalist(folder, "Alpha", "test"), fitted_records(support, "support", folder))
        support_bytes = {Path(item["image"]).read_bytes() for item in support}
        assert not [item for item in evaluated if Path(item["image"]).read_bytes() in support_bytes], layout
        # only the one-pool layout draws support from the evaluated images: there, all 4 are left out
        assert len(left_out) == (4 if shares_pool(folder, "Alpha") else 0), layout
        assert shares_pool(folder, "Alpha") == (layout == "one pool")


def test_a_renamed_copy_of_a_support_image_is_still_left_out(tmp_path):
    flat = _flat(tmp_path, seed=6)
    support = fewshot_selection(flat, "Alpha", 1, seed=0)
    normal = next(item for item in support if item["label"] == 0)
    shutil.copy(normal["image"], flat / "normal" / "zz_copy.png")
    _, left_out = leave_out_fitted(target_datalist(flat, "Alpha", "test"), fitted_records(support, "support", flat))
    assert {Path(item["image"]).name for item in left_out} == {Path(item["image"]).name for item in support} | {"zz_copy.png"}


# ----------------------------------------------------------------- the whole sequence through the bundle


def _rows(path: Path) -> dict[str, dict[str, str]]:
    """Rows by ``<folder>/<file>``: normal/ and abnormal/ share file names."""
    with open(path, newline="") as handle:
        return {"/".join(Path(row["image"]).parts[-2:]): row for row in csv.DictReader(handle)}


def test_own_data_train_threshold_evaluate_infer_one_decision_everywhere(bundle_backbone, tmp_path):
    flat = _flat(tmp_path, seed=7)
    Image.new("L", (IMAGE_SIZE, IMAGE_SIZE)).save(flat / "normal" / "blank.png")  # background only: the blank rule
    root = tmp_path / "bundle"
    settings = common(flat, bundle_backbone)
    run_bundle_here("training", ("train", "fewshot"), root, shot=2, epochs=1, **settings)
    weights = {"clip_weights": bundle_backbone["clip_weights"], "num_workers": 0}
    # calibration_seed 1 leaves the blank image to evaluation (seed 0 draws it for calibration)
    log = run_bundle_here("thresholding", ("inference", "threshold"), root, dataset_dir=flat, target_fpr=0.25, calibration_seed=1, **weights)
    assert "site threshold" in log

    detector = medad.load_detector(root / "models" / "model.pt", bundle_backbone["clip_weights"])
    thresholds = detector.effective_thresholds()
    assert thresholds.image_rule == "conformal_fpr" and thresholds.provenance["target"] == 0.25
    assert len(thresholds.reference_scores) == thresholds.provenance["normal"] == 8  # half of the 15 non-support normals
    roles = [record["role"] for record in detector.fitted]
    assert roles.count("support") == 4 and roles.count("calibration") == 8 + 3
    assert len(medad.model.checkpoint.model_versions(root / "models" / "model.pt")) == 1  # the few-shot model is kept

    run_bundle_here("evaluating", ("train", "fewshot", "evaluate"), root, dataset_dir=flat, target="Alpha", shot=2, **weights)
    evaluated = _rows(root / "eval" / "scores.csv")
    fitted = {record["name"] for record in detector.fitted}
    assert len(evaluated) == 25 - len(fitted) and not fitted & set(evaluated)
    metrics = json.loads((root / "eval" / "metrics.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}: not JSON"))
    assert metrics["decision"]["rule"] == "conformal_fpr" and metrics["thresholds"]["image"] == thresholds.image
    labels = np.array([int(row["label"]) for row in evaluated.values()])
    flagged = np.array([int(row["anomalous"]) for row in evaluated.values()])
    assert metrics["decision"]["specificity"] == pytest.approx(np.mean(flagged[labels == 0] == 0))
    assert {row["threshold_rule"] for row in evaluated.values()} == {"conformal_fpr"}
    assert all("score_set_fused" in row for row in evaluated.values())  # the paper's fusion, its own column

    images = tmp_path / "images"
    images.mkdir()
    names = sorted(evaluated)[:2] + sorted(evaluated)[-2:]
    names.append("normal/blank.png")  # scored 0 by evaluation and inference alike
    for name in names:
        shutil.copy(flat / name, images / name.replace("/", "_"))
    run_bundle_here("inferring", ("inference",), root, dataset_dir=images, **weights)
    inferred = {Path(row["image"]).name: row for row in _rows(root / "outputs" / "scores.csv").values()}
    for name in names:
        prediction = medad.predict_input(detector, images / name.replace("/", "_"))
        for row in (inferred[name.replace("/", "_")], evaluated[name]):
            assert float(row["score"]) == pytest.approx(prediction.score, abs=1e-5), name
            assert int(row["anomalous"]) == int(prediction.anomalous), name
            assert float(row["p_value"]) == pytest.approx(prediction.p_value), name
            assert float(row["threshold"]) == thresholds.image and row["threshold_rule"] == "conformal_fpr"
    assert float(evaluated["normal/blank.png"]["score"]) == float(inferred["normal_blank.png"]["score"]) == 0.0


def test_a_decathlon_datalist_with_mask_paths_as_labels_is_refused_with_the_fix(tmp_path):
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [], "test": [{"image": "imagesTs/a.png", "label": "labelsTs/a.png"}]}))
    with pytest.raises(ValueError, match=r"test\[0\]: 'label' is a mask path.*\"mask\": \"labelsTs/a.png\", \"label\": 1"):
        target_datalist(datalist, "Alpha", "test")


def test_metrics_json_is_strict_json_with_null_for_undefined_metrics(random_fewshot_model, tmp_path):
    from types import SimpleNamespace

    from medad.engine.handlers import MetricsJSONWriter

    detector = medad.load_detector(random_fewshot_model)
    engine = SimpleNamespace(network=detector, state=SimpleNamespace(metrics={"val_image_auroc": 0.75, "val_pixel_auroc": float("nan")}))
    MetricsJSONWriter(tmp_path, fusion="set")(engine)  # a data set without masks: no pixel metrics
    text = (tmp_path / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}: not JSON"))
    assert metrics["val_pixel_auroc"] is None and metrics["val_image_auroc"] == 0.75
    assert metrics["thresholds"]["image_rule"] == "support_f1"
