"""Precision has one meaning: whatever ``torch.autocast`` encloses the detector (training's
``amp``, a caller's own), the patch embedding, the adapters, their tokens, the text logits and the
few-shot memory similarities are computed in float32 (the islands of ``medad.model.backbone.PRECISIONS``);
only the frozen blocks' matrix products follow the autocast, exactly as ``precision`` sets them.
``amp`` is a training option: evaluation, inference and the MONAI Label app refuse it.

The autocast tests run on the CPU (bf16) always and on CUDA (fp16 and bf16) where one is lent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import medad
from medad.engine.engines import MVFAEvaluator
from medad.model.scoring import FusionRange, few_shot_maps, text_logits
from medad.surfaces.workflow import unknown_keys

from helpers import CONFIGS, run_bundle_logged_in_process

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CPU cases stand for it")
AUTOCASTS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_NO_CUDA),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_NO_CUDA),
]
#: The ``precision`` whose frozen blocks run as an enclosing autocast of that dtype runs them.
PRECISION_OF = {torch.bfloat16: "bf16", torch.float16: "fp16"}
#: Fused maps against float32's, relative to float32's range: the bounds ``tests/test_golden.py``
#: states for bf16 / fp16 matrix products against the authors' float32 maps (measured on the CPU
#: 1.40 % and 0.3 %).
MAP_BOUNDS = {torch.bfloat16: 1.5e-2, torch.float16: 1e-2}


def _detector(tiny_config, tiny_weights, device: str, precision: str = "fp32") -> medad.MVFADetector:
    return medad.build_detector(
        [tiny_config["object"]], tiny_config["object"], model_name=medad.TINY_MODEL_NAME,
        image_size=tiny_config["image_size"], pretrained=tiny_weights["clip"], levels=tiny_config["features"],
        checkpoint=tiny_weights["adapters"], precision=precision,
    ).to(device).eval()


def _fields(raw: medad.RawScores) -> dict[str, torch.Tensor]:
    return {name: value for name, value in raw._asdict().items() if value is not None}


@pytest.mark.parametrize("device, dtype", AUTOCASTS)
def test_scores_of_given_tokens_are_float32_and_unchanged_by_autocast(tiny_config, tiny_weights, golden, device, dtype):
    """Text logits, memory similarities and the maps they make: float32 and bit for bit those
    computed without autocast (in bf16, ``1 - cosine`` near 0 would keep almost no bits)."""
    detector = _detector(tiny_config, tiny_weights, device)
    images = golden["images"].to(device)
    with torch.no_grad():
        detector.build_memory(golden["support_images"].to(device))
        tokens = detector.encoder(images)
        plain = _fields(detector.score_tokens(tokens, images.shape[-1]))
        plain_logits = text_logits(tokens.seg[0], detector.text_features_for())
        with torch.autocast(device, dtype=dtype):
            cast = _fields(detector.score_tokens(tokens, images.shape[-1]))
            logits = text_logits(tokens.seg[0], detector.text_features_for())
            # tokens of the autocast dtype (as a caller might hand over) are scored in float32 too
            low = [level.to(dtype) for level in tokens.seg]
            similarities = few_shot_maps(low, detector.memory_seg, images.shape[-1])
    assert sorted(cast) == ["few_map", "few_score", "zero_map", "zero_score"]
    for name, value in cast.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, plain[name]), name
    assert logits.dtype == torch.float32 and torch.equal(logits, plain_logits)
    expected = few_shot_maps([level.float() for level in low], detector.memory_seg, images.shape[-1])
    assert similarities.dtype == torch.float32 and torch.equal(similarities, expected)


@pytest.mark.parametrize("device, dtype", AUTOCASTS)
def test_adapters_and_tokens_are_float32_islands_under_autocast(tiny_config, tiny_weights, golden, device, dtype):
    """Each adapter layer reads float32 and gives what it gives outside autocast; the patch
    embedding and every token are float32; the frozen blocks (and they alone) take the
    autocast's dtype."""
    detector = _detector(tiny_config, tiny_weights, device)
    encoder = detector.encoder
    seen: list[tuple[str, torch.nn.Linear, torch.Tensor, torch.Tensor]] = []
    adapters = {f"{kind}.{name}": module for kind in ("seg_adapters", "det_adapters")
                for name, module in getattr(encoder, kind).named_modules() if isinstance(module, torch.nn.Linear)}
    for name, module in adapters.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, m, args[0], out)))
    embedded, blocks = [], []
    encoder.visual.conv1.register_forward_hook(lambda m, args, out: embedded.append(out.dtype))
    block_linear = next(m for m in encoder.tower.blocks[-1].modules() if isinstance(m, torch.nn.Linear))
    block_linear.register_forward_hook(lambda m, args, out: blocks.append(out.dtype))
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        tokens = encoder(golden["images"].to(device))
    assert embedded == [torch.float32] and blocks == [dtype]
    assert {token.dtype for token in (*tokens.seg, *tokens.det)} == {torch.float32}
    # fc1 and fc2 of every level but the last (whose fc2 nothing reads), seg and det
    assert len(seen) == 2 * (2 * len(encoder.levels) - 1)
    with torch.no_grad():
        for name, linear, given, out in seen:
            assert given.dtype == out.dtype == torch.float32, name
            assert torch.equal(out, F.linear(given, linear.weight, linear.bias)), name


@pytest.mark.parametrize("device, dtype", AUTOCASTS)
def test_maps_under_autocast_are_those_of_the_same_precision_and_near_float32(tiny_config, tiny_weights, golden, device, dtype):
    """An enclosing autocast of dtype D changes the frozen blocks' matrix products alone: maps
    and scores equal those of ``precision`` D bit for bit, and stay within :data:`MAP_BOUNDS` of
    float32's range."""
    outputs = {}
    for name, precision, autocast in (("fp32", "fp32", False), ("autocast", "fp32", True),
                                      ("precision", PRECISION_OF[dtype], False)):
        detector = _detector(tiny_config, tiny_weights, device, precision)
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            detector.build_memory(golden["support_images"].to(device))
            raw = detector.raw_scores(golden["images"].to(device))
            ranges = {row: FusionRange.of(getattr(raw, row)) for row in ("zero_map", "few_map", "zero_score", "few_score")}
            outputs[name] = detector.finalize(raw, ranges)
    reference, cast = outputs["fp32"], outputs["autocast"]
    assert cast.anomaly_map.dtype == cast.score.dtype == torch.float32
    assert torch.equal(cast.anomaly_map, outputs["precision"].anomaly_map)
    assert torch.equal(cast.score, outputs["precision"].score)
    spread = reference.anomaly_map.max() - reference.anomaly_map.min()
    relative = float((cast.anomaly_map - reference.anomaly_map).abs().max() / spread)
    assert 0 < relative <= MAP_BOUNDS[dtype], relative  # 0 would mean the autocast did nothing


# ----------------------------------------------------------------------------- amp is training's alone


def test_the_evaluator_refuses_amp(tiny_detector):
    with pytest.raises(ValueError, match="amp is a training option"):
        MVFAEvaluator(device=torch.device("cpu"), val_data_loader=[], network=tiny_detector, amp=True)


def test_inference_refuses_amp_as_a_training_option():
    hint = ("--amp: amp is a training option (train.json): evaluation and inference run the model in float32, or "
            "with --precision bf16 (or fp16) for the frozen blocks' matrix products; leave --amp out")
    assert unknown_keys([CONFIGS / "inference.json"], ["amp"]) == [hint]
    assert unknown_keys([CONFIGS / "train.json"], ["amp"]) == []  # training takes it


@pytest.mark.parametrize("run_id, configs", [("inferring", ("inference",)), ("evaluating", ("train", "evaluate"))])
def test_bundle_runs_refuse_amp_before_any_work(tmp_path, run_id, configs):
    """Inference has no ``amp`` key; evaluation merges train.json's and refuses it all the same.
    The bundle command runs inside this process (``helpers.run_bundle_logged_in_process``): a
    refusal's status and last line do not depend on the process boundary (test_run_safety.py)."""
    status, _, lines = run_bundle_logged_in_process(run_id, configs, tmp_path, amp=True)
    assert status != 0
    assert lines and lines[-1].startswith("medad: --amp: amp is a training option"), "\n".join(lines)[-3000:]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "outputs").exists()


def test_the_monailabel_app_refuses_amp(tmp_path):
    app = Path(__file__).resolve().parents[1] / "bundle" / "monailabel"
    sys.path.insert(0, str(app))
    try:
        from lib.store import AppSettings
    finally:
        sys.path.remove(str(app))
    with pytest.raises(ValueError, match="--conf amp: amp is a training option"):
        AppSettings.from_conf({"bundle_path": str(tmp_path), "amp": "true"})


# ----------------------------------------------------------------------------- frozen weights in the compute dtype


class _Casts(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shapes of float32 tensors cast to another floating dtype (``aten._to_copy``,
    what autocast and ``.to`` run)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and kwargs.get("dtype") not in (None, torch.float32):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs)


def test_bf16_stores_the_block_products_weights_once_and_casts_none_per_forward(tiny_config, tiny_weights, golden):
    """``precision: bf16`` keeps the frozen blocks' linear and attention weights in bf16 (norms
    and everything outside the blocks in float32), so a forward casts activations only; the same
    tower in float32 under autocast casts every one of those weights on every forward (the
    control that shows the recorder sees weight casts)."""
    images = golden["images"][:2]
    low, plain = (_detector(tiny_config, tiny_weights, "cpu", precision) for precision in ("bf16", "fp32"))
    products = {name for name, module in low.encoder.tower.blocks.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.MultiheadAttention))}
    weights = dict(low.encoder.tower.blocks.named_parameters())
    for name, parameter in weights.items():
        expected = torch.bfloat16 if name.rpartition(".")[0] in products else torch.float32
        assert parameter.dtype == expected, name
    assert {p.dtype for name, p in low.encoder.named_parameters() if not name.startswith("visual.transformer")} == {torch.float32}
    lowered = {tuple(p.shape) for p in weights.values() if p.dtype == torch.bfloat16}
    with torch.no_grad():
        with _Casts() as casts:
            low.encoder(images)
        with _Casts() as control, torch.autocast("cpu", dtype=torch.bfloat16):
            plain.encoder(images)
    assert not lowered.intersection(casts.shapes), casts.shapes
    assert lowered <= set(control.shapes)


def test_precision_auto_takes_bf16_only_with_native_cpu_support(monkeypatch, caplog):
    from medad.model import backbone

    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    with caplog.at_level("INFO", logger="medad.model.backbone"):
        assert backbone.resolve_precision("auto", "cpu") == "bf16"
    assert "precision auto: bf16 on cpu: CPU flags avx512_bf16" in caplog.text
    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    caplog.clear()
    with caplog.at_level("INFO", logger="medad.model.backbone"):
        assert backbone.resolve_precision("auto", "cpu") == "fp32"
    assert "precision auto: fp32 on cpu: no CPU flag of avx512_bf16, amx_bf16, bf16" in caplog.text
    assert backbone.resolve_precision("fp16", "cpu") == "fp16"  # a given precision stays as given
    with pytest.raises(ValueError, match="precision must be one of .* or 'auto', got 'int8'"):
        backbone.resolve_precision("int8")


def test_build_detector_resolves_precision_auto(monkeypatch, tiny_config, tiny_weights):
    from medad.model import backbone

    for flags, dtype in ((frozenset({"amx_bf16"}), torch.bfloat16), (frozenset(), torch.float32)):
        monkeypatch.setattr(backbone, "cpu_flags", lambda flags=flags: flags)
        assert _detector(tiny_config, tiny_weights, "cpu", "auto").encoder.matmul_dtype == dtype
