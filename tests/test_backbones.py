"""Backbones beyond ViT-L-14-336 (open_clip ViTs of any depth, timm trunks with Hugging Face text
towers, local-dir: folders) and the paper's baselines (clip, memory) in the same bundle.

Every backbone here is tiny, randomly initialised or saved by the test itself, and offline."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import open_clip
import pytest
import torch
from monai.bundle import ConfigWorkflow
from safetensors.torch import save_file

import medad
from medad.model.network import default_levels
from medad.model.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES
from medad.model.towers import vision_tower
from medad.surfaces.workflow import RunError, error_summary

from helpers import CONFIGS, bundle_command, common, run_bundle, scores_csv_image_auroc, sklearn_set_metrics

pytest.importorskip("transformers", reason="the test extra installs transformers (Hugging Face text towers)")

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}


def run_in_process(run_id: str, names: tuple[str, ...], root: Path, **overrides) -> None:
    """One bundle workflow in this process (where the test's open_clip configs are registered)."""
    kind = "train" if run_id == "training" else "infer"
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f"{name}.json") for name in names],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=kind,
        bundle_root=str(root),
        **{key: str(value) if isinstance(value, Path) else value for key, value in overrides.items()},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def register(folder: Path, name: str, config: dict) -> str:
    """Register an open_clip model config under ``name`` (this process only)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


def write_bert(folder: Path) -> Path:
    """A tiny BERT (hidden 32, 2 layers) config and a WordPiece vocabulary of the prompts' words."""
    words = {"normal", "abnormal", "alpha", "beta", "gamma"}
    for sentence in TEMPLATES + NORMAL_STATES + ABNORMAL_STATES:
        words |= set(sentence.replace("{}", " ").replace(".", " . ").lower().split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(vocab), "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 80,
        "pad_token_id": 0,
    }))
    return folder


@pytest.fixture(scope="module")
def vit12(tmp_path_factory) -> str:
    """An open_clip ViT with 12 blocks (width 32) at its own 112 px."""
    vision = {"image_size": 112, "layers": 12, "width": 32, "head_width": 16, "patch_size": 16}
    return register(tmp_path_factory.mktemp("configs"), "medad-test-vit12", {"embed_dim": 16, "vision_cfg": vision, "text_cfg": TEXT_CFG})


@pytest.fixture(scope="module")
def timm_bert(tmp_path_factory) -> str:
    """timm's 6-block test ViT (width 64, its own size 160 px, run at 112) as vision tower, and a
    Hugging Face BERT from a local folder as text tower, BiomedCLIP's layout."""
    bert = str(write_bert(tmp_path_factory.mktemp("bert")))
    config = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "token",
                       "timm_proj": "linear", "image_size": 112},
        "text_cfg": {"hf_model_name": bert, "hf_tokenizer_name": bert, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 77},
    }
    return register(tmp_path_factory.mktemp("configs"), "medad-test-timm-bert", config)


def random_backbone(name: str) -> dict:
    return {"clip_model": name, "clip_weights": None, "clip_random_init": True}


# ------------------------------------------------------------------ towers, levels, refusals


def test_default_levels_are_four_evenly_spaced_blocks():
    assert default_levels(24) == (6, 12, 18, 24)
    assert default_levels(12) == (3, 6, 9, 12)
    assert default_levels(6) == (1, 3, 4, 6)
    assert default_levels(2) == (1, 2)
    detector = medad.build_detector([], None, model_name=medad.TINY_MODEL_NAME, random_init=True)
    # medad-tiny's own size (240 px) and all four of its blocks, as configs/tiny.json gives them
    assert detector.image_size == 240 and detector.encoder.levels == (1, 2, 3, 4)


@pytest.mark.parametrize("name", ["vit", "timm"])
def test_tower_tokens_match_open_clips_own_intermediates_and_image_embedding(name, vit12, timm_bert):
    """The towers' embedding, blocks and projection against open_clip's and timm's own code:
    the raw tokens at each level are ``forward_intermediates``' outputs, and the projected class
    token after the last block is the CLIP image embedding."""
    model = medad.create_clip(vit12 if name == "vit" else timm_bert, random_init=True)
    tower = vision_tower(model.visual)
    depth = len(tower.blocks)
    images = torch.rand(2, 3, 112, 112)
    raw = medad.BackboneTokens(model.visual, projected=False)
    with torch.no_grad():
        tokens = raw(images).seg
        reference = model.visual.forward_intermediates(
            images, indices=[level - 1 for level in raw.levels], intermediates_only=True, output_fmt="NLC",
            output_extra_tokens=True,
        )
        projected = medad.BackboneTokens(model.visual, levels=[depth], projected=True)(images).seg[0]
        embedding = model.encode_image(images)
    assert raw.levels == default_levels(depth) and tower.grid_size == (7, 7)
    for level, prefix, patches in zip(tokens, reference["image_intermediates_prefix"], reference["image_intermediates"]):
        torch.testing.assert_close(level, torch.cat([prefix[:, :1], patches], dim=1), rtol=1e-5, atol=1e-5)
    assert projected.shape == (2, 1 + 49, 16)
    torch.testing.assert_close(projected[:, 0], embedding, rtol=1e-5, atol=1e-5)


def test_a_timm_trunk_with_register_tokens_scores_its_first_prefix_token_and_the_patches():
    import timm

    visual = open_clip.timm_model.TimmModel("test_vit", embed_dim=16, pool="token")
    visual.trunk = timm.create_model("test_vit", num_classes=0, reg_tokens=2).eval()  # class + 2 registers
    visual.eval()
    encoder = medad.AdaptedVisualTower(visual, levels=[2])
    images = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        seg = encoder(images).seg[0]
        stream = visual.trunk.forward_intermediates(images, indices=[1], intermediates_only=True, output_fmt="NLC",
                                                    return_prefix_tokens=True)[0]
        expected = encoder.seg_adapters[0].fc1(torch.cat([stream[1][:, :1], stream[0]], dim=1))
    assert encoder.tower.prefix_tokens == 3 and seg.shape == (1, 1 + 100, 16)
    torch.testing.assert_close(seg, expected, rtol=1e-5, atol=1e-5)


def test_convolutional_towers_are_refused_naming_the_model(tmp_path):
    with pytest.raises(ValueError, match="RN50: its vision tower is a convolutional ModifiedResNet"):
        medad.build_detector([], None, model_name="RN50", random_init=True)
    vision = {"timm_model_name": "test_convnext", "timm_pool": "avg", "timm_proj": "linear", "image_size": 64}
    name = register(tmp_path, "medad-test-convnext", {"embed_dim": 16, "vision_cfg": vision, "text_cfg": TEXT_CFG})
    with pytest.raises(ValueError, match="medad-test-convnext: its timm vision trunk is a ConvNeXt"):
        medad.build_detector([], None, model_name=name, random_init=True)


def test_folder_names_bring_their_own_weights(tmp_path):
    with pytest.raises(ValueError, match="Cannot read the open_clip config of 'local-dir:"):
        medad.create_clip(f"local-dir:{tmp_path}", random_init=True)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(
        (Path(medad.__file__).parent / "model_configs" / "medad-tiny.json").read_text())}))
    with pytest.raises(ValueError, match="come with it, but clip_weights 'openai' was given"):
        medad.create_clip(f"local-dir:{tmp_path}", pretrained="openai")
    with pytest.raises(medad.MissingWeightsError, match=f"local-dir:{tmp_path}"):
        medad.create_clip(f"local-dir:{tmp_path}")  # a folder without weights


def test_hf_hub_names_are_open_clips_to_resolve_here_from_the_hugging_face_cache(local_dir_model, tmp_path, monkeypatch):
    """An ``hf-hub:`` model as the Hub's cache holds it after a download (no network here)."""
    import huggingface_hub.constants

    revision = "0" * 40
    repository = tmp_path / "models--medad--tiny-clip"
    (repository / "snapshots" / revision).mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    for file in Path(local_dir_model.removeprefix("local-dir:")).iterdir():
        (repository / "snapshots" / revision / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    detector = medad.build_detector(["Alpha"], "Alpha", model_name="hf-hub:medad/tiny-clip")
    reference = open_clip.create_model(local_dir_model)
    assert detector.clip_weights == "with-model-name" and detector.image_size == 112
    assert torch.equal(detector.encoder.visual.conv1.weight, reference.visual.conv1.weight)


# ------------------------------------------------------------------ backbones through the bundle


def assert_metrics_are_sklearns(metrics: dict, detector: medad.MVFADetector, dataset_dir: Path, scores_csv: Path) -> None:
    """metrics.json against scikit-learn on the model's outputs computed here (fused over the
    test set as the paper does) and on the evaluation's scores.csv rows."""
    expected = sklearn_set_metrics(detector, dataset_dir, "Alpha")
    assert metrics["val_image_auroc"] == pytest.approx(expected["image_auroc"], abs=1e-6), (metrics, expected)
    assert metrics["val_image_auroc"] == pytest.approx(scores_csv_image_auroc(scores_csv), abs=1e-6)
    # the pixel AUROC is streamed over 2**20 bins of the map's range: within 1e-4 of sklearn's
    assert metrics["val_pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-4), (metrics, expected)


def _fewshot_then_evaluate(dataset_dir: Path, root: Path, backbone: dict) -> tuple[medad.ModelDescription, dict]:
    settings = {**common(dataset_dir, backbone), "image_size": None, "levels": None}
    run_in_process("training", ("train", "fewshot"), root, shot=2, epochs=1, **settings)
    run_in_process("evaluating", ("train", "fewshot", "evaluate"), root, shot=2, **settings)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    return medad.describe(root / "models" / "model.pt"), metrics


def test_a_12_block_open_clip_vit_trains_few_shot_and_evaluates(synthetic_bmad, vit12, tmp_path):
    description, metrics = _fewshot_then_evaluate(synthetic_bmad, tmp_path, random_backbone(vit12))
    assert description.levels == (3, 6, 9, 12) and description.backbone.image_size == 112
    assert description.method == "mvfa" and description.clip_weights == "random"
    detector = medad.load_detector(tmp_path / "models" / "model.pt")
    assert_metrics_are_sklearns(metrics, detector, synthetic_bmad, tmp_path / "eval" / "scores.csv")
    assert detector.encoder.seg_adapters[0].fc1[0].weight.shape == (16, 32)  # embed x width
    assert detector.has_memory and detector.is_calibrated


def test_a_timm_trunk_with_a_hugging_face_text_tower_trains_few_shot_and_evaluates(synthetic_bmad, timm_bert, tmp_path):
    assert type(open_clip.get_tokenizer(timm_bert)).__name__ == "HFTokenizer"
    description, metrics = _fewshot_then_evaluate(synthetic_bmad, tmp_path, random_backbone(timm_bert))
    assert description.levels == (1, 3, 4, 6) and description.backbone.image_size == 112
    detector = medad.load_detector(tmp_path / "models" / "model.pt")
    assert_metrics_are_sklearns(metrics, detector, synthetic_bmad, tmp_path / "eval" / "scores.csv")
    assert detector.encoder.seg_adapters[0].fc1[0].weight.shape == (16, 64)
    assert detector.encoder.grid_size == (7, 7)


@pytest.fixture(scope="module")
def local_dir_model(tmp_path_factory) -> str:
    """A ``local-dir:`` folder as open_clip and the Hugging Face Hub lay it out: the config and
    the weights of a tiny open_clip ViT (6 blocks, 112 px)."""
    folder = tmp_path_factory.mktemp("local_clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 112, "layers": 6, "width": 32, "head_width": 16,
                                              "patch_size": 16}, "text_cfg": TEXT_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    torch.manual_seed(3)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


def test_a_local_dir_model_trains_evaluates_and_infers_with_the_weights_of_its_folder(synthetic_bmad, local_dir_model, tmp_path):
    settings = {**common(synthetic_bmad, {"clip_model": local_dir_model, "clip_weights": None})}
    run_bundle("training", ("train", "fewshot"), tmp_path, shot=2, epochs=1, **settings)
    description = medad.describe(tmp_path / "models" / "model.pt")
    assert description.clip_weights == "with-model-name" and description.levels == (1, 3, 4, 6)
    assert description.backbone == medad.BackboneSpec(local_dir_model, 112, False)
    run_bundle("evaluating", ("train", "fewshot", "evaluate"), tmp_path, shot=2, **settings)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    samples = tmp_path / "samples"
    samples.mkdir()
    for source in sorted((synthetic_bmad / "Alpha_AD" / "test" / "Ungood" / "img").glob("*.png"))[:2]:
        (samples / source.name).write_bytes(source.read_bytes())
    # The model file names its backbone folder; medad opens it only where the user names it too.
    refused = subprocess.run(bundle_command("inferring", ("inference",), tmp_path, num_workers=0),
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "a model file cannot make medad open folders of its choosing" in refused.stderr
    run_bundle("inferring", ("inference",), tmp_path, num_workers=0, clip_model=local_dir_model)
    assert len((tmp_path / "outputs" / "scores.csv").read_text().splitlines()) == 3
    # The adapters mean nothing on other weights: the folder's own weights are used, not a given file.
    detector = medad.load_detector(tmp_path / "models" / "model.pt", trust_model_paths=True)
    reference = open_clip.create_model(local_dir_model)
    assert torch.equal(detector.encoder.visual.conv1.weight, reference.visual.conv1.weight)
    assert_metrics_are_sklearns(metrics, detector, synthetic_bmad, tmp_path / "eval" / "scores.csv")


# ------------------------------------------------------------------ baselines through the bundle


def test_baselines_build_without_training_and_evaluate_through_the_bundle(synthetic_bmad, bundle_backbone, tmp_path):
    settings = common(synthetic_bmad, {**bundle_backbone, "levels": [1, 2, 3, 4]})
    clip, memory = tmp_path / "clip", tmp_path / "memory"
    run_in_process("training", ("train",), clip, epochs=1, method="clip", **settings)
    run_in_process("training", ("train", "fewshot"), memory, shot=2, epochs=1, method="memory", **settings)
    for root, method in ((clip, "clip"), (memory, "memory")):
        saved = torch.load(root / "models" / "model.pt", weights_only=True)
        assert medad.describe(saved).method == method
        assert not any("adapters" in key for key in saved)  # nothing trained, nothing stored
        assert not list((root / "models").glob("resume_*.pt"))  # no epoch ran
        run_in_process("evaluating", ("train", *(["fewshot"] if method == "memory" else []), "evaluate"), root,
                       **({"shot": 2} if method == "memory" else {}), **settings)

    clip_detector = medad.load_detector(clip / "models" / "model.pt", bundle_backbone["clip_weights"])
    memory_detector = medad.load_detector(memory / "models" / "model.pt", bundle_backbone["clip_weights"])
    for root, detector in ((clip, clip_detector), (memory, memory_detector)):
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        assert_metrics_are_sklearns(metrics, detector, synthetic_bmad, root / "eval" / "scores.csv")
    assert clip_detector.method.name == "clip" and not clip_detector.has_memory
    assert memory_detector.method.name == "memory" and memory_detector.has_memory and memory_detector.is_calibrated
    # The memory is the backbone's own tokens: 2 normal images x 11 augmentations x (1 + 8 x 8) tokens of width 64.
    assert memory_detector.memory_seg.shape == (4, 2 * 11 * 65, 64)
    # The memory baseline's map is MVFA's fusion with a zero text part: half the min-max memory distance.
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        raw = memory_detector.raw_scores(images)
        final = memory_detector.predict(images)
    ranges = memory_detector.calibrated_ranges()
    assert torch.count_nonzero(raw.zero_map) == 0
    torch.testing.assert_close(final.anomaly_map, 0.5 * ranges["few_map"].normalise(raw.few_map))


def test_the_method_is_checked_and_read_from_the_model_file(synthetic_bmad, bundle_backbone, tmp_path):
    settings = common(synthetic_bmad, {**bundle_backbone, "levels": [1, 2, 3, 4]})
    # MONAI's config parser wraps medad's RunError; the bundle's last line is the RunError's text.
    with pytest.raises(RuntimeError) as raised:
        run_in_process("training", ("train",), tmp_path / "unknown", method="patchcore", **settings)
    assert any(isinstance(e, RunError) for e in (raised.value, raised.value.__cause__))
    assert error_summary(raised.value)[0] == f"method must be one of {list(medad.METHODS)}, got 'patchcore'"
    assert list(medad.METHODS)[:3] == ["mvfa", "clip", "memory"]
    with pytest.raises(RuntimeError) as raised:
        run_in_process("training", ("train",), tmp_path / "zero_memory", method="memory", **settings)
    assert error_summary(raised.value)[0].startswith("the memory baseline is a few-shot memory bank: it needs support images")
    root = tmp_path / "clip"
    run_in_process("training", ("train",), root, method="clip", **settings)
    # evaluate.json leaves method to the model file; a contradicting value is refused (a user error:
    # the bundle command would end with this line and exit status 1, as the other refusals show)
    with pytest.raises(RuntimeError) as raised:
        run_in_process("evaluating", ("train", "evaluate"), root, method="memory", **settings)
    summary, user_error = error_summary(raised.value)
    assert "was made for method='clip', but method='memory' was given" in summary and user_error, summary


def test_winclip_builds_and_evaluates_through_the_bundle(synthetic_bmad, bundle_backbone, tmp_path):
    settings = common(synthetic_bmad, {**bundle_backbone, "levels": None})  # WinCLIP reads the last block
    root = tmp_path / "winclip"
    run_in_process("training", ("train", "fewshot"), root, shot=2, epochs=1, method="winclip", **settings)
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    assert medad.describe(saved).method == "winclip" and medad.describe(saved).levels == (4,)
    assert not list((root / "models").glob("resume_*.pt"))  # nothing trained: no epoch ran
    run_in_process("evaluating", ("train", "fewshot", "evaluate"), root, shot=2, **settings)

    detector = medad.load_detector(root / "models" / "model.pt", bundle_backbone["clip_weights"])
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert_metrics_are_sklearns(metrics, detector, synthetic_bmad, root / "eval" / "scores.csv")
    assert detector.method.name == "winclip" and detector.has_memory
    # Its memory: 2 normal images x 11 augmentations x the 8 x 8 patches, the 7 x 7 windows of 2 x 2
    # and the 6 x 6 windows of 3 x 3, each projected to the tiny CLIP's 32-wide joint space.
    shapes = {name: tuple(getattr(detector, f"memory_{name}").shape) for name in detector.memory_names}
    assert shapes == {"patch": (22 * 64, 32), "window2": (22 * 49, 32), "window3": (22 * 36, 32)}
    # WinCLIP's few-shot answer is the mean of its zero- and few-shot parts (no min-max fusion).
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        raw, final = detector.raw_scores(images), detector.predict(images)
    torch.testing.assert_close(final.anomaly_map, 0.5 * (raw.zero_map + raw.few_map))
    torch.testing.assert_close(final.score, 0.5 * (raw.zero_score + raw.few_score))
