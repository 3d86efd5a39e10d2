"""Speed and memory benchmark of medad's MVFA against the authors' code path, in one run.

Measures, on the full ViT-L-14-336 at 240 px with random weights (allowed for benchmarking):

- inference images/s (forward plus zero-shot and few-shot scoring) at several batch sizes, in
  float32 and with bf16 matrix products (autocast), and the parity of bf16 with float32;
- the device's measured matrix-product peaks (large products in float32, and bf16 where timed,
  through each library PyTorch reaches: on a CPU ``torch.matmul`` and oneDNN, the larger being
  the peak) and the share of them inference achieves, from the FLOPs counted per image by the
  dtype they run in: against the peak of the precision's dtype, and against the roofline of a
  program that mixes dtypes (bf16 blocks, float32 adapters and scoring), see :func:`roofline`;
- few-shot scoring alone (memory distance maps) per test image at k = 4 and k = 16, exact and
  with the coreset memory of the k = 4 size;
- training seconds per image: a zero-shot step and a few-shot epoch over the 88-image augmented
  set (k = 4) with the trunk cache;
- the authors' code path for both (batch 1, attention weights materialised, every CLIP
  parameter requiring gradients), measured in the same run so that ratios are meaningful, and
  as their code runs on each device: their test loop under ``torch.cuda.amp.autocast()`` (fp16)
  on CUDA, float32 on a CPU;
- with ``--compile``, inference of each precision also through ``torch.compile``
  (:meth:`medad.MVFADetector.compile_paths`; compilation seconds reported apart);
- the cost of the streaming pixel metrics over 1,000 maps of 240 x 240 (in a fresh process, so
  that its extra memory is its own);
- with ``--profile``, the operators (GPU kernels) with the most time in one inference batch;
- peak memory, the device and the versions;
- with ``--runtimes`` (or ``--runtimes-only``, that section alone), the deployment runtimes side by
  side at one batch size: PyTorch float32, bf16 (and compiled with ``--compile``), the ONNX Runtime
  and OpenVINO exports (:mod:`medad.surfaces.deploy`) and the authors' path; the CPU's flags, the
  measured float32 and bf16 matrix-product peaks, and the share of them and of the roofline
  each path achieves; and
  the parity of each (the compiled one is timed only) against PyTorch float32 on generated images
  with and without lesions (256; 64 with ``--quick``): the
  largest score and map differences, whether the scores stay within 1e-3, and the decisions
  (image and pixel) that flip at the model's stored support-F1 thresholds.

``--quick`` is sized for a 2-core CPU (a few minutes); the full mode is for a GPU.
``--runtimes-only --quick`` takes about 5 minutes on a quiet 2-core CPU with AVX512-BF16.
Writes one JSON file (``--output``; with ``--update``, the sections of an existing one that this
run does not measure are kept) and prints it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import platform
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import medad
from medad.model.augment import augment_fewshot
from medad.model.backbone import cpu_flags, resolve_precision
from medad.model.decision import Thresholds
from medad.model.methods import AnomalyScores
from medad.surfaces.deploy import export_detector, runtime_network
from medad.engine.engines import adapter_parameter_groups
from medad.io.files import atomic_write, strict_json

DEFAULT_MODEL = "ViT-L-14-336"
#: The CPU flags reported: vector width, fused multiply-add, and int8 / bf16 / fp16 instructions.
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
#: How far an export's scores may be from PyTorch float32's (issue 30's acceptance).
EXPORT_SCORE_TOLERANCE = 1e-3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def current_rss_mib() -> float:
    """Resident memory now (Linux), for the growth of one phase in a fresh process."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(model: str, size: int, precision: str, device: torch.device) -> medad.MVFADetector:
    levels = (6, 12, 18, 24) if model == DEFAULT_MODEL else (1, 2, 3, 4)
    detector = medad.build_detector(["Brain"], "Brain", model, size, random_init=True, levels=levels, precision=precision)
    return detector.to(device).eval()


def lesion_images(count: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random textures, half of them with a bright disc, and the disc masks."""
    generator = torch.Generator().manual_seed(seed)
    images = F.avg_pool2d(torch.rand(count, 3, size, size, generator=generator), 9, 1, 4)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(count, 1, size, size)
    radius = size // 10
    for i in range(count // 2, count):
        cy, cx = torch.randint(2 * radius, size - 2 * radius, (2,), generator=generator).tolist()
        masks[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2).float()
    return images * (1 - masks) + 0.95 * masks, masks


# ----------------------------------------------------------------------------- the authors' path


def attention_with_weights(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Self-attention as ``nn.MultiheadAttention(..., need_weights=True)`` runs it in the authors'
    CLIP: the per-head weight matrices are materialised (and thrown away)."""
    sequence_first = x.transpose(0, 1)
    output, _weights = F.multi_head_attention_forward(
        sequence_first, sequence_first, sequence_first, x.shape[-1], attn.num_heads,
        attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=True, average_attn_weights=False,
    )
    return output.transpose(0, 1)


def reference_tokens(detector: medad.MVFADetector, images: torch.Tensor) -> medad.AdapterTokens:
    """The authors' forward: every block run with attention weights materialised and returned,
    and all blocks up to the last adapter, the final pooling included."""
    encoder, visual = detector.encoder, detector.encoder.visual
    x = encoder.tower.embed(images)  # open_clip's own embedding step (medad.model.towers.OpenCLIPTower.embed)
    seg, det = [], []
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        x = x + attention_with_weights(block.attn, block.ln_1(x))
        x = x + block.mlp(block.ln_2(x))
        if index in encoder.levels:
            level = encoder.levels.index(index)
            seg_token, seg_out = encoder.seg_adapters[level](x)
            det_token, det_out = encoder.det_adapters[level](x)
            x = 0.8 * x + 0.1 * seg_out + 0.1 * det_out
            seg.append(seg_token)
            det.append(det_token)
    # private: open_clip's pooling step, so that the authors' full forward is timed; no public call runs it alone
    pooled, _ = visual._global_pool(x)
    _ = visual.ln_post(pooled) @ visual.proj
    return medad.AdapterTokens(tuple(seg), tuple(det))


def reference_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """The precision the authors' test loop runs in: fp16 autocast on CUDA, float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def reference_scores(detector: medad.MVFADetector, image: torch.Tensor) -> None:
    """One image at a time, as the authors' test loop: zero-shot and few-shot scoring."""
    size = image.shape[-1]
    with torch.no_grad(), reference_precision(image.device):
        tokens = reference_tokens(detector, image)
        text = detector.text_features_for()
        medad.zero_shot_maps(tokens.seg, text, size)
        medad.zero_shot_scores(tokens.det, text)
        if detector.has_memory:
            medad.few_shot_maps(tokens.seg, detector.memory_seg, size)
            medad.few_shot_maps(tokens.det, detector.memory_det, size).mean()


def reference_training_step(detector: medad.MVFADetector, image, mask, label, optimizer, loss) -> None:
    """The authors' training step: batch 1, gradients for every CLIP parameter too."""
    optimizer.zero_grad()
    tokens = reference_tokens(detector, image)
    losses = loss(tokens.seg, tokens.det, detector.text_features_for(), mask, label)
    (losses.seg + losses.det).sum().backward()
    optimizer.step()


# ----------------------------------------------------------------------------- medad's path


def inference(detector: medad.MVFADetector, images: torch.Tensor) -> None:
    with torch.inference_mode():
        detector.predict(images)


def training_step(detector, images, masks, labels, optimizer, loss, hidden=None) -> None:
    optimizer.zero_grad(set_to_none=True)
    encoder = detector.encoder
    tokens = encoder.adapt(encoder.trunk(images) if hidden is None else hidden)
    losses = loss(tokens.seg, tokens.det, detector.text_features_for(), masks, labels)
    (losses.seg + losses.det).mean().backward()
    optimizer.step()


def parity(fp32: medad.MVFADetector, low: medad.MVFADetector, device: torch.device, size: int) -> dict:
    """Maps, scores and AUROCs of a low-precision backbone against float32 on images with lesions."""
    from sklearn.metrics import roc_auc_score

    images, masks = lesion_images(16, seed=1, size=size)
    support, _ = lesion_images(8, seed=2, size=size)
    results = {}
    for name, detector in (("fp32", fp32), ("low", low)):
        detector.build_memory(support[:4].to(device))
        detector.calibrate(support.to(device))
        with torch.inference_mode():
            results[name] = detector.predict(images.to(device))
    labels = (masks.flatten(1).amax(1) > 0).numpy()
    auroc = {
        name: {
            "image": roc_auc_score(labels, out.score.float().cpu().numpy()),
            "pixel": roc_auc_score(masks.flatten().numpy() > 0, out.anomaly_map.float().cpu().flatten().numpy()),
        }
        for name, out in results.items()
    }
    difference = (results["fp32"].anomaly_map - results["low"].anomaly_map).abs()
    return {
        "max_abs_map_difference": float(difference.max()),
        "mean_abs_map_difference": float(difference.mean()),
        "image_auroc": auroc,
        "pixel_auroc": {name: value["pixel"] for name, value in auroc.items()},
        "image_auroc_difference": abs(auroc["fp32"]["image"] - auroc["low"]["image"]),
        "pixel_auroc_difference": abs(auroc["fp32"]["pixel"] - auroc["low"]["pixel"]),
    }


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def native_precisions(device: torch.device) -> list[str]:
    """The precisions timed by default: float32, bf16 where ``device`` multiplies it natively
    (what ``precision: auto`` picks, :func:`medad.model.backbone.resolve_precision`, which logs
    why), and fp16 on CUDA."""
    return ["fp32", *(["bf16"] if resolve_precision("auto", device) == "bf16" else []),
            *(["fp16"] if device.type == "cuda" else [])]


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, repeats: int, n: int = 2048) -> dict[str, float]:
    """The device's sustained matrix-product rate in ``dtype`` (``n x n`` by ``n x n``), through
    each library PyTorch reaches: ``torch.matmul`` and, on a CPU, oneDNN's linear
    (``torch.utils.mkldnn``). They differ: on AMD CPUs PyTorch's float32 ``matmul`` runs MKL's
    AVX2 kernels, at about half of what oneDNN reaches with AVX-512 (on a Zen 5 EPYC, 183 against
    386 GFLOP/s: ``docs/benchmark_runtimes_cpu.json``); the device's peak is the larger."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    rates = {"torch.matmul": 2 * n**3 / timed(lambda: a @ b, device, repeats) / 1e9}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        from torch.utils import mkldnn

        linear = nn.Linear(n, n, bias=False).eval()
        linear.weight.data = b.T.contiguous().float()
        with warnings.catch_warnings():  # its modules are TorchScript, whose script_method is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            onednn = mkldnn.to_mkldnn(linear, dtype)
        a_onednn = a.to_mkldnn()  # in oneDNN's layout: the products alone are timed
        with torch.no_grad():
            rates["oneDNN"] = 2 * n**3 / timed(lambda: onednn(a_onednn), device, repeats, warmup=3) / 1e9
    return rates


def measured_peaks(flops: dict[str, dict[str, float]], device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """:func:`matmul_peak_gflops` of each dtype that ``flops`` (per precision, GFLOPs by dtype
    name, :func:`inference_gflop_per_image`) counts, keyed by that name."""
    dtypes = sorted({dtype for by_dtype in flops.values() for dtype in by_dtype})
    return {dtype: matmul_peak_gflops(device, getattr(torch, dtype), repeats) for dtype in dtypes}


class FlopsByDtype(FlopCounterMode):
    """PyTorch's FLOP counter that also sums each operator's FLOPs by the dtype it computes in
    (its output's), and counts the CPU's fused attention as its CUDA twin is counted (PyTorch's
    table leaves ``_scaled_dot_product_flash_attention_for_cpu`` out)."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)})
        self.by_dtype: collections.Counter[str] = collections.Counter()

    def _count_flops(self, func_packet, out, args, kwargs):
        # FlopCounterMode's per-operator hook (private; its formulas take the operator's arguments)
        if func_packet in self.flop_registry:
            dtype = next(leaf.dtype for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor))
            self.by_dtype[str(dtype).removeprefix("torch.")] += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        return super()._count_flops(func_packet, out, args, kwargs)


def inference_gflop_per_image(detector: medad.MVFADetector, size: int, device: torch.device) -> dict[str, float]:
    """GFLOPs of one image's inference (forward and scoring) by the dtype of the products
    (``{"float32": ..., "bfloat16": ...}``): with bf16 precision, the frozen blocks' products are
    bf16 and the float32 islands (patch embedding, adapters, scoring) float32."""
    counter = FlopsByDtype()
    with counter, torch.inference_mode():
        detector.predict(torch.rand(1, 3, size, size, device=device))
    return {dtype: flops / 1e9 for dtype, flops in counter.by_dtype.items()}


def roofline(flops: dict[str, dict[str, float]], peaks: dict[str, dict[str, float]], rates: dict[str, float],
             precision_of: Callable[[str], str]) -> dict:
    """Where each timed path stands against the device's measured peaks.

    Args:
        flops: per precision, its GFLOPs per image by dtype (:func:`inference_gflop_per_image`).
        peaks: per dtype, GFLOP/s by library (:func:`matmul_peak_gflops`); the largest is the peak.
        rates: images/s per timed path; ``precision_of`` names the precision each one runs.

    ``fraction_of_peak`` divides a path's FLOP rate by the peak of its precision's dtype (bf16's
    for bf16 precision). A program that mixes dtypes cannot reach that: its roofline is the rate at
    which each dtype's FLOPs run at that dtype's peak, ``1 / sum(flops_d / peak_d)`` images/s
    (``roofline_images_per_second``), and ``fraction_of_roofline`` is a path's rate over it.
    """
    best = {dtype: max(by_library.values()) for dtype, by_library in peaks.items()}
    main_dtype = {precision: max(by_dtype, key=by_dtype.get) for precision, by_dtype in flops.items()}
    bound = {precision: 1 / sum(gflop / best[dtype] for dtype, gflop in by_dtype.items())
             for precision, by_dtype in flops.items()}
    return {
        "gflop_per_image": {precision: sum(by_dtype.values()) for precision, by_dtype in flops.items()},
        "gflop_per_image_by_dtype": flops,
        "matmul_peak_gflops": best,
        "matmul_peak_gflops_by_library": peaks,
        "roofline_images_per_second": bound,
        "roofline_fraction_of_peak": {
            precision: bound[precision] * sum(flops[precision].values()) / best[main_dtype[precision]] for precision in flops},
        "fraction_of_peak": {
            name: rate * sum(flops[precision_of(name)].values()) / best[main_dtype[precision_of(name)]]
            for name, rate in rates.items()},
        "fraction_of_roofline": {name: rate / bound[precision_of(name)] for name, rate in rates.items()},
    }


def fewshot_scoring(detector: medad.MVFADetector, size: int, device: torch.device, repeats: int) -> dict:
    """Seconds per test image of the memory distance maps alone (seg and det levels), for the
    memory of k = 4 and k = 16 normal images x 11 augmentations: exact, and a coreset of the
    k = 4 size (``memory_size``)."""
    tokens = detector.encoder(torch.rand(8, 3, size, size, device=device))
    per_image = tokens.seg[0].shape[1]
    levels = len(tokens.seg)
    result, memories = {}, {}
    for k in (4, 16):
        count = k * 11 * per_image
        memories[k] = F.normalize(torch.randn(levels, count, tokens.seg[0].shape[-1], device=device), dim=-1)

    def score(memory: torch.Tensor) -> float:
        return timed(lambda: (medad.few_shot_maps(tokens.seg, memory, size), medad.few_shot_maps(tokens.det, memory, size)),
                     device, repeats) / 8

    for k, memory in memories.items():
        result[f"k{k}_exact"] = score(memory)
    start = time.perf_counter()
    chosen = medad.model.scoring.coreset_indices(memories[16][0], memories[4].shape[1])  # one level's selection
    result["coreset_selection_seconds_per_level"] = time.perf_counter() - start
    result["k16_coreset_of_k4_size"] = score(memories[16][:, chosen])
    result["k16_over_k4_exact"] = result["k16_exact"] / result["k4_exact"]
    result["k16_coreset_over_k4_exact"] = result["k16_coreset_of_k4_size"] / result["k4_exact"]
    return result


def top_kernels(detector: medad.MVFADetector, images: torch.Tensor, count: int = 12) -> list[dict]:
    """What bounds inference: the ``count`` operators (GPU kernels on CUDA) with the most self
    time in one batch, from ``torch.profiler``, with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    inference(detector, images)  # warm-up outside the profile
    with profile(activities=activities) as profiler:
        inference(detector, images)
        synchronize(images.device)
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if getattr(event, attribute) > 0]
    total = sum(getattr(event, attribute) for event in events)
    events.sort(key=lambda event: getattr(event, attribute), reverse=True)
    return [
        {"name": event.key, "calls": event.count, "self_ms": getattr(event, attribute) / 1e3,
         "share": getattr(event, attribute) / total}
        for event in events[:count]
    ]


def metric_cost(maps: int, size: int, queue) -> None:
    """Pixel AUROC/AP/F1-max and AUPRO over ``maps`` maps, streamed in batches of 8 (child process)."""
    from medad.model.metric_ops import BinnedScores, PROCurve

    before = current_rss_mib()
    peak = before
    generator = torch.Generator().manual_seed(0)
    pixels, pro = BinnedScores(0.0, 1.0), PROCurve(0.0, 1.0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    start = time.perf_counter()
    pro_seconds = 0.0
    for _ in range(maps // 8):
        scores = torch.rand(8, size, size, generator=generator) * 0.7
        cy, cx = torch.randint(30, size - 30, (2,), generator=generator).tolist()
        lesion = ((yy - cy) ** 2 + (xx - cx) ** 2) < 20**2
        masks = lesion.expand(8, size, size).clone()
        masks[:4] = False
        scores[masks] += 0.3
        pixels.update(scores, masks)
        tick = time.perf_counter()
        pro.update(scores, masks)
        pro_seconds += time.perf_counter() - tick
        peak = max(peak, current_rss_mib())
    values = {"auroc": pixels.auroc(), "ap": pixels.average_precision(), "f1_max": pixels.f1_max()}
    tick = time.perf_counter()
    values["aupro"] = pro.aupro()
    pro_seconds += time.perf_counter() - tick
    total = time.perf_counter() - start
    queue.put({
        "maps": maps,
        "size": size,
        "pixel_auroc_ap_f1_seconds": total - pro_seconds,
        "aupro_seconds": pro_seconds,
        "extra_mib": peak - before,  # sampled after every batch; includes the batch itself
        "values": values,
    })


# ----------------------------------------------------------------------------- deployment runtimes


def scores_of(detector: medad.MVFADetector, images: torch.Tensor, batch_size: int) -> AnomalyScores:
    """Final maps and scores of ``images`` in batches, on the CPU."""
    with torch.inference_mode():
        parts = [detector.predict(batch.to(detector.text_features.device)) for batch in images.split(batch_size)]
    return AnomalyScores(*(torch.cat([getattr(part, name).float().cpu() for part in parts]) for name in AnomalyScores._fields))


def decision_parity(reference: AnomalyScores, other: AnomalyScores, thresholds: Thresholds) -> dict:
    """``other`` against ``reference`` (PyTorch float32) on the same images: the largest score and
    map differences (also relative to the reference's range of each), whether every score is
    within :data:`EXPORT_SCORE_TOLERANCE`, and the image decisions (``score >= image``) and pixel
    decisions (``map >= pixel``) that differ at ``thresholds``."""
    score_difference = float((other.score - reference.score).abs().max())
    map_difference = float((other.anomaly_map - reference.anomaly_map).abs().max())
    spread = float(reference.anomaly_map.max() - reference.anomaly_map.min())
    score_spread = float(reference.score.max() - reference.score.min())
    flips = (other.score >= thresholds.image) != (reference.score >= thresholds.image)
    pixel_flips = (other.anomaly_map >= thresholds.pixel) != (reference.anomaly_map >= thresholds.pixel)
    return {
        "images": len(reference.score),
        "max_abs_score_difference": score_difference,
        "max_abs_map_difference": map_difference,
        "max_map_difference_of_range": map_difference / spread if spread > 0 else None,
        "max_score_difference_of_range": score_difference / score_spread if score_spread > 0 else None,
        "scores_within_tolerance": score_difference <= EXPORT_SCORE_TOLERANCE,
        "score_tolerance": EXPORT_SCORE_TOLERANCE,
        "flipped_decisions": int(flips.sum()),
        "flipped_share": float(flips.float().mean()),
        "flipped_pixel_share": float(pixel_flips.float().mean()),
        "anomalous_share_reference": float((reference.score >= thresholds.image).float().mean()),
    }


def runtime_section(model: str, size: int, batch: int, parity_images: int, repeats: int, compile: bool,
                    reference: bool) -> dict:
    """The deployment runtimes on the CPU, side by side (see the module docstring)."""
    device = torch.device("cpu")
    result: dict = {"batch_size": batch}
    low_precision = "bf16" in native_precisions(device)
    if not low_precision:
        result["bf16"] = "not timed: no native bf16 products on this CPU (its flags are in cpu_flags)"
    fp32 = build(model, size, "fp32", device)
    support, support_masks = lesion_images(8, seed=3, size=size)
    labels = (support_masks.flatten(1).amax(1) > 0).long()
    fp32.build_memory(augment_fewshot(support[:1])[0])
    fp32.calibrate(support, labels=labels, masks=support_masks)
    thresholds = fp32.effective_thresholds()
    result["thresholds"] = {"image": thresholds.image, "image_rule": thresholds.image_rule,
                            "pixel": thresholds.pixel, "pixel_rule": thresholds.pixel_rule}
    networks: dict[str, medad.MVFADetector] = {"torch_fp32": fp32}
    for name, compiled in (("torch_bf16", False), ("torch_bf16_compiled", True)):
        if not low_precision or (compiled and not compile):
            continue
        low = build(model, size, "bf16", device)
        low.load_state_dict(fp32.state_dict())
        networks[name] = low.compile_paths(compiled)
    with tempfile.TemporaryDirectory(prefix="medad-benchmark-export-") as folder:
        start = time.perf_counter()
        export_detector(fp32, folder)
        result["export_seconds"] = time.perf_counter() - start
        for runtime in ("onnxruntime", "openvino"):
            networks[runtime] = runtime_network(fp32, device, runtime, export_dir=folder)
    images = torch.rand(batch, 3, size, size)
    rates = {}
    for name, network in networks.items():
        rates[name] = batch / timed(lambda: inference(network, images), device, repeats)
        print(name, rates[name], flush=True)
    if reference:
        rates["authors_fp32_batch_1"] = 1 / timed(lambda: reference_scores(fp32, images[:1]), device, repeats)
    result["images_per_second"] = rates
    timed_precisions = ("fp32", "bf16") if low_precision else ("fp32",)
    flops = {name: inference_gflop_per_image(networks[f"torch_{name}"], size, device) for name in timed_precisions}
    peaks = measured_peaks(flops, device, max(repeats, 3))
    result.update(roofline(flops, peaks, rates, lambda name: "bf16" if "bf16" in name else "fp32"))
    print("matmul peaks (GFLOP/s):", json.dumps(peaks), flush=True)
    generated, _ = lesion_images(parity_images, seed=5, size=size)
    expected = scores_of(fp32, generated, batch)
    result["parity_vs_torch_fp32"] = {
        name: decision_parity(expected, scores_of(network, generated, batch), thresholds)
        for name, network in networks.items() if name != "torch_fp32" and not name.endswith("_compiled")  # timed only
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized run (a few minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--output", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--skip-reference", action="store_true", help="do not time the authors' path")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip architecture (medad-tiny for a smoke run)")
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--metric-maps", type=int, default=1000)
    parser.add_argument("--compile", action="store_true", help="also time inference through torch.compile")
    parser.add_argument("--profile", action="store_true", help="profile the top operators of inference at the largest batch")
    parser.add_argument(
        "--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
        help="backbone precisions to time (default: those the device multiplies natively, see native_precisions; "
             "CPUs without bf16 instructions run bf16 matrices very slowly)",
    )
    parser.add_argument("--runtimes", action="store_true", help="add the deployment runtimes' section (CPU)")
    parser.add_argument("--runtimes-only", action="store_true", help="the deployment runtimes' section alone")
    parser.add_argument("--parity-images", type=int, default=None,
                        help="generated images of the runtimes' parity (default 256; 64 with --quick)")
    parser.add_argument("--update", action="store_true", help="keep the sections of an existing --output not measured now")
    parser.add_argument("--archive", type=int, nargs="+", default=None, metavar="N",
                        help="instead: archive inference over N generated images with 1 and 2 processes "
                             "(scripts/benchmark_archive.py; e.g. --archive 200 2000)")
    args = parser.parse_args()
    if args.archive:
        import benchmark_archive  # beside this script (its folder is on sys.path when run as a script)

        benchmark_archive.main(["--images", *map(str, args.archive), "--output", str(args.output),
                                *(["--gpu"] if args.device.startswith("cuda") else [])])
        return
    size = args.image_size
    device = torch.device(args.device)
    batch_sizes = args.batch_sizes or ([1, 8] if args.quick else [1, 8, 32, 64])
    repeats = 2 if args.quick else 10
    torch.manual_seed(0)

    report: dict = json.loads(args.output.read_text()) if args.update and args.output.exists() else {}
    report.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "medad": medad.__version__},
        "model": f"{args.model} at {size} px, random weights",
        "mode": "quick" if args.quick else "full",
    })
    report["command"] = " ".join(["python", *sys.argv])
    if device.type == "cpu":
        report["cpu_model"] = cpu_model()
        report["cpu_flags"] = sorted(cpu_flags().intersection(REPORTED_CPU_FLAGS))
        report["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        print("CPU flags:", " ".join(report["cpu_flags"]), "| PyTorch's kernels:", report["torch_cpu_capability"], flush=True)
    if args.runtimes or args.runtimes_only:
        import onnxruntime
        import openvino

        report["versions"].update({"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__})
        start = time.perf_counter()
        report["runtimes"] = runtime_section(
            args.model, size, max(batch_sizes), args.parity_images or (64 if args.quick else 256), repeats,
            args.compile, not args.skip_reference,
        )
        report["runtimes"]["seconds"] = time.perf_counter() - start
        if args.runtimes_only:
            write_report(report, args.output)
            return
    # float32 is always built: the authors' path and the parity check are measured against it.
    precisions = args.precisions or native_precisions(device)
    detectors = {name: build(args.model, size, name, device) for name in dict.fromkeys(["fp32", *precisions])}
    fp32 = detectors["fp32"]
    support, support_masks = lesion_images(8, seed=3, size=size)
    # MVFA's memory: k normal images x 11 augmentations (k = 4; k = 1 in quick mode)
    normal = augment_fewshot(support[: 1 if args.quick else 4])[0]
    for detector in detectors.values():
        detector.build_memory(normal.to(device))
        detector.calibrate(support.to(device))

    # Inference: images per second, forward plus zero- and few-shot scoring.
    report["inference_images_per_second"] = {}
    for name, detector in detectors.items():
        rates = {}
        for batch in batch_sizes:
            images = torch.rand(batch, 3, size, size, device=device)
            rates[str(batch)] = batch / timed(lambda: inference(detector, images), device, repeats)
        report["inference_images_per_second"][name] = rates
        print(name, rates, flush=True)
    if args.compile:
        report["compile_seconds"] = {}
        for name in list(detectors):
            compiled = build(args.model, size, name, device)
            compiled.load_state_dict(detectors[name].state_dict())
            compiled.compile_paths()
            rates = {}
            for batch in batch_sizes:
                images = torch.rand(batch, 3, size, size, device=device)
                start = time.perf_counter()
                inference(compiled, images)  # compiles for this shape
                synchronize(device)
                report["compile_seconds"][f"{name}_batch_{batch}"] = time.perf_counter() - start
                rates[str(batch)] = batch / timed(lambda: inference(compiled, images), device, repeats, warmup=0)
            report["inference_images_per_second"][f"{name}_compiled"] = rates
            print(f"{name}_compiled", rates, flush=True)
    if not args.skip_reference:
        image = torch.rand(1, 3, size, size, device=device)
        report["reference_precision"] = "fp16 autocast (the authors' test loop)" if device.type == "cuda" else "fp32"
        report["reference_inference_seconds_per_image"] = timed(lambda: reference_scores(fp32, image), device, repeats)

    # Roofline: the share of the device's matrix-product peaks that inference achieves (best batch).
    flops = {name: inference_gflop_per_image(detector, size, device) for name, detector in detectors.items()}
    peaks = measured_peaks(flops, device, repeats)
    best_rates = {name: max(rates.values()) for name, rates in report["inference_images_per_second"].items()}
    report["roofline"] = roofline(flops, peaks, best_rates, lambda name: name.removesuffix("_compiled"))
    print("matmul peaks (GFLOP/s):", json.dumps(peaks), flush=True)
    with torch.inference_mode():
        report["fewshot_scoring_seconds_per_image"] = fewshot_scoring(fp32, size, device, repeats)

    for name, detector in detectors.items():
        if name != "fp32":
            report[f"{name}_parity"] = parity(fp32, detector, device, size)

    # Training: seconds per image.
    loss = medad.AlignmentLoss()
    train_batch = 1 if args.quick else 8
    images, masks = lesion_images(train_batch, seed=4, size=size)
    images, masks = images.to(device), masks.to(device)
    labels = (masks.flatten(1).amax(1) > 0).float()
    report["training_seconds_per_image"] = {"batch_size": train_batch}
    for name, detector in detectors.items():
        detector.train()
        optimizer = torch.optim.Adam(adapter_parameter_groups(detector), lr=1e-4, betas=(0.5, 0.999))
        step = lambda: training_step(detector, images, masks, labels, optimizer, loss)  # noqa: E731
        report["training_seconds_per_image"][f"zero_shot_{name}"] = timed(step, device, repeats) / train_batch
    # Few-shot: one epoch over the 88-image augmented set (k = 4), trunk outputs cached.
    few_images, few_masks = augment_fewshot(support[4:], support_masks[4:])
    few_images = torch.cat([few_images, normal]).to(device)
    few_masks = torch.cat([few_masks, torch.zeros_like(few_masks)]).to(device)
    few_labels = torch.cat([torch.ones(44), torch.zeros(44)]).to(device)
    if args.quick:
        few_images, few_masks, few_labels = few_images[::8], few_masks[::8], few_labels[::8]
    for name, detector in detectors.items():
        optimizer = torch.optim.Adam(adapter_parameter_groups(detector), lr=1e-3, betas=(0.5, 0.999))
        cache = torch.cat([detector.encoder.trunk(batch) for batch in few_images.split(8)])

        def epoch() -> None:
            for index in torch.randperm(len(few_images)).split(train_batch):
                training_step(detector, few_images[index], few_masks[index], few_labels[index], optimizer, loss, cache[index])

        report["training_seconds_per_image"][f"few_shot_cached_{name}"] = timed(epoch, device, 1, 0) / len(few_images)
    if not args.skip_reference:
        for parameter in fp32.encoder.visual.parameters():
            parameter.requires_grad_(True)  # as the authors' training loop does
        optimizer = torch.optim.Adam(adapter_parameter_groups(fp32), lr=1e-4, betas=(0.5, 0.999))
        step = lambda: reference_training_step(fp32, images[:1], masks[:1], labels[:1], optimizer, loss)  # noqa: E731
        report["reference_training_seconds_per_image"] = timed(step, device, repeats)
        fp32.encoder.visual.requires_grad_(False)
    if args.profile:
        images = torch.rand(max(batch_sizes), 3, size, size, device=device)
        report["top_kernels"] = {name: top_kernels(detector, images) for name, detector in detectors.items()}
    report["peak_memory_mib"] = peak_memory_mib(device)

    if not args.skip_reference:
        # How many times faster than the authors' path (reference seconds per image x images/s).
        report["speedup_vs_reference"] = {
            f"inference_{name}_best_batch": report["reference_inference_seconds_per_image"] * max(rates.values())
            for name, rates in report["inference_images_per_second"].items()
        }
        for name in detectors:
            report["speedup_vs_reference"][f"training_{name}"] = (
                report["reference_training_seconds_per_image"] / report["training_seconds_per_image"][f"zero_shot_{name}"]
            )

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=metric_cost, args=(args.metric_maps, 240, queue))
    child.start()
    report["metric_cost"] = queue.get()
    child.join()

    write_report(report, args.output)


def write_report(report: dict, path: Path) -> None:
    """Write ``report`` as strict JSON (atomically) and print it."""
    text = json.dumps(strict_json(report), indent=2, allow_nan=False)
    with atomic_write(path) as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
