"""Zero-shot training on own data sets as sources, and normal-only adaptation from what it makes
or from released MVFA adapters, its inputs checked before anything is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

import medad
from medad.model.checkpoint import CheckpointError, describe
from medad.io.data import SourceSet, source_datalist, source_sets
from medad.engine.fewshot import NormalOnlyAdaptation, checked_init_checkpoint
from medad.surfaces.workflow import error_summary

from helpers import CONFIGS, IMAGE_SIZE
from synthetic import write_dataset


def _folder_dataset(root: Path, name: str, normal: int, abnormal: int, seed: int) -> Path:
    """``root/name`` in the own-data folder layout (``normal/``, ``abnormal/``, ``masks/``; no splits)."""
    generated = root / "generated"
    write_dataset(generated, name, masks=True, seed=seed, size=IMAGE_SIZE, counts={"test": (normal, abnormal)})
    split = generated / f"{name}_AD" / "test"
    folder = root / name
    folder.mkdir(parents=True)
    for source, kind in (("good/img", "normal"), ("Ungood/img", "abnormal"), ("Ungood/anomaly_mask", "masks")):
        if (split / source).is_dir():
            shutil.move(split / source, folder / kind)
    shutil.rmtree(generated)
    return folder


def _workflow(configs: tuple[str, ...], root: Path, backbone: dict, **overrides) -> ConfigWorkflow:
    """A training workflow of ``configs/<name>.json`` merged in order, in this process."""
    settings = {**backbone, "levels": [1, 2, 3, 4], "num_workers": 0, "batch_size": 4, "eval_batch_size": 8, **overrides}
    return ConfigWorkflow(
        config_file=[str(CONFIGS / f"{name}.json") for name in configs], meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train", bundle_root=str(root),
        **{key: str(value) if isinstance(value, Path) else value for key, value in settings.items()},
    )


def _train(configs: tuple[str, ...], root: Path, backbone: dict, **overrides) -> Path:
    """Run a training workflow to its end; its ``models/model.pt``."""
    workflow = _workflow(configs, root, backbone, **overrides)
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return root / "models" / "model.pt"


def test_sources_in_every_layout(synthetic_bmad, tmp_path):
    knee = _folder_dataset(tmp_path, "knee", normal=2, abnormal=2, seed=5)
    listed = tmp_path / "site_b.json"
    listed.write_text(json.dumps({"test": [{"image": str(p), "label": 0} for p in sorted((knee / "normal").iterdir())]
                                  + [{"image": str(p), "label": 1} for p in sorted((knee / "abnormal").iterdir())]}))
    bmad = str(synthetic_bmad)
    # names under dataset_dir (the target's skipped), paths (named by folder or file), a BMAD folder
    sets = source_sets(synthetic_bmad, "Alpha", ["Alpha", "Beta", str(knee), str(listed), f"{bmad}/Gamma_AD"])
    assert sets == [SourceSet(bmad, "Beta"), SourceSet(str(knee), "knee"), SourceSet(str(listed), "site_b"),
                    SourceSet(bmad, "Gamma")]
    assert source_sets(synthetic_bmad, "Alpha", {"knee MRI": knee}) == [SourceSet(str(knee), "knee MRI")]
    items = source_datalist(synthetic_bmad, "Alpha", {"knee MRI": knee, "Beta": synthetic_bmad})
    assert {item["dataset"] for item in items} == {"knee MRI", "Beta"} and len(items) == 4 + 16
    with pytest.raises(ValueError, match=r"source data set 'knee' \(.*knee\) is the target's own data"):
        source_sets(knee, "knee", [str(knee)])
    with pytest.raises(FileNotFoundError, match="source data set /nonexistent/knee: no such file or folder"):
        source_sets(synthetic_bmad, "Alpha", ["/nonexistent/knee"])
    with pytest.raises(ValueError, match="no source data sets besides the target 'knee' under .*: give sources"):
        source_sets(knee, "knee")


def test_own_data_makes_the_zero_shot_model_that_normal_only_adaptation_starts_from(bundle_backbone, tmp_path):
    source = _folder_dataset(tmp_path / "sources", "knee_mri", normal=6, abnormal=6, seed=1)
    target = _folder_dataset(tmp_path / "target", "knee", normal=8, abnormal=0, seed=2)  # a clinic: normal images only
    zero = _train(("train",), tmp_path / "zero", bundle_backbone, dataset_dir=target, target="knee",
                  sources=[str(source)], epochs=1)
    description = describe(zero)
    assert set(description.datasets) == {"knee_mri", "knee"} and description.target == "knee"

    adapted = _train(("train", "fewshot"), tmp_path / "normal_only", bundle_backbone, dataset_dir=target, target="knee",
                     shot=4, abnormal_shots=0, init_checkpoint=zero)
    weights = bundle_backbone["clip_weights"]
    model, initial = medad.load_detector(adapted, weights), medad.load_detector(zero, weights)
    for name, value in initial.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    assert model.has_memory and model.effective_thresholds().image_rule == "normal_heldout_max"


def test_normal_only_adaptation_starts_from_released_adapters(synthetic_bmad, bundle_backbone, tmp_path):
    torch.manual_seed(3)
    detector = medad.build_detector(["Alpha"], "Alpha", medad.TINY_MODEL_NAME, IMAGE_SIZE, bundle_backbone["clip_weights"],
                                    levels=(1, 2, 3, 4))
    released = {kind: {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
                for kind, state in detector.encoder.adapter_state().items()}  # not what the run would draw itself
    path = tmp_path / "mvfa_adapters.pth"
    torch.save(released, path)
    adapted = _train(("train", "fewshot"), tmp_path / "run", bundle_backbone, dataset_dir=synthetic_bmad, target="Alpha",
                     shot=4, abnormal_shots=0, init_checkpoint=path)
    model = medad.load_detector(adapted, bundle_backbone["clip_weights"])
    for kind, state in model.encoder.adapter_state().items():
        assert all(torch.equal(state[k], released[kind][k]) for k in state), kind
    assert model.has_memory and model.target == "Alpha"


def test_normal_only_inputs_are_refused_before_the_backbone_is_built(
    synthetic_bmad, bundle_backbone, random_fewshot_model, tmp_path, monkeypatch
):
    built = []
    create_clip = medad.model.factory.create_clip
    monkeypatch.setattr(medad.model.factory, "create_clip", lambda *a, **k: built.append(a) or create_clip(*a, **k))
    missing = tmp_path / "zero" / "models" / "model.pt"
    settings = {"dataset_dir": synthetic_bmad, "target": "Alpha", "shot": 4, "abnormal_shots": 0}
    for overrides, line in (
        ({"init_checkpoint": missing}, f"{missing}: model file not found"),
        ({}, "normal-only adaptation (abnormal_shots 0) adapts a trained model without training it: give init_checkpoint"),
    ):
        workflow = _workflow(("train", "fewshot"), tmp_path / "run", bundle_backbone, **settings, **overrides)
        with pytest.raises(Exception) as raised:
            workflow.initialize()
        workflow.finalize()
        summary, user_error = error_summary(raised.value)
        assert summary.startswith(line) and "\n" not in summary and user_error, summary
    assert not built  # refused before the backbone (and the support images)
    with pytest.raises(CheckpointError, match="made for clip_model='medad-tiny', but this run builds 'ViT-L-14-336'"):
        checked_init_checkpoint(random_fewshot_model, 0, "mvfa", "ViT-L-14-336")
    with pytest.raises(ValueError, match="normal-only adaptation takes normal images only, got 1 abnormal"):
        NormalOnlyAdaptation(torch.nn.Identity(), [{"image": "a.png", "label": 1}], IMAGE_SIZE, tmp_path / "m.pt",
                             init_checkpoint=missing).run()
