"""CLIP backbones on open_clip: architecture by name, weights from a tag or a local file.

MVFA runs OpenAI's ``ViT-L-14-336`` at 240 px (17x17 patches) with plain GELU, as the authors'
model is built. Architecture and weights are kept apart, as open_clip does: the architecture
comes from open_clip's config registry (plus ``medad-tiny``, registered here for tests and the
demo) and the weights from an open_clip pretrained tag, an open_clip checkpoint file, or
OpenAI's TorchScript archive (``ViT-L-14-336px.pt``).

Any open_clip vision-transformer CLIP works (:mod:`medad.model.towers`): built-in names, and models
named ``hf-hub:<org>/<repo>`` or ``local-dir:<folder>`` (an ``open_clip_config.json`` with its
weights beside it), whose weights come with the name; vision towers from open_clip or timm
(BiomedCLIP's ViT-B/16), text towers from open_clip or Hugging Face (``pip install medad[hf]``).
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import resize_pos_embed

__all__ = [
    "AUTO_PRECISION",
    "BF16_CPU_FLAGS",
    "MVFA_IMAGE_SIZE",
    "MVFA_MODEL_NAME",
    "PRECISIONS",
    "TINY_MODEL_NAME",
    "BackboneSpec",
    "MissingWeightsError",
    "cpu_flags",
    "create_clip",
    "default_image_size",
    "is_torchscript_archive",
    "resolve_precision",
    "weights_come_with_name",
]

logger = logging.getLogger(__name__)

#: A 4-block, width-64 CLIP for tests and the demo (the golden fixture's architecture).
TINY_MODEL_NAME = "medad-tiny"
#: MVFA's backbone and the input size it runs at (its paper and released adapters).
MVFA_MODEL_NAME, MVFA_IMAGE_SIZE = "ViT-L-14-336", 240
open_clip.add_model_config(Path(__file__).parents[1] / "model_configs")  # medad/model_configs


#: Backbone precisions, the dtype of the frozen blocks' matrix products: float32, or bf16 / fp16
#: under ``torch.autocast`` with float32 weights, residual stream, layer norms, adapters, tokens
#: and scores (:class:`medad.model.network.AdaptedVisualTower`). The patch embedding, adapters, tokens
#: and scores are float32 islands under any enclosing autocast too (training's ``amp``, which
#: otherwise only lowers the frozen blocks as these precisions do). Converting the weights
#: themselves, as open_clip's ``precision`` does, also rounds the residual stream, and changed
#: maps by 10-20 % of their range and AUROCs by 0.03-0.17 (measured on the golden fixture and on
#: an H200).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``precision: auto``: bf16 where the device multiplies bf16 natively, float32 elsewhere
#: (:func:`resolve_precision`).
AUTO_PRECISION = "auto"
#: The CPU flags of native bf16 matrix products (x86: AVX512-BF16, AMX; Arm: BF16 instructions).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm);
    empty where there is no such file (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``precision`` itself, or for ``"auto"`` the one to run on ``device``, logged with the reason:
    ``"bf16"`` where the device has native bf16 matrix products (a CUDA device of compute
    capability 8.0 or above; a CPU with one of :data:`BF16_CPU_FLAGS`), else ``"fp32"`` (bf16
    emulated by float32 kernels is slower than float32 itself and still changes the maps).

    Raises:
        ValueError: an unknown precision.
    """
    if precision != AUTO_PRECISION:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or {AUTO_PRECISION!r}, got {precision!r}")
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name, capability = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        reason = f"{name}, compute capability {capability[0]}.{capability[1]}"
    elif device.type == "cpu":
        found = sorted(cpu_flags().intersection(BF16_CPU_FLAGS))
        native = bool(found)
        reason = (f"CPU flags {', '.join(found)}" if found else f"no CPU flag of {', '.join(BF16_CPU_FLAGS)}") + (
            f" (torch's kernels: {torch.backends.cpu.get_cpu_capability()})"
        )
    else:
        native, reason = False, f"no native bf16 check for {device.type} devices"
    chosen = "bf16" if native else "fp32"
    logger.info("precision auto: %s on %s: %s", chosen, device, reason)
    return chosen


class MissingWeightsError(RuntimeError):
    """No usable CLIP weights were given and random initialisation was not asked for."""


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a CLIP backbone, stored with every trained model to check compatibility."""

    model_name: str = "ViT-L-14-336"
    image_size: int = 240
    quick_gelu: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip archive (such as OpenAI's released CLIP ``.pt`` files)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        # TorchScript archives carry their serialised code; plain torch.save zips do not.
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _how_to_supply(spec: BackboneSpec) -> str:
    return (
        f"Give the CLIP weights for {spec.model_name!r} as `pretrained`: the open_clip tag 'openai' "
        "(downloaded by open_clip where a network is available), a local path to OpenAI's "
        "TorchScript archive (ViT-L-14-336px.pt), or a local open_clip checkpoint "
        "(.pt/.pth/.bin/.safetensors). A randomly initialised backbone is only for tests, "
        "benchmarks and the demo: set `random_init=True` explicitly for that."
    )


def _load_torchscript_archive(model: torch.nn.Module, path: str) -> None:
    """Load OpenAI's TorchScript CLIP archive into an open_clip model of the same architecture.

    torch.load refuses TorchScript under ``weights_only=True``; the archive is OpenAI's own
    release format, so it is read with ``torch.jit.load`` here and nowhere else.
    """
    state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    # Scripted modules also export non-persistent buffers (e.g. open_clip's text attn_mask).
    persistent = model.state_dict().keys()
    non_persistent = {name for name, _ in model.named_buffers()} - set(persistent)
    for key in ("input_resolution", "context_length", "vocab_size", *non_persistent):
        state_dict.pop(key, None)
    resize_pos_embed(state_dict, model)  # bicubic with antialias, as open_clip does for checkpoints
    model.load_state_dict(state_dict, strict=True)


def weights_come_with_name(model_name: str) -> bool:
    """True for ``hf-hub:`` and ``local-dir:`` names: their weights come from that repository or
    folder, not from ``pretrained``."""
    return open_clip.factory.parse_model_name(model_name)[0] is not None


def _vision_config(model_name: str) -> dict:
    """The open_clip ``vision_cfg`` of ``model_name``; refuses unknown names and convolutional towers."""
    try:
        config = open_clip.get_model_config(model_name)
    except Exception as error:  # a local-dir: folder without its config, an hf-hub: repository out of reach, ...
        raise ValueError(f"Cannot read the open_clip config of {model_name!r}: {error}") from error
    if config is None:
        raise ValueError(
            f"Unknown CLIP architecture {model_name!r}: not in open_clip.list_models(), and not an 'hf-hub:' "
            f"or 'local-dir:' name (MVFA uses 'ViT-L-14-336'; tests and the demo {TINY_MODEL_NAME!r})"
        )
    vision_cfg = config["vision_cfg"]
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ValueError(
            f"{model_name}: its vision tower is a convolutional ModifiedResNet; MVFA adapts vision transformers only"
        )
    return vision_cfg


def default_image_size(model_name: str) -> int:
    """The input size a backbone runs at by default: MVFA's 240 px for ``ViT-L-14-336``, else the
    backbone's own (its open_clip config's ``image_size``; a timm trunk's own where that is absent)."""
    if model_name == MVFA_MODEL_NAME:
        return MVFA_IMAGE_SIZE
    vision_cfg = _vision_config(model_name)
    size = vision_cfg.get("image_size")
    if size is None and vision_cfg.get("timm_model_name"):
        from timm.models import get_pretrained_cfg_value

        size = (get_pretrained_cfg_value(vision_cfg["timm_model_name"], "input_size") or (3, 224, 224))[1:]
    size = size if size is not None else 224  # open_clip's own default
    sizes = {int(size)} if isinstance(size, int) else {int(s) for s in size}
    if len(sizes) != 1:
        raise ValueError(f"{model_name}: its input size {size} is not square; give a square image_size")
    return sizes.pop()


def _architecture(spec: BackboneSpec) -> dict:
    """``open_clip.create_model`` arguments building ``spec``'s architecture.

    open_clip's own vision tower uses its "custom" blocks: the same weights and state-dict keys
    as the default ``nn.MultiheadAttention`` blocks, but attention through
    ``F.scaled_dot_product_attention`` (fused kernels; about 10% faster per image on CPU). A
    timm trunk is resized to the image size after its weights are loaded (``force_image_size``:
    positions resampled by timm). No tower loads weights of its own (``pretrained_text``):
    every weight comes from the CLIP checkpoint.
    """
    vision_cfg = {**_vision_config(spec.model_name), "image_size": spec.image_size}
    if not vision_cfg.get("timm_model_name"):
        vision_cfg["block_type"] = "custom"
    # model kwargs replace open_clip's vision_cfg whole, so the image size goes in it too
    return dict(quick_gelu=spec.quick_gelu, vision_cfg=vision_cfg, force_image_size=spec.image_size, pretrained_text=False)


def create_clip(
    model_name: str = MVFA_MODEL_NAME,
    image_size: int | None = None,
    pretrained: str | os.PathLike | None = None,
    quick_gelu: bool = False,
    random_init: bool = False,
    random_init_seed: int = 0,
) -> torch.nn.Module:
    """Build an open_clip CLIP model for MVFA, in eval mode on the CPU.

    Args:
        model_name: open_clip architecture name (``ViT-L-14-336`` for MVFA, ``medad-tiny`` for tests),
            or an ``hf-hub:``/``local-dir:`` name, whose weights come with it.
        image_size: input size; the positional embedding is resized (bicubic, antialias) to it.
            ``None``: :func:`default_image_size`.
        pretrained: open_clip pretrained tag (``"openai"``), a local open_clip checkpoint, or a
            local OpenAI TorchScript archive; empty for ``hf-hub:``/``local-dir:`` names.
        quick_gelu: use QuickGELU activations. MVFA's model is built without them (default).
        random_init: allow a randomly initialised backbone when ``pretrained`` is empty
            (tests, benchmarks, the demo only; logged as a warning).
        random_init_seed: seed of that random initialisation, so that every workflow of a bundle
            builds the same backbone.

    Raises:
        MissingWeightsError: no weights given without ``random_init``, or ``pretrained`` is
            neither a loadable file nor a tag open_clip could download, or the ``hf-hub:`` or
            ``local-dir:`` model holds no loadable weights.
        ValueError: an unknown architecture, one that is no vision transformer, or ``pretrained``
            given for an ``hf-hub:``/``local-dir:`` name.
    """
    spec = BackboneSpec(model_name, int(image_size or default_image_size(model_name)), bool(quick_gelu))
    architecture = _architecture(spec)
    with_name = weights_come_with_name(model_name)
    if with_name and pretrained not in (None, ""):
        raise ValueError(
            f"{model_name}: the weights of an hf-hub:/local-dir: model come with it, but clip_weights "
            f"{str(pretrained)!r} was given as well: leave clip_weights empty (null)"
        )
    if with_name and not random_init:
        try:
            model = open_clip.create_model(model_name, require_pretrained=True, **architecture)
        except (RuntimeError, OSError) as error:
            raise MissingWeightsError(f"Could not load the CLIP model {model_name!r} with its weights: {error}") from error
    elif pretrained in (None, ""):
        if not random_init:
            raise MissingWeightsError(f"No CLIP weights given. {_how_to_supply(spec)}")
        logger.warning(
            "RANDOMLY INITIALISED CLIP backbone %r: anomaly scores are meaningless for real use "
            "(allowed because random_init=True).",
            model_name,
        )
        # A fixed seed: training, evaluation and inference must all see the same random backbone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_init_seed)
            model = open_clip.create_model(model_name, pretrained=None, load_weights=False, **architecture)
    else:
        pretrained = str(pretrained)
        if os.path.isfile(pretrained) and is_torchscript_archive(pretrained):
            model = open_clip.create_model(model_name, pretrained=None, **architecture)
            _load_torchscript_archive(model, pretrained)
        else:
            try:
                with warnings.catch_warnings():
                    # OpenAI's tag is registered with QuickGELU; MVFA deliberately runs without it.
                    warnings.filterwarnings("ignore", message="QuickGELU mismatch")
                    model = open_clip.create_model(model_name, pretrained=pretrained, require_pretrained=True, **architecture)
            except Exception as error:  # open_clip and torch.load raise many types (unsafe pickle, bad file, ...)
                raise MissingWeightsError(
                    f"Could not load CLIP weights {pretrained!r} for {model_name!r}: {error}. {_how_to_supply(spec)}"
                ) from error
    return model.eval()
