"""Deployment runtimes: a detector's whole answer exported to ONNX and OpenVINO IR, and the
detectors that run those graphs wherever the PyTorch one runs (the bundle's ``runtime`` key,
:func:`medad.predict_input`, ``scripts/benchmark.py``).

An exported graph takes float32 images ``(B, 3, S, S)`` in [0, 1] (RGB, resized to the model's
size by :func:`medad.io.transforms.mvfa_preprocessing`; no CLIP mean and std) and returns, in
this order (:func:`output_names`): the final ``anomaly_map`` ``(B, S, S)`` and image ``score``
``(B,)`` (the few-shot memory bank and the fusion's stored calibration are constants of the
graph), then the raw scores they fuse (``zero_map``, ``zero_score``, and with a memory bank
``few_map``, ``few_score``; what the bundle's evaluator reads). Everything a decision needs
beyond the graph, the thresholds and their rules, the map's display range and the input's
preprocessing, is in ``model.json`` beside it (:func:`export_metadata`), so that a site
threshold set later needs no new export.

Which methods export: MVFA (zero- and few-shot) and the ``clip`` and ``memory`` baselines;
WinCLIP's window loop is checked by ``tests/test_exports.py`` too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from medad.io.files import atomic_write, strict_json
from medad.model.detector import MVFADetector
from medad.model.methods import AnomalyScores, RawScores

__all__ = [
    "EXPORT_FORMAT",
    "RUNTIMES",
    "RuntimeDetector",
    "WholeAnswer",
    "export_detector",
    "export_metadata",
    "output_names",
    "read_metadata",
    "runtime_network",
    "state_sha256",
    "trunk_block_names",
]

#: ``runtime`` values: PyTorch itself, or an exported graph run by ONNX Runtime or OpenVINO.
RUNTIMES = ("torch", "onnxruntime", "openvino")
#: The version of ``model.json``'s layout.
EXPORT_FORMAT = 1
_ONNX, _IR, _METADATA = "model.onnx", "model.xml", "model.json"
_EXPORT_LOCK = ".export.lock"


def output_names(detector: MVFADetector) -> tuple[str, ...]:
    """The graph's outputs in order: ``anomaly_map``, ``score``, then the raw scores the detector
    has (``few_map`` and ``few_score`` only with a memory bank)."""
    raw = ("zero_map", "zero_score", "few_map", "few_score") if detector.has_memory else ("zero_map", "zero_score")
    return ("anomaly_map", "score", *raw)


class WholeAnswer(nn.Module):
    """What the exports compute: ``images (B, 3, S, S) -> (anomaly_map (B, S, S), score (B,), *raw)``,
    in :func:`output_names`' order, with the detector's stored calibration."""

    def __init__(self, detector: MVFADetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.detector.raw_scores(images)
        final = self.detector.finalize(raw)
        return (final.anomaly_map, final.score, *(value for value in raw if value is not None))


def state_sha256(detector: MVFADetector) -> str:
    """SHA-256 of the detector's ``state_dict`` (adapters, text features, memory, calibration
    and its description, which names the backbone and its weights): the same for the same model
    on every run, whatever file it came from."""
    digest = hashlib.sha256()
    for name, value in sorted(detector.state_dict().items()):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_metadata(detector: MVFADetector) -> dict[str, Any]:
    """What ``model.json`` holds: the graph's input and outputs, the thresholds that decide
    (:meth:`medad.MVFADetector.effective_thresholds`: ``score >= image``, ``map >= pixel``), the
    maps' display range (``map_scale``, the min-max normalisation of overlays), the fusion's
    calibration (already inside the graph, for reference), the model's description and
    :func:`state_sha256`."""
    thresholds = detector.effective_thresholds()
    size = detector.image_size
    return strict_json({
        "format": EXPORT_FORMAT,
        "model_sha256": state_sha256(detector),
        "method": detector.method.name,
        "target": detector.target,
        "backbone": detector.backbone.to_dict(),
        "clip_weights": detector.clip_weights,
        "input": {
            "name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "range": [0.0, 1.0],
            "preprocessing": "medad.io.transforms.mvfa_preprocessing: RGB, intensities scaled to [0, 1], resized "
                             f"to {size} x {size} (bicubic, anti-aliased); no CLIP mean and std",
        },
        "outputs": list(output_names(detector)),
        "thresholds": {
            "image": thresholds.image, "pixel": thresholds.pixel,
            "image_rule": thresholds.image_rule, "pixel_rule": thresholds.pixel_rule,
            "decision": "anomalous where score >= image; anomalous pixels where anomaly_map >= pixel",
        },
        "map_scale": list(detector.map_scale()),
        "calibration_in_graph": detector.calibration.tolist(),
    })


def read_metadata(export_dir: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of an export folder.

    Raises:
        FileNotFoundError, ValueError: no such file, or one that is no medad export's metadata
            (the message names the file)."""
    path = Path(export_dir) / _METADATA
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a medad export's metadata of format {EXPORT_FORMAT}")
    return metadata


def export_detector(
    detector: MVFADetector, export_dir: str | os.PathLike, formats: Sequence[str] = ("onnx", "openvino")
) -> Path:
    """Export ``detector``'s whole answer (:class:`WholeAnswer`) into ``export_dir``: ``model.onnx``
    (``torch.onnx.export``, dynamo, any batch size), with ``"openvino"`` also ``model.xml`` and
    ``model.bin`` (OpenVINO's ``convert_model`` of that ONNX graph, float32 weights kept), and
    ``model.json`` (:func:`export_metadata`), written last. Each file appears whole or not at
    all. Returns ``export_dir``.

    Raises:
        ValueError: a detector whose frozen blocks are not float32 (export a ``precision: fp32``
            model; the runtimes choose their own kernels), or an unknown format.
    """
    unknown = sorted(set(formats) - {"onnx", "openvino"})
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; expected 'onnx' and/or 'openvino'")
    if detector.encoder.matmul_dtype != torch.float32:
        raise ValueError(
            f"export a float32 detector (load it with precision='fp32'), not one with {detector.encoder.matmul_dtype} "
            "matrix products: ONNX Runtime and OpenVINO choose their own precision"
        )
    folder = Path(export_dir)
    folder.mkdir(parents=True, exist_ok=True)
    size = detector.image_size
    example = torch.rand(2, 3, size, size, device=detector.text_features.device)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as staging:
        onnx_path = Path(staging) / _ONNX
        with torch.no_grad():
            torch.onnx.export(
                WholeAnswer(detector.eval()).eval(), (example,), str(onnx_path), input_names=["image"],
                output_names=list(output_names(detector)), dynamo=True, external_data=False, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
        staged = [onnx_path]
        if "openvino" in formats:
            import openvino as ov

            ov.save_model(ov.convert_model(str(onnx_path)), str(Path(staging) / _IR), compress_to_fp16=False)
            staged += [Path(staging) / _IR, Path(staging) / "model.bin"]
        if "onnx" not in formats:
            staged.remove(onnx_path)
        # the old metadata goes first: it must never describe graphs it was not written for
        (folder / _METADATA).unlink(missing_ok=True)
        for path in staged:
            os.replace(path, folder / path.name)
    with atomic_write(folder / _METADATA) as handle:
        json.dump(export_metadata(detector), handle, indent=2, allow_nan=False)
    return folder


#: A compiled graph: a float32 image batch in, the outputs in :func:`output_names`' order out.
Session = Callable[[np.ndarray], Sequence[np.ndarray]]


def _session(export_dir: Path, runtime: str, device: torch.device) -> Session:
    """The graph of ``export_dir`` compiled by ``runtime`` for ``device`` (ONNX Runtime: CUDA where
    asked and available, else its CPU provider; OpenVINO: CPU, float32 inference precision, which
    its default would lower to bf16 on CPUs with native bf16)."""
    if runtime == "onnxruntime":
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = onnxruntime.InferenceSession(str(export_dir / _ONNX), providers=providers)
        return lambda images: session.run(None, {"image": images})
    import openvino as ov

    compiled = ov.Core().compile_model(str(export_dir / _IR), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda images: [value for _, value in sorted(compiled(images).items(), key=lambda item: item[0].index)]


class RuntimeDetector(MVFADetector):
    """``detector`` with its scores computed by an exported graph: :meth:`raw_scores` and
    :meth:`predict` run ``session`` (one call gives both), everything else (thresholds, map
    scale, description, memory and calibration buffers) is the PyTorch detector's, so the
    bundle's inferer and :func:`medad.predict_input` take it as they take the detector.
    The frozen tower stays referenced (shared, not copied) for what only PyTorch fits."""

    def __init__(self, detector: MVFADetector, session: Session, runtime: str) -> None:
        super().__init__(
            detector.encoder, dict(zip(detector.datasets, detector.text_features)), detector.target, detector.backbone,
            detector.image_score_from_map, detector.clip_weights, detector.method,
        )
        self.load_state_dict(detector.state_dict())
        self.to(detector.text_features.device).eval()
        self.session, self.runtime = session, runtime

    def _run(self, images: torch.Tensor) -> tuple[AnomalyScores, RawScores]:
        values = self.session(np.ascontiguousarray(images.detach().float().cpu().numpy()))
        tensors = [torch.from_numpy(np.asarray(value)).to(images.device) for value in values]
        raw = tensors[2:] + [None] * (6 - len(tensors))
        return AnomalyScores(tensors[0], tensors[1]), RawScores(*raw)

    def raw_scores(self, images: torch.Tensor, tokens: Any = None) -> RawScores:
        """Raw scores from the graph (``tokens`` are PyTorch's: refused)."""
        if tokens is not None:
            raise ValueError(f"the {self.runtime} runtime scores images, not PyTorch tokens")
        return self._run(images)[1]

    def predict(self, images: torch.Tensor) -> AnomalyScores:
        """The graph's final maps and image scores."""
        return self._run(images)[0]


def trunk_block_names(detector: MVFADetector | nn.Module) -> list[str]:
    """The frozen tower's blocks as submodule paths of ``detector``, in order
    (``encoder.visual.transformer.resblocks.0``, ... for open_clip towers,
    ``encoder.visual.trunk.blocks.0``, ... for timm ones): what ``configs/inference_trt.json``
    hands MONAI's ``trt_compile``, one TensorRT engine per block (the blocks run one by one
    between the adapters). Empty for a stand-in that is no detector (the bundle's
    :class:`medad.surfaces.workflow.MissingModel`)."""
    if not isinstance(detector, MVFADetector):
        return []
    names = {id(module): name for name, module in detector.named_modules()}
    return [names[id(block)] for block in detector.encoder.tower.blocks]


def runtime_network(
    detector: MVFADetector,
    device: str | torch.device = "cpu",
    runtime: str = "torch",
    compile: bool = False,
    export_dir: str | os.PathLike | None = None,
) -> MVFADetector:
    """The ``network`` of inference for ``runtime`` (:data:`RUNTIMES`): ``"torch"``, ``detector`` on
    ``device`` (through ``torch.compile`` with ``compile``); ``"onnxruntime"`` or ``"openvino"``, a
    :class:`RuntimeDetector` on the graph in ``export_dir``, exported there first
    (:func:`export_detector`) unless its ``model.json`` records this very model
    (:func:`state_sha256`); ``export_dir`` ``None``: a temporary folder, removed once compiled.
    Processes sharing ``export_dir`` (the ranks of a torchrun inference) take turns on a file
    lock in it: the first exports, the others compile the graph it wrote.
    A stand-in that is no detector (the bundle's :class:`medad.surfaces.workflow.MissingModel`)
    comes back placed as it is: the run ends naming the missing file when it starts.

    Raises:
        ValueError: an unknown runtime, or ``compile`` with a runtime that compiles its graph itself.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if compile and runtime != "torch":
        raise ValueError(f"compile is PyTorch's (torch.compile): the {runtime} runtime compiles its graph itself; leave compile false")
    device = torch.device(device)
    if runtime == "torch" or not isinstance(detector, MVFADetector):
        return detector.to(device).compile_paths(bool(compile))
    detector = detector.to(device)
    temporary = tempfile.mkdtemp(prefix="medad-export-") if export_dir is None else None
    folder = Path(export_dir if export_dir is not None else temporary)
    try:
        wanted = ["onnx", "openvino"] if runtime == "openvino" else ["onnx"]
        graph = folder / (_IR if runtime == "openvino" else _ONNX)
        folder.mkdir(parents=True, exist_ok=True)
        # Processes sharing export_dir (the ranks of a torchrun inference) take turns: the first
        # exports, the others find its model.json and compile the same graph.
        with FileLock(folder / _EXPORT_LOCK):
            current = (folder / _METADATA).exists() and graph.exists() and read_metadata(folder)["model_sha256"] == state_sha256(detector)
            if not current:
                export_detector(detector, folder, wanted)
            return RuntimeDetector(detector, _session(folder, runtime, device), runtime)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
