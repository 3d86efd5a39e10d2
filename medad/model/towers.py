"""One view of every CLIP vision tower MVFA adapts: open_clip's ``VisionTransformer`` and timm
vision-transformer trunks (open_clip's ``TimmModel``, as in BiomedCLIP).

A :class:`VisionTower` says how to embed images into the residual stream, which blocks to run,
the stream's width, the patch grid, and how to take one token per position back out of the
stream: the class token then the patch tokens, ``(B, 1 + L, C)``, the layout that
:mod:`medad.model.scoring` reads. A timm trunk with several prefix tokens (class and register tokens)
keeps its first one; a tower without any prefix token, and every convolutional tower
(open_clip's ``ModifiedResNet``, timm ConvNeXt, ResNet, ...), is refused with the model named.

A view holds references to the tower's modules, it is no module itself: the tower stays where
it was registered (``AdaptedVisualTower.visual``), so state-dict keys and ``.to()`` are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

__all__ = ["OpenCLIPTower", "TimmTower", "VisionTower", "vision_tower"]


class VisionTower:
    """What MVFA needs of a ViT vision tower.

    Attributes:
        module: the tower itself (``clip.visual``).
        blocks: its transformer blocks in order, each ``(B, P + L, width) -> (B, P + L, width)``.
        width: the residual stream's size.
        prefix_tokens: tokens before the patch tokens in the stream (``P``: class, registers).
        output_dim: the size of :meth:`project`'s tokens, CLIP's joint embedding size.
    """

    module: nn.Module
    blocks: Sequence[nn.Module]
    width: int
    prefix_tokens: int
    output_dim: int

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        if self.prefix_tokens < 1:
            raise ValueError(
                f"{name}: its vision tower has no class or register token; MVFA's scores take the first "
                "token of the stream as the class token, so this tower is not supported"
            )

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid at the tower's input size."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` to the stream before the first block, ``(B, P + L, width)``."""
        raise NotImplementedError

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Stream tokens ``(B, N, width)`` through the tower's final norm and projection, token by
        token (pooling, where the tower has any, is skipped): ``(B, N, output_dim)``."""
        raise NotImplementedError

    def scored_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first prefix token and the patch tokens of ``(B, P + L, C)``: ``(B, 1 + L, C)``."""
        if self.prefix_tokens == 1:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, self.prefix_tokens :]], dim=1)


class OpenCLIPTower(VisionTower):
    """open_clip's own ``VisionTransformer``: conv patchify, class token, positions, ``ln_pre``;
    ``ln_post`` and ``proj`` project."""

    prefix_tokens = 1

    def __init__(self, module: VisionTransformer, name: str) -> None:
        self.blocks = module.transformer.resblocks
        self.width = module.conv1.out_channels
        self.output_dim = int(module.output_dim)
        super().__init__(module, name)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.module.grid_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # private: open_clip has no public call for the embedding alone (forward_intermediates
        # runs blocks too, under one precision); _embeds is the step its own forward runs first
        return self.module._embeds(images)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.module.ln_post(tokens)
        return tokens if self.module.proj is None else tokens @ self.module.proj


class TimmTower(VisionTower):
    """A timm ``VisionTransformer`` trunk in open_clip's ``TimmModel``: ``patch_embed``, prefix
    tokens and positions (``_pos_embed``), ``norm_pre``; the trunk's ``norm``, ``fc_norm`` and
    head, then ``TimmModel.head`` (open_clip's projection) project."""

    def __init__(self, module: TimmModel, name: str) -> None:
        trunk = module.trunk
        self.blocks = trunk.blocks
        self.width = int(trunk.embed_dim)
        self.prefix_tokens = int(trunk.num_prefix_tokens)
        super().__init__(module, name)
        with torch.no_grad():  # the projection's size: the head may be the trunk's or open_clip's
            probe = torch.zeros(1, 1, self.width, device=trunk.patch_embed.proj.weight.device)
            self.output_dim = int(self.project(probe).shape[-1])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.module.trunk.patch_embed.grid_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        trunk = self.module.trunk
        # private: timm has no public call for the prefix tokens and positions alone (_pos_embed,
        # which forward_features and forward_intermediates run before the blocks)
        return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        trunk = self.module.trunk
        return self.module.head(trunk.head(trunk.fc_norm(trunk.norm(tokens))))


def vision_tower(module: nn.Module, name: str = "this CLIP") -> VisionTower:
    """The :class:`VisionTower` view of ``module`` (``clip.visual``); ``name`` names the model in
    errors.

    Raises:
        ValueError: the tower is not a vision transformer MVFA can adapt.
    """
    if isinstance(module, VisionTower):
        return module
    if isinstance(module, VisionTransformer):
        if module.attn_pool is not None:
            raise ValueError(f"{name}: its vision tower pools with attention (attentional_pool); not supported")
        return OpenCLIPTower(module, name)
    if isinstance(module, TimmModel):
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

        trunk = module.trunk
        # Exactly timm's ViT: subclasses and other ViT families (EVA, relative positions, ...)
        # run their blocks with extra arguments.
        if type(trunk) is not TimmVisionTransformer:
            raise ValueError(
                f"{name}: its timm vision trunk is a {type(trunk).__name__}; MVFA adapts transformer blocks, and "
                "supports timm's VisionTransformer trunks only (convolutional towers are not supported)"
            )
        return TimmTower(module, name)
    raise ValueError(
        f"{name}: its vision tower is a {type(module).__name__}; MVFA adapts vision transformers only "
        "(open_clip's VisionTransformer or a timm VisionTransformer trunk), not convolutional towers"
    )
