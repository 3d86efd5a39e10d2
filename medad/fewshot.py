"""The few-shot training set: k abnormal and k normal images of the target, each augmented x11."""

from __future__ import annotations

import os

import torch
from monai.utils import convert_to_tensor

from medad.augment import augment_fewshot
from medad.checks import check_items
from medad.data import fewshot_selection
from medad.transforms import mvfa_preprocessing

__all__ = ["fewshot_training_data"]


def fewshot_training_data(
    dataset_dir: str | os.PathLike,
    target: str,
    shot: int,
    seed_file: str | os.PathLike | None = None,
    seed_index: int = 0,
    seed: int = 0,
    image_size: int = 240,
) -> list[dict]:
    """Preprocessed, augmented few-shot items of ``target`` (abnormal first, then normal).

    Items carry ``image`` (3, S, S), ``mask`` (1, S, S), ``label``, ``dataset``, ``has_mask`` and
    ``index`` (for caching per item); the normal ones also form the memory bank, all of them the
    calibration set.
    """
    # Every support image matters: a bad one stops the run instead of being left out.
    selected = check_items(
        fewshot_selection(dataset_dir, target, shot, seed_file, seed_index, seed),
        remedy="every support image is needed: fix it, or pick other shots (another seed_index, seed_dir or seed)",
    )
    preprocess = mvfa_preprocessing(image_size)
    loaded = [preprocess(item) for item in selected]
    has_mask = bool(selected[0]["has_mask"])
    items = []
    for label in (1, 0):
        group = [item for item in loaded if item["label"] == label]
        images = torch.stack([convert_to_tensor(item["image"], track_meta=False) for item in group])
        masks = None
        if label == 1 and has_mask:
            masks = torch.stack([convert_to_tensor(item["mask"], track_meta=False) for item in group])
        images, masks = augment_fewshot(images, masks)
        items += [
            {"image": image, "mask": mask, "label": label, "dataset": target, "has_mask": has_mask, "index": len(items) + i}
            for i, (image, mask) in enumerate(zip(images, masks))
        ]
    return items
