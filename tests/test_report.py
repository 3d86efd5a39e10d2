"""The evaluation report (``eval/report.html``) and the inference overlays: curves from the
streamed accumulators against scikit-learn, gallery picks against ``scores.csv``, the page in
headless Chromium, and overlays at the image's own size on one colour scale per model."""

from __future__ import annotations

import base64
import csv
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sklearn_confusion, precision_recall_curve, roc_curve

import medad
from medad.model.metric_ops import BinnedScores
from medad.io.report import (
    GALLERIES, SECTION_IDS, confusion_matrix, gallery_picks, mask_contour,
)
from medad.io.outputs import COLOUR_BAR_WIDTH, SaveOverlayd
from medad.io.transforms import mvfa_preprocessing

from helpers import REPORT_GALLERY_SIZE as GALLERY_SIZE

CHROMIUM = shutil.which("chromium")


class _Page(HTMLParser):
    """Section ids, ``<img>`` sources and each gallery's ``data-image`` entries of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.galleries: dict[str, list[tuple[str, float]]] = {}
        self.loaded: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "figure" and "data-image" in attrs:
            self.galleries.setdefault(self.sections[-1], []).append((attrs["data-image"], float(attrs["data-score"])))
        elif tag == "body" and "data-loaded" in attrs:
            self.loaded = attrs["data-loaded"]


def _page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


# ----------------------------------------------------------------- pure functions


def test_binned_curves_equal_scikit_learn_on_scores_at_bin_edges():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 50, size=3000).astype(np.float64) / 10  # on the edges of 100 bins over [0, 10]
    labels = (rng.random(3000) < 0.1 + 0.15 * scores / 5).astype(int)
    binned = BinnedScores(0.0, 10.0, bins=100)
    binned.update(torch.from_numpy(scores), torch.from_numpy(labels))
    thresholds, true_pos, false_pos = (v.numpy() for v in binned.curve())
    fpr, tpr, expected_thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(thresholds, expected_thresholds[1:], atol=1e-9)  # sklearn starts at +inf
    np.testing.assert_allclose(false_pos / (labels == 0).sum(), fpr[1:])
    np.testing.assert_allclose(true_pos / labels.sum(), tpr[1:])
    precision, recall, _ = precision_recall_curve(labels, scores)  # ascending thresholds, ends at (1, 0)
    np.testing.assert_allclose(true_pos / (true_pos + false_pos), precision[:-1][::-1])
    np.testing.assert_allclose(true_pos / labels.sum(), recall[:-1][::-1])


def test_gallery_picks_and_confusion_matrix_against_independent_rules():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=40) / 5.0  # many ties: the images' order breaks them
    labels = rng.integers(0, 2, size=40)
    picks = gallery_picks(scores, labels, size=5)
    normal = [i for i in range(40) if labels[i] == 0]
    abnormal = [i for i in range(40) if labels[i] == 1]
    assert picks["false_positives"] == sorted(normal, key=lambda i: (-scores[i], i))[:5]
    assert picks["false_negatives"] == sorted(abnormal, key=lambda i: (scores[i], i))[:5]
    assert picks["true_positives"] == sorted(abnormal, key=lambda i: (-scores[i], i))[:5]
    assert set(picks) == set(GALLERIES)
    expected = sklearn_confusion(labels, (scores >= 0.6).astype(int), labels=[0, 1])
    np.testing.assert_array_equal(confusion_matrix(scores, labels, 0.6), expected)
    with pytest.raises(ValueError, match="40 scores but 3 labels"):
        gallery_picks(scores, labels[:3])


def test_mask_contour_is_the_boundary_ring():
    mask = np.zeros((12, 12), bool)
    mask[3:9, 2:10] = True  # 6 x 8
    contour = mask_contour(mask)
    assert contour.sum() == 2 * (6 + 8) - 4 and not contour[4:8, 3:9].any() and (contour <= mask).all()


# ----------------------------------------------------------------- inference overlays


def _scored_item(path: Path, heat: torch.Tensor, score: float) -> dict:
    item = mvfa_preprocessing(heat.shape[-1], mask_key=None)({"image": str(path)})
    return {**item, "pred": heat[None], "score": torch.tensor(score)}


def test_overlays_keep_the_image_size_and_share_the_model_scale(tmp_path, tiny_detector):
    size = 112
    gradient = np.tile(np.linspace(40, 220, 320, dtype=np.float32), (200, 1)).astype(np.uint8)
    Image.fromarray(gradient).save(tmp_path / "wide.png")  # 320 wide, 200 high
    Image.fromarray(gradient[:, :200]).save(tmp_path / "square.png")
    # Two maps of different ranges: one model scale colours their equal values alike.
    low_map = torch.full((size, size), 1.0)
    high_map = torch.full((size, size), 1.0)
    high_map[40:70, 40:70] = 3.5
    scale = tiny_detector.map_scale()
    assert scale == (0.0, 4.0)  # zero-shot: the abnormal probability summed over 4 levels
    save = SaveOverlayd(keys="pred", output_dir=tmp_path / "out", value_range=scale, threshold=2.0, pixel_threshold=2.0)
    save(_scored_item(tmp_path / "wide.png", low_map, 1.2))
    save(_scored_item(tmp_path / "square.png", high_map, 3.5))
    wide = np.asarray(Image.open(tmp_path / "out" / "wide_overlay.png").convert("RGB")).astype(int)
    square = np.asarray(Image.open(tmp_path / "out" / "square_overlay.png").convert("RGB")).astype(int)
    assert wide.shape == (200, 320 + COLOUR_BAR_WIDTH, 3) and square.shape == (200, 200 + COLOUR_BAR_WIDTH, 3)
    # Same map value (1.0) over the same gray at the same place: the same colour in both pictures.
    np.testing.assert_array_equal(wide[20, 10], square[20, 10])
    np.testing.assert_array_equal(wide[:, 320:], square[:, 200:])  # the same colour bar
    # Stretched per image (no scale), the flat map would look as hot as the lesion's peak.
    SaveOverlayd(keys="pred", output_dir=tmp_path / "stretched")(_scored_item(tmp_path / "wide.png", low_map, 1.2))
    stretched = np.asarray(Image.open(tmp_path / "stretched" / "wide_overlay.png").convert("RGB")).astype(int)
    assert not np.array_equal(stretched[20, 10], wide[20, 10])
    # The decision is written on the picture: the abnormal one differs from a caption-free copy.
    SaveOverlayd(keys="pred", output_dir=tmp_path / "plain", value_range=scale)(
        {k: v for k, v in _scored_item(tmp_path / "square.png", high_map, 3.5).items() if k != "score"})
    plain = np.asarray(Image.open(tmp_path / "plain" / "square_overlay.png").convert("RGB")).astype(int)
    assert np.abs(plain[-14:, :100] - square[-14:, :100]).sum() > 0 and np.array_equal(plain[:150, :200], square[:150, :200])
    with pytest.raises(ValueError, match="value_range"):
        SaveOverlayd(keys="pred", output_dir=tmp_path, value_range=(1.0, 1.0))


# ----------------------------------------------------------------- the report of a tiny evaluation


@pytest.fixture(scope="module")
def report_run(fewshot_evaluation) -> Path:
    """The shared tiny few-shot model (k = 2, one epoch) evaluated through the bundle (conftest.py,
    ``fewshot_evaluation``, which checks the log names the report): its ``eval/``, read-only."""
    return fewshot_evaluation / "eval"


def test_gallery_picks_match_scores_csv(report_run):
    with open(report_run / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    page = _page((report_run / "report.html").read_text())
    normal = [row for row in rows if row["label"] == "0"]
    abnormal = [row for row in rows if row["label"] == "1"]
    # Stable sorts: equal scores keep the table's order, as the report's picks do.
    expected = {
        "gallery-false-positives": sorted(normal, key=lambda row: -float(row["score"])),
        "gallery-false-negatives": sorted(abnormal, key=lambda row: float(row["score"])),
        "gallery-true-positives": sorted(abnormal, key=lambda row: -float(row["score"])),
    }
    for section, ranked in expected.items():
        shown = page.galleries[section]
        assert [image for image, _ in shown] == [row["image"] for row in ranked[:GALLERY_SIZE]], section
        np.testing.assert_allclose([score for _, score in shown], [float(row["score"]) for row in ranked[:GALLERY_SIZE]], rtol=1e-6)
    assert sorted(p.name for p in (report_run / "report_figures").iterdir()) == [
        "confusion.png", "histogram_decision.png", "histogram_evaluated.png", "image_pr.png", "image_roc.png",
        "pixel_pr.png", "pixel_roc.png", "pro.png",
    ]
    assert f"medad version</td><td>{medad.__version__}" in (report_run / "report.html").read_text()
    # The same figures and gallery panels are TensorBoard images in eval/.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in report_run.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["images"])
    assert {"report/image_roc", "report/pixel_roc", "report/pro", "report/confusion"} <= tags, tags
    assert sum(tag.startswith("report/false_negatives/") for tag in tags) == GALLERY_SIZE


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium: Debian's chromium package (.ci/run installs it with apt-get)")
def test_the_report_renders_in_headless_chromium(report_run, tmp_path):
    # A copy with a probe script (the report itself has none) records each image's decoded width.
    probe = "<script>window.addEventListener('load', () => { document.body.dataset.loaded = " \
            "Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0).join(','); });</script></body>"
    page_file = tmp_path / "report.html"
    page_file.write_text((report_run / "report.html").read_text().replace("</body>", probe))
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    dom = subprocess.run([*browser, "--dump-dom", page_file.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _page(dom.stdout)
    assert page.sections == list(SECTION_IDS)
    # 8 figures and one panel per gallery entry; every image decoded by the browser, none blank.
    assert len(page.images) == 8 + 3 * GALLERY_SIZE
    assert page.loaded is not None and all(int(width) > 0 for width in page.loaded.split(","))
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("L"), dtype=float)
        assert pixels.std() > 5
    shot = tmp_path / "report.png"
    result = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,1600", (report_run / "report.html").as_uri()],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    screen = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert screen.shape[:2] == (1600, 1280)
    assert screen.std() > 20 and len(np.unique(screen.reshape(-1, 3), axis=0)) > 200  # drawn, not a blank page
