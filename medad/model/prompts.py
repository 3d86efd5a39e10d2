"""MVFA's text prompt ensemble and the organ names used in its prompts."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from medad.io.data import BMAD

__all__ = [
    "ABNORMAL_STATES",
    "NORMAL_STATES",
    "ORGAN_NAMES",
    "TEMPLATES",
    "encode_prompt_ensemble",
    "encode_text_features",
    "prompt_name",
]

#: Words used in prompts for the BMAD data sets, as MVFA names them (from :data:`medad.io.data.BMAD`).
ORGAN_NAMES = {name: dataset.prompt for name, dataset in BMAD.items()}

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")

TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def prompt_name(dataset: str) -> str:
    """The word used in prompts for a data set: MVFA's name for BMAD sets, else the name itself."""
    return ORGAN_NAMES.get(dataset, dataset.replace("_", " "))


@torch.no_grad()
def encode_prompt_ensemble(
    clip_model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], organ: str
) -> torch.Tensor:
    """Text features ``(E, 2)`` for ``organ``: column 0 normal, column 1 abnormal.

    Each state set is encoded over all templates, L2-normalised per sentence, averaged and
    L2-normalised again.
    """
    device = next(clip_model.parameters()).device
    columns = []
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        sentences = [template.format(state.format(organ)) for state in states for template in TEMPLATES]
        embeddings = clip_model.encode_text(tokenizer(sentences).to(device)).float()
        columns.append(F.normalize(F.normalize(embeddings, dim=-1).mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


def encode_text_features(
    clip_model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], datasets: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Prompt-ensemble text features for each data set name, computed once."""
    return {name: encode_prompt_ensemble(clip_model, tokenizer, prompt_name(name)) for name in dict.fromkeys(datasets)}
