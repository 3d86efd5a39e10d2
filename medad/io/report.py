"""The evaluation report: curves, score distributions, the threshold and the model's worst mistakes.

:class:`EvaluationReport`, attached to the evaluator (``configs/evaluate.json``), writes
``eval/report.html``: one self-contained page (figures embedded as PNG data URIs, no script, no
network) with the image-level ROC and precision-recall curves, the pixel-level ones and the PRO
curve where the data set has masks, the image score histograms by class with the thresholds,
the confusion matrix at the model's stored threshold, galleries of the most anomalous normal
images, the least anomalous abnormal ones and the most anomalous abnormal ones (image, map
overlay, mask contour), the run's settings and medad's version. The same figures go to
``eval/report_figures/*.png``, to TensorBoard (``eval/``) and, when the run is tracked with
MLflow (``--tracking mlflow``), to its run as artifacts.

Memory stays bounded: image curves come from the per-image scores, pixel and PRO curves from
:class:`medad.engine.metrics.AnomalyEvaluation`'s streamed histograms, and the galleries are picked from
the scores before only their images are read again and scored.

A run of several support draws (``scripts/reproduce.py``: one evaluation per draw) gets one more
page, :func:`write_draws_report`: per data set, every draw's metrics as one point each
(:func:`draws_figure`) with their table, and the galleries of every draw's own report, each image
captioned with the draw it comes from.

The figure and page functions are pure (numpy in, matplotlib ``Figure`` or text out); matplotlib
draws through its Agg canvas, without pyplot or a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix, precision_recall_curve, roc_curve

from medad.model.decision import HELD_OUT_RULE, decision_rates, f1_best_threshold
from medad.model.detector import MVFADetector, unwrap
from medad.engine.handlers import gather_rows
from medad.engine.tracking import mlflow_runs
from medad.io.files import atomic_write, strict_json
from medad.engine.metrics import AnomalyEvaluation
from medad.io.outputs import annotate_overlay, heat_overlay, input_size
from medad.io.transforms import plain_tensor

__all__ = [
    "DRAW_METRICS",
    "GALLERIES",
    "SECTION_IDS",
    "EvaluationReport",
    "Section",
    "confusion_figure",
    "confusion_matrix",
    "curve_figure",
    "draws_figure",
    "figure_png",
    "gallery_picks",
    "histogram_figure",
    "mask_contour",
    "png_tag",
    "render_page",
    "thin_curve",
    "write_draws_report",
]

logger = logging.getLogger(__name__)

#: Gallery names with their titles and the rule that picks them from the image scores.
GALLERIES: dict[str, tuple[str, str]] = {
    "false_positives": ("Most anomalous normal images", "normal images with the highest scores"),
    "false_negatives": ("Least anomalous abnormal images", "abnormal images with the lowest scores"),
    "true_positives": ("Most anomalous abnormal images", "abnormal images with the highest scores"),
}
#: The ``id`` of every section the report has (pixel curves only where the data set has masks).
SECTION_IDS = (
    "summary", "image-curves", "pixel-curves", "histograms", "confusion",
    *(f"gallery-{name.replace('_', '-')}" for name in GALLERIES), "settings",
)
#: The metrics a multi-draw page shows, one point per draw (``metrics.json`` names without ``val_``).
DRAW_METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro")
#: Most points a plotted curve keeps (:func:`thin_curve`).
_CURVE_POINTS = 4096
_PANEL_HEIGHT = 180


def gallery_picks(scores: np.ndarray, labels: np.ndarray, size: int = 8) -> dict[str, list[int]]:
    """Indices into ``scores`` ``(N,)`` for each of :data:`GALLERIES`, at most ``size`` each:
    ``false_positives`` the normal images (``labels == 0``) by descending score,
    ``false_negatives`` the abnormal ones by ascending score, ``true_positives`` the abnormal
    ones by descending score; equal scores keep the images' order."""
    scores, labels = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    index = np.arange(scores.size)
    descending = np.lexsort((index, -scores))
    ascending = np.lexsort((index, scores))
    return {
        "false_positives": [int(i) for i in descending if labels[i] == 0][:size],
        "false_negatives": [int(i) for i in ascending if labels[i] == 1][:size],
        "true_positives": [int(i) for i in descending if labels[i] == 1][:size],
    }


def confusion_matrix(scores: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Counts ``(2, 2)`` int64 of ``score >= threshold`` (predicted abnormal): rows the true class
    (normal, abnormal), columns the predicted one (normal, abnormal)."""
    scores, labels = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(labels).reshape(-1).astype(bool)
    if not len(labels):  # scikit-learn refuses empty input
        return np.zeros((2, 2), dtype=np.int64)
    return sklearn_confusion_matrix(labels, scores >= threshold, labels=[False, True]).astype(np.int64)


def thin_curve(x: np.ndarray, y: np.ndarray, points: int = _CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` evenly spaced points of a curve ``(K,)``, ends kept (for plotting only)."""
    if len(x) <= points:
        return np.asarray(x), np.asarray(y)
    keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return np.asarray(x)[keep], np.asarray(y)[keep]


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """``figure`` as PNG bytes (Agg canvas)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def curve_figure(
    curves: Sequence[tuple[np.ndarray, np.ndarray, str]], xlabel: str, ylabel: str, title: str,
    diagonal: bool = False, baseline: float | None = None, limit: float | None = None,
) -> Figure:
    """One axes with each ``(x, y, label)`` curve drawn as a line; ``diagonal`` adds chance (the
    ROC diagonal), ``baseline`` a horizontal chance line (the positive rate of a PR curve),
    ``limit`` a vertical line (the false positive rate up to which AUPRO integrates)."""
    figure = Figure(figsize=(4.2, 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for x, y, label in curves:
        axes.plot(*thin_curve(x, y), label=label, linewidth=1.6)
    if diagonal:
        axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance")
    if baseline is not None:
        axes.axhline(baseline, color="0.6", linestyle=":", linewidth=1, label=f"chance ({baseline:.2f})")
    if limit is not None:
        axes.axvline(limit, color="0.4", linestyle="--", linewidth=1, label=f"FPR {limit:g}")
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right" if diagonal else "best", fontsize=8)
    figure.tight_layout()
    return figure


def histogram_figure(
    scores: np.ndarray, labels: np.ndarray, thresholds: Mapping[str, float], title: str, bins: int = 30
) -> Figure:
    """Histograms of image ``scores`` ``(N,)`` by class (``labels`` 0 normal, 1 abnormal) on shared
    bins, with a vertical line per named threshold."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    values = np.concatenate([scores, np.asarray(list(thresholds.values()), dtype=np.float64)])
    low, high = float(values.min()), float(values.max())
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    figure = Figure(figsize=(5.6, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.hist(scores[~labels], bins=edges, alpha=0.6, color="tab:blue", label=f"normal ({int((~labels).sum())})")
    axes.hist(scores[labels], bins=edges, alpha=0.6, color="tab:red", label=f"abnormal ({int(labels.sum())})")
    for (name, value), style in zip(thresholds.items(), ("-", "--", "-.", ":")):
        axes.axvline(value, color="black", linestyle=style, linewidth=1.4, label=f"{name}: {value:.4g}")
    axes.set(xlabel="image score", ylabel="images", title=title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def confusion_figure(matrix: np.ndarray, title: str) -> Figure:
    """The ``(2, 2)`` confusion ``matrix`` of :func:`confusion_matrix` as a labelled grid."""
    figure = Figure(figsize=(3.8, 3.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    names = ["normal", "abnormal"]
    axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=names, yticklabels=names,
             xlabel="predicted", ylabel="true", title=title)
    for row in range(2):
        for column in range(2):
            dark = matrix[row, column] > 0.5 * matrix.max()
            axes.text(column, row, str(int(matrix[row, column])), ha="center", va="center",
                      color="white" if dark else "black", fontsize=14)
    figure.tight_layout()
    return figure


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a binary ``mask`` ``(H, W)``: its pixels with a background
    4-neighbour (or on the image border), bool ``(H, W)``."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _panel(image: torch.Tensor, heat: torch.Tensor, mask: np.ndarray | None, low: float, high: float) -> Image.Image:
    """Image and overlay side by side, at the input's aspect ratio, the mask contour in cyan."""
    rows, columns = input_size(image)
    size = (max(1, round(_PANEL_HEIGHT * columns / rows)), _PANEL_HEIGHT)
    plain = torch.as_tensor(image).detach().float().cpu()[:3]
    overlay = heat_overlay(plain, heat, low, high, 0.5).numpy()
    if mask is not None:
        overlay[:, mask_contour(mask)] = np.array([0.0, 1.0, 1.0])[:, None]
    pictures = [Image.fromarray((np.moveaxis(p, 0, -1) * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR)
                for p in (plain.numpy(), overlay)]
    both = Image.new("RGB", (2 * size[0] + 4, size[1]), (255, 255, 255))
    both.paste(pictures[0], (0, 0))
    both.paste(pictures[1], (size[0] + 4, 0))
    return both


@dataclass(frozen=True)
class Section:
    """One part of the page: its ``id`` (an HTML id, see :data:`SECTION_IDS`), heading and body HTML."""

    id: str
    title: str
    body: str


def png_tag(png: bytes, alt: str, css_class: str = "figure") -> str:
    """An ``<img>`` holding ``png`` as a base64 data URI (no file beside the page needed)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{css_class}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;font-size:13px;opacity:.85}nav{padding:8px 24px;background:#e8edf2;font-size:13px}
nav a{margin-right:14px;color:#1f3b57}section{background:#fff;margin:14px 24px;padding:12px 18px;
border:1px solid #dde3ea;border-radius:6px}h2{font-size:17px;margin:4px 0 10px}
.figures{display:flex;flex-wrap:wrap;gap:12px}.figure{max-width:100%;border:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;font-size:12px;max-width:440px}.panel{display:block}
figcaption{word-break:break-all;padding-top:2px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #dde3ea;padding:3px 8px;text-align:left}.note{font-size:12px;color:#555}
"""


def render_page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole report page (HTML5, inline style, no script or external resource)."""
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = "".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>"
        f"</header><nav>{nav}</nav>{parts}</body></html>\n"
    )


class EvaluationReport:
    """Write ``output_dir/filename`` (default ``report.html``) and its figures when the evaluator
    completes (see the module's description).

    Args:
        output_dir: the evaluation's output folder (``eval/``).
        evaluation: the run's :class:`medad.engine.metrics.AnomalyEvaluation` (scores, streamed curves).
        datalist: the evaluated items (``image``, ``label``, optional ``mask``), to read the
            gallery images again by file name.
        transform: their preprocessing (the evaluator's, so the maps equal the evaluated ones).
        settings: the run's settings to show (``run_settings``, fusion, ...); entries without a
            value are left out, the evaluated model's own description is added.
        gallery_size: images per gallery.
        batch_size: images per forward pass when the galleries are scored again.
        tensorboard: also write the figures to TensorBoard event files in ``output_dir``.
        figures_dir: folder name (in ``output_dir``) of the figures as PNG files.
        save_rank: under ``torch.distributed`` every rank attaches it; ``save_rank`` gathers the
            scores and alone writes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        evaluation: AnomalyEvaluation,
        datalist: Sequence[Mapping[str, Any]],
        transform: Any,
        settings: Mapping[str, Any] | None = None,
        filename: str = "report.html",
        gallery_size: int = 8,
        batch_size: int = 8,
        tensorboard: bool = True,
        figures_dir: str = "report_figures",
        save_rank: int = 0,
    ) -> None:
        if gallery_size < 0:
            raise ValueError(f"gallery_size must be >= 0, got {gallery_size}")
        self.output_dir, self.path = Path(output_dir), Path(output_dir) / filename
        self.figures_dir = self.output_dir / figures_dir
        self.evaluation, self.transform = evaluation, transform
        self.items = {str(item["image"]): dict(item) for item in datalist}
        self.settings = {key: value for key, value in dict(settings or {}).items() if value is not None}
        self.gallery_size, self.batch_size = int(gallery_size), int(batch_size)
        self.tensorboard, self.save_rank = tensorboard, save_rank
        self.names: list[str] = []
        self.labels: list[int] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def start(self, engine: Engine) -> None:
        self.names.clear()
        self.labels.clear()

    def collect(self, engine: Engine) -> None:
        """Remember the file name and label of every evaluated image, in the order the metric sees them."""
        output = engine.state.output
        items = [output] if isinstance(output, Mapping) else output
        for item in items:
            names = getattr(item["image"], "meta", {}).get("filename_or_obj")
            labels = torch.as_tensor(item["label"]).reshape(-1).tolist()
            names = [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)] * len(labels)
            self.names.extend(names)
            self.labels.extend(int(label) for label in labels)

    def __call__(self, engine: Engine) -> None:
        evaluation = self.evaluation
        result = evaluation.compute()
        decision = evaluation.decision_scores
        rows = [
            {"image": name, "label": int(label), "score": float(score), "decision": None if decision is None else float(decision[n])}
            for n, (name, label, score) in enumerate(zip(self.names, self.labels, evaluation.image_scores, strict=True))
        ]
        rows = gather_rows(rows, self.save_rank)
        if rows is None:
            return
        start = time.perf_counter()
        figures = self._figures(engine, rows, result)
        galleries = self._galleries(engine, rows)
        self._write(engine, rows, result, figures, galleries)
        logger.info("evaluation report written to %s in %.1f s", self.path, time.perf_counter() - start)

    # ----------------------------------------------------------------- figures

    def _thresholds(self, detector: MVFADetector, rows: list[dict]) -> tuple[np.ndarray | None, dict[str, float]]:
        """The scores on the stored threshold's scale and the thresholds to draw over them."""
        if rows[0]["decision"] is None:
            return None, {}
        scores = np.array([row["decision"] for row in rows])
        labels = np.array([row["label"] for row in rows])
        stored = detector.effective_thresholds()
        lines = {f"stored threshold ({stored.image_rule})": stored.image}
        best = f1_best_threshold(torch.from_numpy(scores), torch.from_numpy(labels))
        if best is not None:
            lines["F1-best on this evaluated set"] = best
        return scores, lines

    def _figures(self, engine: Engine, rows: list[dict], result: Mapping[str, float]) -> dict[str, list[tuple[str, bytes]]]:
        """PNG figures by section id, each ``(name, png)``."""
        detector = unwrap(engine.network)
        scores = np.array([row["score"] for row in rows])
        labels = np.array([row["label"] for row in rows])
        figures: dict[str, list[tuple[str, bytes]]] = {}
        fpr, tpr, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        figures["image-curves"] = [
            ("image_roc", figure_png(curve_figure([(fpr, tpr, f"AUROC {result['image_auroc']:.3f}")],
                                                  "false positive rate", "true positive rate", "Image-level ROC", diagonal=True))),
            ("image_pr", figure_png(curve_figure([(recall[::-1], precision[::-1], f"AP {result['image_ap']:.3f}")],
                                                 "recall", "precision", "Image-level precision-recall",
                                                 baseline=float(labels.mean())))),
        ]
        pixels, pro = self.evaluation.pixel_curve, self.evaluation.pro_curve
        if pixels is not None:
            _, true_pos, false_pos = (values.cpu().numpy() for values in pixels.curve())
            n_neg, n_pos = (float(n) for n in pixels.counts.sum(dim=1).tolist())
            pixel_fpr, pixel_tpr = np.r_[0.0, false_pos / n_neg], np.r_[0.0, true_pos / n_pos]
            pixel_precision = true_pos / np.maximum(true_pos + false_pos, 1)
            pro_fpr, pro_tpr = (values.cpu().numpy() for values in pro.curve())
            figures["pixel-curves"] = [
                ("pixel_roc", figure_png(curve_figure([(pixel_fpr, pixel_tpr, f"AUROC {result['pixel_auroc']:.3f}")],
                                                      "false positive rate", "true positive rate", "Pixel-level ROC", diagonal=True))),
                ("pixel_pr", figure_png(curve_figure([(true_pos / n_pos, pixel_precision, f"AP {result['pixel_ap']:.3f}")],
                                                     "recall", "precision", "Pixel-level precision-recall",
                                                     baseline=n_pos / (n_pos + n_neg)))),
                ("pro", figure_png(curve_figure([(pro_fpr, pro_tpr, f"AUPRO (FPR <= 0.3) {result['aupro']:.3f}")],
                                                "false positive rate (normal pixels)", "per-region overlap",
                                                "PRO curve (behind AUPRO)", limit=0.3))),
            ]
        fusion = self.evaluation.fusion if detector.has_memory else "none"
        decision_scores, lines = self._thresholds(detector, rows)
        histograms = []
        if decision_scores is None or fusion == "set":
            best = f1_best_threshold(torch.from_numpy(scores), torch.from_numpy(labels))
            histograms.append(("histogram_evaluated", figure_png(histogram_figure(
                scores, labels, {} if best is None else {"F1-best on this evaluated set": best},
                f"Image scores as evaluated (fusion: {fusion})"))))
        if decision_scores is not None:
            title = "Image scores with the model's calibration" if fusion == "set" else f"Image scores (fusion: {fusion})"
            histograms.append(("histogram_decision", figure_png(histogram_figure(decision_scores, labels, lines, title))))
            stored = detector.effective_thresholds().image
            matrix = confusion_matrix(decision_scores, labels, stored)
            rates = decision_rates(decision_scores, labels, stored)
            title = "\n".join([f"At the stored threshold {stored:.4g}"] + [
                f"{name} {rates[name]:.3f} [{rates[name + '_ci'][0]:.3f}, {rates[name + '_ci'][1]:.3f}]"
                for name in ("sensitivity", "specificity") if rates[name] is not None
            ])
            figures["confusion"] = [("confusion", figure_png(confusion_figure(matrix, title)))]
        figures["histograms"] = histograms
        return figures

    @torch.no_grad()
    def _galleries(self, engine: Engine, rows: list[dict]) -> dict[str, list[tuple[dict, bytes]]]:
        """Each gallery's rows with a PNG of image and overlay; only those images are read again."""
        # Picked and shown by the score inference decides on (the model's calibration), as scores.csv gives it.
        shown = [row["score"] if row["decision"] is None else row["decision"] for row in rows]
        picks = gallery_picks(np.array(shown), np.array([row["label"] for row in rows]), self.gallery_size)
        wanted = sorted({i for indices in picks.values() for i in indices})
        detector = unwrap(engine.network)
        device = detector.text_features.device
        low, high = self.evaluation.map_range
        panels: dict[int, bytes] = {}
        was_training = detector.training
        detector.eval()
        for start in range(0, len(wanted), max(1, self.batch_size)):
            chunk = wanted[start : start + self.batch_size]
            items = []
            for index in chunk:
                name = rows[index]["image"]
                if name not in self.items:
                    raise KeyError(f"{name}: evaluated, but not in the report's datalist")
                items.append(self.transform(dict(self.items[name])))
            images = torch.stack([plain_tensor(item["image"]) for item in items]).to(device)
            maps = detector.finalize(detector.raw_scores(images), self.evaluation.fusion_ranges).anomaly_map.float().cpu()
            for index, item, heat in zip(chunk, items, maps):
                annotated = self.items[rows[index]["image"]].get("mask") is not None and item.get("mask") is not None
                mask = torch.as_tensor(item["mask"])[0].cpu().numpy() > 0.5 if annotated else None
                picture = annotate_overlay(_panel(item["image"], heat, mask, low, high), low, high)
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                panels[index] = buffer.getvalue()
        detector.train(was_training)
        return {name: [(rows[i], panels[i]) for i in indices] for name, indices in picks.items()}

    # ----------------------------------------------------------------- page and outputs

    def _settings(self, engine: Engine, rows: list[dict]) -> list[tuple[str, Any]]:
        from medad import __version__

        detector = unwrap(engine.network)
        description = detector.description
        shots = self.settings.get("shot")
        mode = "few-shot" if detector.has_memory else "zero-shot"
        if detector.effective_thresholds().pixel_rule == HELD_OUT_RULE:  # a site threshold keeps the pixel rule
            mode = "few-shot, normal-only adaptation"
        model = {
            "mode": mode,
            "shots": f"{shots} per class" if detector.has_memory and shots is not None else "none",
            "target": description.target,
            "backbone": f"{description.backbone.model_name} at {description.backbone.image_size} px",
            "backbone (full)": json.dumps(strict_json(asdict(description.backbone)), allow_nan=False),
            "CLIP weights": description.clip_weights,
            "adapted blocks": list(description.levels),
            "fusion": self.evaluation.fusion if detector.has_memory else "none (zero-shot)",
            "thresholds": json.dumps(strict_json(detector.effective_thresholds().summary()), allow_nan=False),
            "evaluated images": f"{len(rows)} ({sum(r['label'] for r in rows)} abnormal)",
            "medad version": __version__,
        }
        shown = {**model, **{key: value for key, value in self.settings.items() if key not in ("target", "shot")}}
        return [(key, value if isinstance(value, str) else json.dumps(strict_json(value), default=str, allow_nan=False))
                for key, value in shown.items()]

    def _write(self, engine: Engine, rows: list[dict], result: Mapping[str, float],
               figures: Mapping[str, list[tuple[str, bytes]]], galleries: Mapping[str, list[tuple[dict, bytes]]]) -> None:
        detector = unwrap(engine.network)
        stored = detector.effective_thresholds().image
        metrics = [(name, f"{value:.4f}") for name, value in result.items() if name != "selection_score" and np.isfinite(value)]
        sections = [Section("summary", "Metrics", _table(metrics, ["metric", "value"]))]

        def figure_section(section_id: str, title: str, note: str = "") -> None:
            body = f'<p class="note">{html.escape(note)}</p>' if note else ""
            body += '<div class="figures">' + "".join(png_tag(png, name) for name, png in figures.get(section_id, [])) + "</div>"
            sections.append(Section(section_id, title, body))

        figure_section("image-curves", "Image-level curves", "exact, from every image's score as in scores.csv")
        if "pixel-curves" in figures:
            figure_section("pixel-curves", "Pixel-level curves",
                           "from the evaluation's streamed pixel histograms (bin edges as thresholds)")
        figure_section("histograms", "Image score distributions and thresholds",
                       "the stored threshold is the model's own (its rule in brackets, README: The threshold rule); the F1-best one is chosen "
                       "on this evaluated set, so it is optimistic")
        if "confusion" in figures:
            figure_section("confusion", "Confusion matrix at the stored threshold")
        else:
            sections.append(Section("confusion", "Confusion matrix at the stored threshold",
                                    '<p class="note">this model has no calibration: no score is on its thresholds\' scale</p>'))
        decisions = {row["image"]: row["decision"] for row in rows}
        low, high = self.evaluation.map_range
        for name, (title, rule) in GALLERIES.items():
            cards = []
            for row, png in galleries[name]:
                decision = decisions[row["image"]]
                score = row["score"] if decision is None else decision
                flag = "" if decision is None else " &middot; " + ("flagged" if decision >= stored else "not flagged")
                if decision is not None and decision != row["score"]:
                    flag = f" (set-fused {row['score']:.4g})" + flag
                cards.append(f'<figure data-image="{html.escape(row["image"])}" data-score="{score!r}">'
                             f"{png_tag(png, Path(row['image']).name, 'panel')}<figcaption>"
                             f"<b>{html.escape(Path(row['image']).name)}</b> score {score:.4g}{flag}<br>"
                             f"{html.escape(row['image'])}</figcaption></figure>")
            note = (f"{rule}; left the image, right the anomaly map over it (one colour scale, "
                    f"{low:.3g} to {high:.3g}: the range of all evaluated maps), ground-truth mask contour in cyan; "
                    f"flagged: at or above the stored threshold")
            body = f'<p class="note">{html.escape(note)}</p><div class="gallery">{"".join(cards) or "none"}</div>'
            sections.append(Section(f"gallery-{name.replace('_', '-')}", title, body))
        sections.append(Section("settings", "Run settings", _table(self._settings(engine, rows), ["setting", "value"])))
        subtitle = f"{detector.target}: {len(rows)} images, written {time.strftime('%Y-%m-%d %H:%M:%S')}"
        page = render_page("medad evaluation report", subtitle, sections)
        with atomic_write(self.path, encoding="utf-8") as handle:
            handle.write(page)
        for name, png in [item for section in figures.values() for item in section]:
            with atomic_write(self.figures_dir / f"{name}.png", "wb") as handle:
                handle.write(png)
        if self.tensorboard:
            self._tensorboard(engine, figures, galleries)
        for client, run_id in mlflow_runs(engine):
            client.log_artifact(run_id, str(self.path), "report")
            client.log_artifacts(run_id, str(self.figures_dir), "report/figures")

    def _tensorboard(self, engine: Engine, figures: Mapping[str, list[tuple[str, bytes]]],
                     galleries: Mapping[str, list[tuple[dict, bytes]]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = engine.state.epoch
        writer = SummaryWriter(log_dir=str(self.output_dir))
        try:
            for name, png in [item for section in figures.values() for item in section]:
                writer.add_image(f"report/{name}", np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), step, dataformats="HWC")
            for name, cards in galleries.items():
                for rank, (row, png) in enumerate(cards):
                    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                    writer.add_image(f"report/{name}/{rank}_{Path(row['image']).name}", picture, step, dataformats="HWC")
        finally:
            writer.close()


# ----------------------------------------------------------------- several support draws


def draws_figure(values: Mapping[str, Mapping[str, float]], title: str) -> Figure:
    """The spread over support draws: for each metric of ``values`` (``{metric: {draw: value}}``)
    one point per draw, the draws side by side in the same order in every column, and the mean
    as a short bar."""
    figure = Figure(figsize=(1.4 + 1.1 * max(1, len(values)), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    draws = list(dict.fromkeys(draw for per_draw in values.values() for draw in per_draw))
    offsets = np.linspace(-0.25, 0.25, len(draws)) if len(draws) > 1 else np.zeros(1)
    labelled: set[str] = set()
    for column, per_draw in enumerate(values.values()):
        for number, (offset, draw) in enumerate(zip(offsets, draws)):
            if draw in per_draw:
                axes.plot(column + offset, per_draw[draw], "o", color=f"C{number % 10}", label=None if draw in labelled else draw)
                labelled.add(draw)
        if per_draw:
            axes.hlines(float(np.mean(list(per_draw.values()))), column - 0.35, column + 0.35, color="0.2", linewidth=1.5)
    axes.set_xticks(range(len(values)), list(values), rotation=30, ha="right", fontsize=8)
    axes.set(title=title, ylabel="value (bar: mean over the draws)", xlim=(-0.6, len(values) - 0.4))
    axes.grid(axis="y", alpha=0.3)
    if draws:
        axes.legend(fontsize=7, title="draw", title_fontsize=7, loc="best")
    figure.tight_layout()
    return figure


_GALLERY_SECTION = re.compile(r'<section id="(gallery-[a-z-]+)"><h2>(.*?)</h2>(.*?)</section>', re.S)
_CARD = re.compile(r"<figure (data-image=.*?)>(.*?<figcaption>)(.*?</figure>)", re.S)


def _draw_galleries(report_page: str, draw: str) -> dict[tuple[str, str], list[str]]:
    """The gallery cards of one draw's ``report.html`` (as :class:`EvaluationReport` writes them),
    by ``(section id, title)``, each marked with ``draw`` (``data-draw`` and its caption)."""
    label = html.escape(draw)
    return {
        (section_id, title): [f'<figure data-draw="{label}" {attrs}>{head}draw <b>{label}</b>: {rest}'
                              for attrs, head, rest in _CARD.findall(body)]
        for section_id, title, body in _GALLERY_SECTION.findall(report_page)
    }


def write_draws_report(groups: Mapping[str, Sequence[tuple[str, str | os.PathLike]]], path: str | os.PathLike) -> Path:
    """Write the page of a run of several support draws to ``path`` (atomically) and return it.

    Args:
        groups: per data set and setting (the key is its heading), its draws as
            ``(draw name, evaluation folder)``; the folder holds the draw's ``metrics.json`` and
            ``report.html``. A draw not evaluated yet (no ``metrics.json``) is listed as missing.
        path: the page to write.

    Per group: :func:`draws_figure` of :data:`DRAW_METRICS`, a table of every draw's values
    with their mean, sample standard deviation (ddof=1) and range, and the galleries of all
    draws, each image captioned with its draw.
    """
    sections = []
    for number, (heading, draws) in enumerate(groups.items()):
        values: dict[str, dict[str, float]] = {}
        missing, cards = [], {}
        for draw, folder in draws:
            metrics_path, page_path = Path(folder) / "metrics.json", Path(folder) / "report.html"
            if not metrics_path.is_file():
                missing.append(draw)
                continue
            metrics = {key.removeprefix("val_"): value for key, value in json.loads(metrics_path.read_text()).items()}
            for name in DRAW_METRICS:
                if isinstance(metrics.get(name), (int, float)) and np.isfinite(metrics[name]):
                    values.setdefault(name, {})[draw] = float(metrics[name])
            if page_path.is_file():
                for key, found in _draw_galleries(page_path.read_text(encoding="utf-8"), draw).items():
                    cards.setdefault(key, []).extend(found)
        body = ""
        if values:
            body += '<div class="figures">' + png_tag(figure_png(draws_figure(values, heading)), f"{heading}: one point per draw") + "</div>"
            names = list(dict.fromkeys(draw for per_draw in values.values() for draw in per_draw))
            rows = [[name, *(f"{values[name][d]:.4f}" if d in values[name] else "" for d in names),
                     f"{np.mean(list(values[name].values())):.4f}",
                     f"{np.std(list(values[name].values()), ddof=1):.4f}" if len(values[name]) > 1 else "",
                     f"{min(values[name].values()):.4f} to {max(values[name].values()):.4f}"] for name in values]
            body += _table(rows, ["metric", *names, "mean", "SD (ddof=1)", "range"])
        if missing:
            body += f'<p class="note">not evaluated yet: {html.escape(", ".join(missing))}</p>'
        for (_, title), found in cards.items():  # the title as the draw's page escaped it
            body += f"<h3>{title}</h3><div class=\"gallery\">{''.join(found)}</div>"
        sections.append(Section(f"draws-{number}", heading, body))
    page = render_page("medad support draws", f"{len(groups)} data sets and settings, written {time.strftime('%Y-%m-%d %H:%M:%S')}", sections)
    path = Path(path)
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(page)
    return path
