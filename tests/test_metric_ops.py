"""Streaming metric accumulators against scikit-learn and a direct AUPRO reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import medad
from medad.model.metric_ops import BinnedScores, PROCurve, image_metrics

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sklearn_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "f1_max": np.nanmax(f1),  # skips the 0/0 points
    }


def binned_metrics(acc: BinnedScores) -> dict[str, float]:
    return {"auroc": acc.auroc(), "ap": acc.average_precision(), "f1_max": acc.f1_max()}


def assert_metrics_close(actual: dict[str, float], expected: dict[str, float], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=atol), key


def blob_maps(rng: np.random.Generator, count: int, size: int, lesions: tuple[int, int] = (0, 3)):
    """Smooth continuous anomaly maps in [0, 1] and boolean masks of round lesions scoring higher."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((count, size, size), dtype=bool)
    for mask in masks:
        for _ in range(rng.integers(*lesions, endpoint=True)):
            cy, cx = rng.uniform(0, size, 2)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(1.5, size / 6) ** 2
    noise = ndimage.gaussian_filter(rng.random((count, size, size)), sigma=(0, 2, 2))
    lift = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5)) * rng.uniform(0.05, 0.5, (count, 1, 1))
    scores = np.clip(0.4 * noise + 0.3 + lift + 0.02 * rng.standard_normal(masks.shape), 0, 1)
    return scores.astype(np.float32), masks


def state_sizes(acc) -> dict[str, int]:
    """Element count of every tensor an accumulator holds, nested accumulators included."""
    sizes = {}
    for name, value in vars(acc).items():
        if isinstance(value, torch.Tensor):
            sizes[name] = value.numel()
        elif isinstance(value, BinnedScores):
            sizes |= {f"{name}.{inner}": size for inner, size in state_sizes(value).items()}
        else:
            assert not isinstance(value, (list, dict, tuple)), f"{name}: no per-update containers"
    return sizes


# --- BinnedScores ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ties", "bin_centres"])
def test_binned_equals_sklearn_when_each_bin_holds_one_value(kind):
    rng = np.random.default_rng(0)
    if kind == "ties":  # 101 distinct values, far apart compared with the 2**20 bins
        scores, acc = rng.integers(0, 101, 50_000) / 100, BinnedScores(0.0, 1.0)
    else:  # the centre of one of 256 bins each
        scores, acc = (rng.integers(0, 256, 50_000) + 0.5) / 256, BinnedScores(0.0, 1.0, bins=256)
    labels = rng.random(scores.size) < 0.1 + 0.5 * scores
    acc.update(torch.from_numpy(scores), torch.from_numpy(labels))
    assert_metrics_close(binned_metrics(acc), sklearn_metrics(labels, scores), atol=1e-9)


def test_binned_close_to_sklearn_with_ties_and_continuous_scores():
    rng = np.random.default_rng(1)
    scores = rng.random(100_000)
    scores[::2] = np.round(scores[::2], 2)  # half the scores tie in big groups
    labels = rng.random(scores.size) < scores**2
    acc = BinnedScores(0.0, 1.0)
    acc.update(torch.from_numpy(scores).float(), torch.from_numpy(labels))
    assert_metrics_close(binned_metrics(acc), sklearn_metrics(labels, scores.astype(np.float32)), atol=1e-4)


def test_binned_close_to_sklearn_on_anomaly_maps():
    scores, masks = blob_maps(np.random.default_rng(2), count=1000, size=64)
    acc = BinnedScores(0.0, 1.0)
    for start in range(0, len(scores), 100):
        acc.update(torch.from_numpy(scores[start : start + 100]), torch.from_numpy(masks[start : start + 100]))
    expected = sklearn_metrics(masks.ravel(), scores.ravel())
    assert 0.6 < expected["auroc"] < 0.99, "a detector neither trivial nor perfect"
    assert_metrics_close(binned_metrics(acc), expected, atol=1e-4)


def test_scores_out_of_range_are_clamped_into_the_end_bins():
    acc = BinnedScores(0.0, 1.0, bins=4)
    acc.update(torch.tensor([-5.0, 0.1, 0.9, 7.0, float("inf")]), torch.tensor([0, 0, 1, 1, 0]))
    assert acc.negatives.tolist() == [2, 0, 0, 1]
    assert acc.positives.tolist() == [0, 0, 0, 2]


def test_merge_equals_one_accumulator_over_all_data():
    rng = np.random.default_rng(3)
    scores, labels = torch.from_numpy(rng.random(30_000)), torch.from_numpy(rng.random(30_000) < 0.3)
    whole, first, second = (BinnedScores(0.0, 1.0, bins=1024) for _ in range(3))
    whole.update(scores, labels)
    first.update(scores[:12_345], labels[:12_345])
    second.update(scores[12_345:], labels[12_345:])
    first.merge(second)
    assert torch.equal(first.counts, whole.counts)
    assert binned_metrics(first) == binned_metrics(whole)
    with pytest.raises(ValueError, match="merge"):
        first.merge(BinnedScores(0.0, 1.0, bins=512))


def test_many_small_updates_equal_one_big_update():
    rng = np.random.default_rng(4)
    scores, labels = torch.from_numpy(rng.random((400, 50))), torch.from_numpy(rng.random((400, 50)) < 0.2)
    streamed, once = BinnedScores(0.0, 1.0), BinnedScores(0.0, 1.0)
    for score_rows, label_rows in zip(scores.split(3), labels.split(3)):
        streamed.update(score_rows, label_rows)
    once.update(scores, labels)
    assert torch.equal(streamed.counts, once.counts)
    assert binned_metrics(streamed) == binned_metrics(once)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int64, torch.uint8])
def test_targets_may_be_bool_or_zero_one(dtype):
    scores = torch.tensor([[0.1, 0.4], [0.35, 0.8]])
    labels = torch.tensor([[0, 0], [1, 1]])
    acc = BinnedScores(0.0, 1.0)
    acc.update(scores, labels.to(dtype))
    assert acc.auroc() == pytest.approx(0.75)
    assert int(acc.positives.sum()) == 2 and int(acc.negatives.sum()) == 2


def test_single_class_and_bad_inputs_raise():
    only_negatives = BinnedScores(0.0, 1.0)
    only_negatives.update(torch.rand(100), torch.zeros(100))
    for metric in (only_negatives.auroc, only_negatives.average_precision, only_negatives.f1_max):
        with pytest.raises(ValueError, match="needs positive"):
            metric()
    only_positives = BinnedScores(0.0, 1.0)
    only_positives.update(torch.rand(100), torch.ones(100))
    for metric in (only_positives.auroc, only_positives.average_precision):
        with pytest.raises(ValueError, match="negative"):
            metric()
    assert only_positives.f1_max() == pytest.approx(1.0), "F1 needs no negatives"
    with pytest.raises(ValueError, match="negative"):
        only_positives.fpr_at_thresholds(torch.tensor([0.5]))

    acc = BinnedScores(0.0, 1.0)
    with pytest.raises(ValueError, match="differ in size"):
        acc.update(torch.rand(4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="binary"):
        acc.update(torch.rand(4), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.tensor([0.2, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="low < high"):
        BinnedScores(1.0, 1.0)


def test_fpr_at_thresholds_is_exact_at_bin_edges():
    rng = np.random.default_rng(5)
    scores, labels = rng.random(20_000), rng.random(20_000) < 0.3
    acc = BinnedScores(0.0, 1.0, bins=1024)
    acc.update(torch.from_numpy(scores), torch.from_numpy(labels))
    edges = acc.edges
    fpr = acc.fpr_at_thresholds(edges)
    expected = (scores[~labels][:, None] >= edges.numpy()[None, :]).mean(axis=0)
    np.testing.assert_allclose(fpr.numpy(), expected, rtol=0, atol=1e-12)
    assert fpr[0] == 1.0, "every negative is at or above the lowest edge"


def test_reset_forgets_updates():
    acc = BinnedScores(0.0, 1.0, bins=64)
    acc.update(torch.rand(100), torch.rand(100) < 0.5)
    acc.reset()
    assert int(acc.counts.sum()) == 0


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(-0.5, 1.5), st.booleans()), min_size=2, max_size=200).filter(
        lambda pairs: len({label for _, label in pairs}) == 2
    ),
    split=st.floats(0, 1),
)
def test_binned_metrics_are_sklearn_on_bin_indices_whatever_the_updates(data, split):
    scores = torch.tensor([score for score, _ in data], dtype=torch.float64)
    labels = torch.tensor([label for _, label in data])
    cut = int(split * len(data))
    acc, flipped = BinnedScores(0.0, 1.0, bins=16), BinnedScores(0.0, 1.0, bins=16)
    acc.update(scores[:cut], labels[:cut])
    acc.update(scores[cut:], labels[cut:])
    flipped.update(scores, ~labels)

    auroc = acc.auroc()
    assert 0.0 <= auroc <= 1.0
    assert flipped.auroc() == pytest.approx(1.0 - auroc, abs=1e-12)
    # Binning is the only approximation: on the bin indices themselves, the metrics are sklearn's.
    expected = sklearn_metrics(labels.numpy(), acc.bin_index(scores).numpy())
    assert_metrics_close(binned_metrics(acc), expected, atol=1e-12)


def test_binned_state_does_not_grow_with_updates():
    acc = BinnedScores(0.0, 1.0, bins=4096)
    acc.update(torch.rand(2, 16, 16), torch.rand(2, 16, 16) < 0.5)
    before = state_sizes(acc)
    for _ in range(50):
        acc.update(torch.rand(2, 16, 16), torch.rand(2, 16, 16) < 0.5)
    assert state_sizes(acc) == before == {"counts": 2 * 4096}


# --- PROCurve --------------------------------------------------------------------------------


def at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Fraction of ``values`` >= each threshold, by direct comparison (no sorting)."""
    blocks = np.array_split(thresholds, -(-len(thresholds) // 128))
    return np.concatenate([(values[:, None] >= block[None, :]).mean(axis=0) for block in blocks])


def reference_curve(scores: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) straight from the definitions at every given threshold, by ascending FPR."""
    structure = np.ones((3, 3), dtype=bool)
    overlaps = []
    for score_map, mask in zip(scores, masks):
        labels, count = ndimage.label(mask, structure=structure)
        overlaps += [at_or_above(score_map[labels == region], thresholds) for region in range(1, count + 1)]
    fpr, pro = at_or_above(scores[~masks], thresholds), np.mean(overlaps, axis=0)
    # The curve starts at (0, 0), nothing flagged, and ends at (1, 1), everything flagged.
    fpr, pro = np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]
    order = np.lexsort((pro, fpr))  # by FPR, then PRO along vertical steps
    return fpr[order], pro[order]


def reference_aupro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Trapezoids up to ``fpr_limit``, the curve linearly interpolated there, normalised."""
    n = np.searchsorted(fpr, fpr_limit, side="right")  # the points with FPR <= fpr_limit
    if n == len(fpr):
        end = pro[-1]
    else:  # between the last point within the limit and the next
        end = pro[n - 1] + (pro[n] - pro[n - 1]) * (fpr_limit - fpr[n - 1]) / (fpr[n] - fpr[n - 1])
    x, y = np.r_[fpr[:n], fpr_limit], np.r_[pro[:n], end]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2 / fpr_limit)


@pytest.fixture(scope="module")
def lesion_maps():
    return blob_maps(np.random.default_rng(6), count=24, size=48, lesions=(2, 4))


def test_aupro_matches_reference_on_a_dense_grid(lesion_maps):
    scores, masks = lesion_maps
    acc = PROCurve(0.0, 1.0)
    for start in range(0, len(scores), 5):
        acc.update(torch.from_numpy(scores[start : start + 5]), torch.from_numpy(masks[start : start + 5]))
    expected = reference_aupro(*reference_curve(scores, masks, np.linspace(0, 1, 3001)))
    assert 0.3 < expected < 0.95, "a detector neither trivial nor perfect"
    assert acc.aupro() == pytest.approx(expected, abs=1e-3)
    # At the accumulator's own thresholds, its curve is exact.
    fpr, pro = reference_curve(scores, masks, acc.pixels.edges.numpy())
    assert acc.aupro() == pytest.approx(reference_aupro(fpr, pro), abs=1e-9)
    assert acc.aupro(0.05) == pytest.approx(reference_aupro(fpr, pro, 0.05), abs=1e-9)


def test_aupro_merge_equals_one_accumulator(lesion_maps):
    scores, masks = (torch.from_numpy(values) for values in lesion_maps)
    whole, first, second = (PROCurve(0.0, 1.0, thresholds=256) for _ in range(3))
    whole.update(scores, masks)
    first.update(scores[:10], masks[:10])
    second.update(scores[10:], masks[10:])
    first.merge(second)
    assert int(first.regions) == int(whole.regions)
    assert first.aupro() == pytest.approx(whole.aupro(), abs=1e-12)


def test_perfect_and_constant_detectors():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 2:6, 2:6] = masks[0, 20:30, 10:25] = masks[2, 5:9, 12:13] = True
    perfect = PROCurve(0.0, 1.0)
    perfect.update(masks.float(), masks)
    assert perfect.aupro() == pytest.approx(1.0, abs=1e-12)

    # A constant score flags everything or nothing: its curve is the chance line from (0, 0) to
    # (1, 1), so AUPRO is fpr_limit / 2 after normalisation, not 0 (as in the MVTec reference).
    constant = PROCurve(0.0, 1.0)
    constant.update(torch.full(masks.shape, 0.5), masks)
    assert constant.aupro() == pytest.approx(0.15, abs=1e-12)
    assert constant.aupro(fpr_limit=0.1) == pytest.approx(0.05, abs=1e-12)


@pytest.mark.parametrize("detected", ["small", "big"])
def test_every_region_weighs_the_same(detected):
    small, big = (slice(0, 2), slice(0, 2)), (slice(15, 35), slice(15, 35))  # 4 and 400 pixels
    masks = torch.zeros(1, 1, 40, 40, dtype=torch.bool)  # (B, 1, H, W) masks are accepted
    masks[0, 0][small] = masks[0, 0][big] = True
    scores = torch.zeros(1, 40, 40)
    scores[0][small if detected == "small" else big] = 1.0
    acc = PROCurve(0.0, 1.0)
    acc.update(scores, masks)
    assert int(acc.regions) == 2
    # PRO is 1/2 for FPR 0 < t <= 1 whichever region is found (pixel weighting would give 4/404
    # or 400/404), then rises linearly to (1, 1): area (0.5 + 0.65) / 2 * 0.3, normalised by 0.3.
    assert acc.aupro() == pytest.approx(0.575, abs=1e-12)


def test_regions_are_8_connected_and_per_image():
    masks = torch.zeros(2, 8, 8)
    masks[:, 1, 1] = masks[:, 2, 2] = 1  # diagonal neighbours: one region in each image
    masks[1, 6, 6] = 1
    acc = PROCurve(0.0, 1.0, thresholds=16)
    acc.update(torch.rand(2, 8, 8), masks)
    assert int(acc.regions) == 3


def test_pro_errors_and_reset():
    acc = PROCurve(0.0, 1.0)
    acc.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="region"):
        acc.aupro()
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        acc.update(torch.rand(8, 8), torch.zeros(8, 8))
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:4, 2:4] = 1
    acc.update(torch.rand(2, 8, 8), masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        acc.aupro(0.0)
    acc.reset()
    assert int(acc.regions) == 0 and float(acc.region_weights.sum()) == 0 and int(acc.pixels.counts.sum()) == 0


def test_pro_state_does_not_grow_with_updates(lesion_maps):
    scores, masks = (torch.from_numpy(values) for values in lesion_maps)
    acc = PROCurve(0.0, 1.0, thresholds=512)
    acc.update(scores[:2], masks[:2])
    before = state_sizes(acc)
    for start in range(2, len(scores), 2):
        acc.update(scores[start : start + 2], masks[start : start + 2])
    assert state_sizes(acc) == before == {"pixels.counts": 2 * 512, "region_weights": 512, "regions": 1}


# --- image level and devices -----------------------------------------------------------------


def test_image_metrics_are_sklearns():
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.4
    scores = rng.random(300) + labels * 0.3
    scores[:50] = np.round(scores[:50], 1)
    expected = sklearn_metrics(labels, scores)
    for as_input in (np.asarray, torch.from_numpy, list):  # lists stay float64
        assert_metrics_close(image_metrics(as_input(scores), as_input(labels.astype(int))), expected, atol=1e-12)
    with pytest.raises(ValueError, match="normal and anomalous"):
        image_metrics(scores, np.zeros(300))
    with pytest.raises(ValueError, match="labels"):
        image_metrics(scores, labels[:-1])
    with pytest.raises(ValueError, match="binary"):
        image_metrics(scores, np.where(labels, 2, 0))


@CUDA
def test_cuda_accumulates_on_the_gpu_and_matches_the_cpu(lesion_maps):
    scores, masks = (torch.from_numpy(values) for values in lesion_maps)
    cpu, gpu = BinnedScores(0.0, 1.0), BinnedScores(0.0, 1.0)
    cpu_pro, gpu_pro = PROCurve(0.0, 1.0), PROCurve(0.0, 1.0)
    for start in range(0, len(scores), 8):
        batch, mask = scores[start : start + 8], masks[start : start + 8]
        cpu.update(batch, mask)
        gpu.update(batch.cuda(), mask.cuda())
        cpu_pro.update(batch, mask)
        gpu_pro.update(batch.cuda(), mask.cuda())
    assert gpu.counts.is_cuda and gpu_pro.region_weights.is_cuda, "device=None adopts the inputs' device"
    assert torch.equal(gpu.counts.cpu(), cpu.counts)
    assert binned_metrics(gpu) == pytest.approx(binned_metrics(cpu), abs=1e-12)
    assert gpu_pro.aupro() == pytest.approx(cpu_pro.aupro(), abs=1e-12)


def test_anomaly_evaluation_leaves_no_score_file_behind(tmp_path):
    """The spilled maps live in anonymous files: none is left in the spill folder, also after
    ``compute`` without a later ``reset`` (as at the end of every evaluation), and they read back
    what was written (pixel AUROC of maps that equal their masks is 1)."""
    from medad.engine.metrics import AnomalyEvaluation

    torch.manual_seed(0)
    detector = medad.build_detector(["Alpha"], "Alpha", medad.TINY_MODEL_NAME, 56, random_init=True, levels=(1, 2, 3, 4))
    metric = AnomalyEvaluation(detector, spill_dir=tmp_path)
    masks = torch.zeros(6, 1, 56, 56)
    masks[3:, :, 10:30, 20:40] = 1
    maps = masks[:, 0] * 0.8 + 0.1 * torch.rand(6, 56, 56)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    for part in (slice(0, 4), slice(4, 6)):
        metric.update({"zero_map": maps[part], "zero_score": maps[part].flatten(1).amax(1), "label": labels[part],
                       "mask": masks[part]})
    result = metric.compute()
    assert list(tmp_path.iterdir()) == []
    expected = roc_auc_score(masks.flatten().numpy() > 0, maps.flatten().numpy())
    assert expected == 1.0 and result["pixel_auroc"] == pytest.approx(expected, abs=1e-4)
