"""The MVFA network: a frozen CLIP visual tower with multi-level residual adapters.

After each chosen transformer block, a segmentation adapter and a detection adapter read the
residual stream; their 2-layer bottlenecks return a token per position (compared with text
features and the few-shot memory) and a correction that is mixed back into the stream:
``x = 0.8 * x + 0.1 * seg_out + 0.1 * det_out`` (Huang et al., CVPR 2024).

:class:`BackboneTokens` is the same frozen tower without adapters, for the baselines: the
tower's own tokens at the same blocks, raw or through its final norm and projection. Any tower
of :mod:`medad.model.towers` works; the blocks default to four evenly spaced ones
(:func:`default_levels`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from medad.model.scoring import float32_region
from medad.model.towers import VisionTower, vision_tower

__all__ = ["AdaptedVisualTower", "AdapterTokens", "BackboneTokens", "FrozenTower", "ResidualAdapter", "default_levels", "lower_matmul_weights"]


def default_levels(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks of ``depth``, the last included (fewer for shallower towers).

    >>> default_levels(24), default_levels(12), default_levels(4)
    ((6, 12, 18, 24), (3, 6, 9, 12), (1, 2, 3, 4))
    """
    return tuple(sorted({max(1, depth * i // 4) for i in range(1, 5)}))


class ResidualAdapter(nn.Module):
    """MVFA's adapter: ``fc1 = Linear(width, bottleneck) + LeakyReLU``, ``fc2`` back to ``width``.

    Module names (``fc1.0``, ``fc2.0``) follow the released MVFA checkpoints.
    """

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, bottleneck, bias=False), nn.LeakyReLU())
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, width, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the bottleneck token and the residual correction for the stream."""
        token = self.fc1(x)
        return token, self.fc2(token)


class AdapterTokens(NamedTuple):
    """Per-level adapter tokens, each ``(B, 1 + L, E)`` with the class token first."""

    seg: tuple[torch.Tensor, ...]
    det: tuple[torch.Tensor, ...]


class FrozenTower(nn.Module):
    """A frozen CLIP vision tower run block by block up to chosen levels (what the MVFA network
    and the baselines share).

    Args:
        visual: the vision tower (``clip.visual``: open_clip's ``VisionTransformer`` or a timm
            ViT trunk, see :mod:`medad.model.towers`), or its :class:`medad.model.towers.VisionTower` view;
            frozen and kept in eval mode.
        levels: 1-based indices of the blocks whose output is used (MVFA: 6, 12, 18, 24);
            ``None``: :func:`default_levels` of the tower's depth.
        matmul_dtype: the precision of the frozen blocks' matrix products (``torch.bfloat16`` or
            ``torch.float16`` under ``torch.autocast``; ``torch.float32`` default). The residual
            stream, layer norms, adapters and their tokens stay in float32, which keeps MVFA's
            numbers (see :mod:`medad.model.backbone` ``PRECISIONS``); the blocks' linear and
            attention projections are stored in ``matmul_dtype`` once (:func:`lower_matmul_weights`)
            instead of autocast casting them on every forward, with the same products bit for bit.
            They are lowered in place: the tower owns ``visual`` from then on, and a tower of
            another precision over the same module is refused (give it a copy).

    Float32 islands: the patch embedding, the adapters, the stream's mixing and the tokens run
    with autocast off (:func:`medad.model.scoring.float32_region`), whatever autocast encloses the
    call; only the frozen blocks follow an enclosing autocast (training's ``amp``) where
    ``matmul_dtype`` is float32.

    ``state_dict`` leaves the backbone out: it is frozen and always comes from its own weights
    (see :func:`medad.create_clip`), so checkpoints stay small and loadable anywhere.
    """

    def __init__(
        self, visual: nn.Module | VisionTower, levels: Sequence[int] | None = None, matmul_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        #: The tower's :class:`medad.model.towers.VisionTower` view (not a submodule: ``visual`` is).
        self.tower = vision_tower(visual)
        depth = len(self.tower.blocks)
        levels = default_levels(depth) if levels is None else tuple(int(level) for level in levels)
        if not levels or list(levels) != sorted(set(levels)) or levels[0] < 1 or levels[-1] > depth:
            raise ValueError(f"levels must be increasing block numbers in 1..{depth}, got {levels}")
        self.visual = self.tower.module.requires_grad_(False).eval()
        self.levels = levels
        self.matmul_dtype = matmul_dtype
        stored = {parameter.dtype for parameter in _matmul_parameters(self.tower.blocks)}
        if stored - {torch.float32, matmul_dtype}:
            raise ValueError(
                f"the tower's blocks hold {sorted(map(str, stored))} weights, not float32: another tower lowered "
                f"them in place (matmul_dtype); give each FrozenTower of another precision its own copy of the visual tower"
            )
        if matmul_dtype != torch.float32:
            lower_matmul_weights(self.tower.blocks, matmul_dtype)
        # torch.compile'd _trunk_eager and _adapt_eager once compile_paths ran: explicit attributes
        # that trunk and adapt call, so that no instance attribute shadows a method
        self._compiled_trunk: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compiled_adapt: Callable[[torch.Tensor], AdapterTokens] | None = None
        self.register_state_dict_post_hook(_drop_backbone_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_backbone_keys)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid of the backbone at its configured image size."""
        return self.tower.grid_size

    def train(self, mode: bool = True) -> FrozenTower:
        super().train(mode)
        self.visual.eval()  # frozen backbone: no dropout or other train-time behaviour
        return self

    def _blocks_precision(self, device: torch.device) -> AbstractContextManager:
        """The frozen blocks' matrix products in :attr:`matmul_dtype`: autocast keeps layer norms
        and softmax statistics in float32, and the residual additions promote back to float32.
        In float32 nothing is entered, so that an enclosing autocast (training's ``amp``) still
        applies to these blocks (and to them alone: the rest are float32 islands)."""
        if self.matmul_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.matmul_dtype)

    def compile_paths(self, **options: Any) -> None:
        """Run :meth:`trunk` and :meth:`adapt` through ``torch.compile`` (``options`` go to it) from
        now on, whoever calls them (see :meth:`medad.MVFADetector.compile_paths`)."""
        self._compiled_trunk = torch.compile(self._trunk_eager, **options)
        self._compiled_adapt = torch.compile(self._adapt_eager, **options)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Residual stream after the first adapted block, ``(B, 1 + L, width)``, float32.

        Nothing before the first adapter is trained, so this runs without autograd; its output
        can be cached when the same images are seen again (few-shot training).
        """
        if self._compiled_trunk is not None:
            return self._compiled_trunk(images)
        return self._trunk_eager(images)

    def _trunk_eager(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # patchify, prefix tokens, positions, pre-norm, in float32 (about 1 % of the work; in
            # bf16 it alone added a third of the maps' difference from float32, measured)
            with float32_region(images.device):
                x = self.tower.embed(images.float())
            x = self._blocks(x, 0, self.levels[0])
        return x.float()

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start + 1 .. stop`` (1-based) on the stream ``x``, in :attr:`matmul_dtype`."""
        with self._blocks_precision(x.device):
            for block in self.tower.blocks[start:stop]:
                x = block(x)
        return x

    def adapt(self, x: torch.Tensor) -> AdapterTokens:
        """Run the part of the network after the first level on a :meth:`trunk` output (each
        tower's ``_adapt_eager``, compiled after :meth:`compile_paths`)."""
        if self._compiled_adapt is not None:
            return self._compiled_adapt(x)
        return self._adapt_eager(x)

    def _adapt_eager(self, x: torch.Tensor) -> AdapterTokens:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> AdapterTokens:
        """Tokens per level for images ``(B, 3, S, S)`` in [0, 1] (no CLIP normalisation, as MVFA)."""
        return self.adapt(self.trunk(images))


class AdaptedVisualTower(FrozenTower):
    """Frozen CLIP vision tower with seg/det residual adapters after given blocks (MVFA).

    Args:
        visual, levels, matmul_dtype: as :class:`FrozenTower` (levels: after which blocks the
            adapters sit).
        bottleneck: adapter token size; defaults to the CLIP embedding size so that tokens
            compare with text features (768 for ViT-L/14).
        stream_weights: weights of (stream, seg correction, det correction); MVFA: 0.8, 0.1, 0.1.

    ``state_dict`` holds the adapters only.
    """

    def __init__(
        self,
        visual: nn.Module | VisionTower,
        levels: Sequence[int] | None = None,
        bottleneck: int | None = None,
        stream_weights: tuple[float, float, float] = (0.8, 0.1, 0.1),
        matmul_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(visual, levels, matmul_dtype)
        width = self.tower.width
        bottleneck = int(bottleneck or self.tower.output_dim)
        self.stream_weights = tuple(float(w) for w in stream_weights)
        self.seg_adapters = nn.ModuleList(ResidualAdapter(width, bottleneck) for _ in self.levels)
        self.det_adapters = nn.ModuleList(ResidualAdapter(width, bottleneck) for _ in self.levels)

    @property
    def token_dim(self) -> int:
        """The size of the tokens compared with text and memory (the adapters' bottleneck)."""
        return self.seg_adapters[0].fc1[0].out_features

    def _adapt_eager(self, x: torch.Tensor) -> AdapterTokens:
        """Run the adapted part of the network on a :meth:`trunk` output; the tokens are float32."""
        w_stream, w_seg, w_det = self.stream_weights
        seg, det = [], []
        done = self.levels[0]
        last = len(self.levels) - 1
        scored = self.tower.scored_tokens
        for i, level in enumerate(self.levels):
            x = self._blocks(x, done, level)
            done = level
            with float32_region(x.device):  # adapters, their tokens and the mixing in float32
                x = x.float()
                if i == last:
                    # Nothing reads the stream after the last adapter: skip the unused fc2 corrections.
                    seg.append(scored(self.seg_adapters[i].fc1(x)))
                    det.append(scored(self.det_adapters[i].fc1(x)))
                    break
                seg_token, seg_out = self.seg_adapters[i](x)
                det_token, det_out = self.det_adapters[i](x)
                x = w_stream * x + w_seg * seg_out + w_det * det_out
            seg.append(scored(seg_token))
            det.append(scored(det_token))
        return AdapterTokens(tuple(seg), tuple(det))

    def adapter_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Adapters in the released MVFA checkpoint format ``{'seg_adapters': ..., 'det_adapters': ...}``."""
        return {
            "seg_adapters": self.seg_adapters.state_dict(),
            "det_adapters": self.det_adapters.state_dict(),
        }

    def load_adapter_state(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Load adapters from the released MVFA format; shapes must match this backbone."""
        missing = {"seg_adapters", "det_adapters"} - set(state)
        if missing:
            raise KeyError(f"adapter checkpoint lacks {sorted(missing)}; has {sorted(state)}")
        for name in ("seg_adapters", "det_adapters"):
            _check_shapes(getattr(self, name), state[name], name)
            getattr(self, name).load_state_dict(state[name], strict=True)


class BackboneTokens(FrozenTower):
    """The frozen tower's own tokens after given blocks, without adapters (the baselines).

    Args:
        visual, levels, matmul_dtype: as :class:`FrozenTower`.
        projected: pass each level's tokens through the tower's final norm and projection
            (:meth:`medad.model.towers.VisionTower.project`), into CLIP's joint space where they
            compare with text (the ``clip`` baseline); ``False``: the raw residual stream
            (the ``memory`` baseline).

    Both token sets (``seg`` and ``det``) are the same tokens. ``state_dict`` is empty.
    """

    def __init__(
        self,
        visual: nn.Module | VisionTower,
        levels: Sequence[int] | None = None,
        projected: bool = True,
        matmul_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(visual, levels, matmul_dtype)
        self.projected = projected

    @property
    def token_dim(self) -> int:
        """The size of the tokens: CLIP's embedding size when projected, else the stream's width."""
        return self.tower.output_dim if self.projected else self.tower.width

    @torch.no_grad()
    def _adapt_eager(self, x: torch.Tensor) -> AdapterTokens:
        """Tokens ``(B, 1 + L, token_dim)`` per level from a :meth:`trunk` output, float32 (the
        projection too, whatever the autocast)."""
        tokens, done = [], self.levels[0]
        for level in self.levels:
            x = self._blocks(x, done, level).float()
            done = level
            with float32_region(x.device):
                tokens.append(self.tower.scored_tokens(self.tower.project(x) if self.projected else x))
        return AdapterTokens(tuple(tokens), tuple(tokens))


def lower_matmul_weights(blocks: Sequence[nn.Module], dtype: torch.dtype) -> None:
    """Store the frozen ``blocks``' linear and attention projection weights and biases in ``dtype``,
    in place: exactly the tensors ``torch.autocast(dtype=dtype)`` would cast for their matrix
    products, cast once. Autocast caches casts of trainable leaves only, so frozen float32
    weights were cast again on every forward (``copy_``, 12 % of a bf16 CPU profile). Layer
    norms, layer scales and everything outside the blocks keep float32: the residual stream
    and its additions stay float32, and under that autocast the products are the same bit for bit.
    """
    for parameter in _matmul_parameters(blocks):
        parameter.data = parameter.data.to(dtype)


def _matmul_parameters(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The weights and biases of the linear and attention projections in ``blocks`` (what
    :func:`lower_matmul_weights` lowers and :class:`FrozenTower` checks)."""
    return [parameter for block in blocks for module in block.modules()
            if isinstance(module, (nn.Linear, nn.MultiheadAttention)) for parameter in module.parameters(recurse=False)]


def _check_shapes(module: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    given = {key: tuple(value.shape) for key, value in state.items()}
    if expected != given:
        raise ValueError(
            f"{name} in the checkpoint do not fit this backbone (wrong backbone or levels?): "
            f"expected {expected}, got {given}"
        )


def _drop_backbone_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [key for key in state_dict if key.startswith(prefix + "visual.")]:
        del state_dict[key]


def _ignore_missing_backbone_keys(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if ".visual." not in f".{key}"]
