"""CLIP backbones on open_clip: architecture by name, weights from a tag or a local file.

MVFA runs OpenAI's ``ViT-L-14-336`` at 240 px (17x17 patches) with plain GELU, as the authors'
model is built. Architecture and weights are kept apart, as open_clip does: the architecture
comes from open_clip's config registry (plus ``medad-tiny``, registered here for tests and the
demo) and the weights from an open_clip pretrained tag, an open_clip checkpoint file, or
OpenAI's TorchScript archive (``ViT-L-14-336px.pt``).
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
    "PRECISIONS",
    "TINY_MODEL_NAME",
    "BackboneSpec",
    "MissingWeightsError",
    "create_clip",
    "is_torchscript_archive",
]

logger = logging.getLogger(__name__)

#: A 4-block, width-64 CLIP for tests and the demo (the golden fixture's architecture).
TINY_MODEL_NAME = "medad-tiny"
open_clip.add_model_config(Path(__file__).parent / "model_configs")


#: Backbone precisions, the dtype of the frozen blocks' matrix products: float32, or bf16 / fp16
#: under ``torch.autocast`` with float32 weights, residual stream, layer norms, adapters, tokens
#: and scores (:class:`medad.network.AdaptedVisualTower`). Converting the weights themselves, as
#: open_clip's ``precision`` does, also rounds the residual stream, and changed maps by 10-20 %
#: of their range and AUROCs by 0.03-0.17 (measured on the golden fixture and on an H200).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _architecture(spec: BackboneSpec) -> dict:
    """``open_clip.create_model`` arguments building ``spec``'s architecture.

    The vision tower uses open_clip's "custom" blocks: the same weights and state-dict keys as
    the default ``nn.MultiheadAttention`` blocks, but attention through
    ``F.scaled_dot_product_attention`` (fused kernels; about 10% faster per image on CPU).
    """
    config = open_clip.get_model_config(spec.model_name)
    if config is None:
        raise ValueError(
            f"Unknown CLIP architecture {spec.model_name!r}: not in open_clip.list_models() "
            f"(MVFA uses 'ViT-L-14-336'; tests and the demo {TINY_MODEL_NAME!r})"
        )
    # model kwargs replace open_clip's vision_cfg whole, so the image size goes in it too
    vision_cfg = {**config["vision_cfg"], "image_size": spec.image_size, "block_type": "custom"}
    return dict(quick_gelu=spec.quick_gelu, vision_cfg=vision_cfg)


def create_clip(
    model_name: str = "ViT-L-14-336",
    image_size: int = 240,
    pretrained: str | os.PathLike | None = None,
    quick_gelu: bool = False,
    random_init: bool = False,
    random_init_seed: int = 0,
) -> torch.nn.Module:
    """Build an open_clip CLIP model for MVFA, in eval mode on the CPU.

    Args:
        model_name: open_clip architecture name (``ViT-L-14-336`` for MVFA, ``medad-tiny`` for tests).
        image_size: input size; the positional embedding is resized (bicubic, antialias) to it.
        pretrained: open_clip pretrained tag (``"openai"``), a local open_clip checkpoint, or a
            local OpenAI TorchScript archive.
        quick_gelu: use QuickGELU activations. MVFA's model is built without them (default).
        random_init: allow a randomly initialised backbone when ``pretrained`` is empty
            (tests, benchmarks, the demo only; logged as a warning).
        random_init_seed: seed of that random initialisation, so that every workflow of a bundle
            builds the same backbone.

    Raises:
        MissingWeightsError: no weights given without ``random_init``, or ``pretrained`` is
            neither a loadable file nor a tag open_clip could download.
    """
    spec = BackboneSpec(model_name, int(image_size), bool(quick_gelu))
    architecture = _architecture(spec)
    if pretrained in (None, ""):
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
            model = open_clip.create_model(model_name, pretrained=None, **architecture)
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
