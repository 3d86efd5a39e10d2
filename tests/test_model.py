"""Network, backbone loading and checkpoint behaviour beyond the golden numbers."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed

import medad


def test_batch_equals_one_image_at_a_time(tiny_detector, golden):
    images = golden["images"]
    with torch.no_grad():
        tiny_detector.build_memory(golden["support_images"])
        batch = tiny_detector.raw_scores(images)
        singles = [tiny_detector.raw_scores(images[i : i + 1]) for i in range(len(images))]
    for field in batch._fields:
        stacked = torch.cat([getattr(single, field) for single in singles])
        torch.testing.assert_close(getattr(batch, field), stacked, rtol=0, atol=1e-5)

    loss = medad.AlignmentLoss()
    tokens = tiny_detector.encoder(images)
    text = tiny_detector.text_features_for()
    batch_losses = loss(tokens.seg, tokens.det, text, golden["masks"], golden["labels"])
    for i in range(len(images)):
        one = tiny_detector.encoder(images[i : i + 1])
        single = loss(one.seg, one.det, text, golden["masks"][i : i + 1], golden["labels"][i : i + 1])
        torch.testing.assert_close(batch_losses.seg[i : i + 1], single.seg, rtol=0, atol=1e-5)
        torch.testing.assert_close(batch_losses.det[i : i + 1], single.det, rtol=0, atol=1e-5)


def test_clip_is_frozen_and_only_adapters_get_gradients(tiny_detector, golden):
    encoder = tiny_detector.encoder.train()
    assert not encoder.visual.training, "the frozen backbone stays in eval mode"
    assert all(not p.requires_grad for p in encoder.visual.parameters())
    tokens = encoder(golden["images"][:2])
    losses = medad.AlignmentLoss()(
        tokens.seg, tokens.det, tiny_detector.text_features_for(), golden["masks"][:2], golden["labels"][:2]
    )
    (losses.seg + losses.det).mean().backward()
    assert all(p.grad is None for p in encoder.visual.parameters())
    trainable = {name for name, p in tiny_detector.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in tiny_detector.named_parameters() if "_adapters." in name}
    assert all(p.grad is not None for name, p in encoder.named_parameters() if "fc1" in name)


def test_state_dict_excludes_backbone_and_round_trips(tiny_detector, golden, tmp_path, tiny_weights, tiny_config):
    with torch.no_grad():
        tiny_detector.build_memory(golden["support_images"])
        tiny_detector.calibrate(golden["images"])
    state = tiny_detector.state_dict()
    assert not any(".visual." in f".{key}" for key in state)
    path = tmp_path / "model.pt"
    torch.save(state, path)

    fresh = medad.build_detector(
        [tiny_config["object"]],
        tiny_config["object"],
        model_name=medad.TINY_MODEL_NAME,
        image_size=tiny_config["image_size"],
        pretrained=tiny_weights["clip"],
        levels=tiny_config["features"],
        checkpoint=path,
    )
    assert fresh.has_memory and fresh.is_calibrated
    with torch.no_grad():
        torch.testing.assert_close(fresh(golden["images"]), tiny_detector(golden["images"]))


def test_released_adapter_checkpoint_round_trip(tiny_detector, tmp_path):
    path = tmp_path / "Brain.pth"
    torch.save(tiny_detector.encoder.adapter_state(), path)
    encoder = tiny_detector.encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.zero_()
    tiny_detector.load_checkpoint(path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_checkpoint_for_another_backbone_is_refused(tiny_detector, tmp_path):
    two_levels = medad.AdaptedVisualTower(open_clip.create_model(medad.TINY_MODEL_NAME, force_image_size=60).visual, levels=(1, 2))
    path = tmp_path / "two_levels.pth"
    torch.save(two_levels.adapter_state(), path)
    with pytest.raises(ValueError, match="do not fit this backbone"):
        tiny_detector.load_checkpoint(path)

    state = tiny_detector.state_dict()
    description = medad.describe(state)
    other = description.replace(backbone=medad.BackboneSpec(description.backbone.model_name, 224))
    state["description"] = medad.model.checkpoint.description_tensor(other)
    torch.save(state, path)
    with pytest.raises(ValueError, match="image_size=224"):
        tiny_detector.load_checkpoint(path)


def test_missing_weights_are_refused_with_instructions(tmp_path):
    with pytest.raises(medad.MissingWeightsError, match="random_init=True"):
        medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=None)
    with pytest.raises(medad.MissingWeightsError, match="ViT-L-14-336px.pt"):
        medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=str(tmp_path / "missing.pt"))
    model = medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=None, random_init=True)
    assert model.visual.grid_size == (4, 4)
    with pytest.raises(ValueError, match="Unknown CLIP architecture 'ViT-L-14-337'"):
        medad.create_clip("ViT-L-14-337", 240, random_init=True)


def test_openai_torchscript_archive_loads_with_resized_positions(tmp_path):
    torch.manual_seed(0)
    # An OpenAI-style archive: a traced CLIP at a larger resolution (6x6 patches).
    source = open_clip.create_model(medad.TINY_MODEL_NAME, force_image_size=84).eval()
    traced = torch.jit.trace(source, (torch.rand(1, 3, 84, 84), torch.randint(0, 49408, (1, 77))), check_trace=False)
    archive = tmp_path / "ViT-tiny.pt"
    traced.save(str(archive))
    assert medad.model.backbone.is_torchscript_archive(archive)

    model = medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=archive)
    expected = dict(source.state_dict())
    resize_pos_embed(expected, model)
    loaded = model.state_dict()
    assert loaded["visual.positional_embedding"].shape == (17, 64)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert not isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_random_backbone_is_the_same_in_every_process_step():
    torch.manual_seed(1)
    first = medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=None, random_init=True)
    torch.manual_seed(2)
    second = medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=None, random_init=True)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    other = medad.create_clip(medad.TINY_MODEL_NAME, 60, pretrained=None, random_init=True, random_init_seed=5)
    assert not torch.equal(other.visual.conv1.weight, first.visual.conv1.weight)


def test_bf16_backbone_matches_fp32(tiny_config, tiny_weights):
    """bf16 weights (open_clip's mixed precision) change maps little and rankings little.

    Measured on this fixture model (seeds 0-2): map differences up to 0.012 (maps range 0-8);
    pixel AUROC differences 0.0012, 0.012 and 0.006 (image AUROC 1.0 in both). The tiny random
    CLIP separates lesions weakly, so near-tied pixels reorder; the bounds are about twice the
    largest measured difference.
    """
    from sklearn.metrics import roc_auc_score

    from medad.model.scoring import FusionRange

    detectors = {
        precision: medad.build_detector(
            [tiny_config["object"]], tiny_config["object"], model_name=medad.TINY_MODEL_NAME, image_size=60,
            pretrained=tiny_weights["clip"], levels=tiny_config["features"], checkpoint=tiny_weights["adapters"],
            precision=precision,
        )
        for precision in ("fp32", "bf16")
    }
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        images = torch.nn.functional.avg_pool2d(torch.rand(24, 3, 60, 60, generator=generator), 5, 1, 2)
        masks = torch.zeros(24, 60, 60, dtype=torch.bool)
        masks[12:, 20:40, 18:38] = True
        images[:, :, 20:40, 18:38] += 0.5 * masks[:, None, 20:40, 18:38]
        labels = masks.flatten(1).any(1).numpy()
        outputs = {}
        for precision, detector in detectors.items():
            with torch.no_grad():
                detector.build_memory(images[:6])
                raw = detector.raw_scores(images)
            ranges = {name: FusionRange.of(getattr(raw, name)) for name in ("zero_map", "few_map", "zero_score", "few_score")}
            fused = detector.finalize(raw, ranges)
            assert roc_auc_score(labels, fused.score.numpy()) > 0.9
            outputs[precision] = (raw, fused)
        (raw32, fused32), (raw16, fused16) = outputs["fp32"], outputs["bf16"]
        assert (raw32.zero_map - raw16.zero_map).abs().max() < 0.02
        assert (raw32.few_map - raw16.few_map).abs().max() < 0.02
        pixel = [roc_auc_score(masks.flatten().numpy(), fused.anomaly_map.flatten().numpy()) for fused in (fused32, fused16)]
        image = [roc_auc_score(labels, fused.score.numpy()) for fused in (fused32, fused16)]
        assert abs(pixel[0] - pixel[1]) <= 0.02 and abs(image[0] - image[1]) <= 0.01, (seed, pixel, image)


@pytest.mark.parametrize("module", ["medad.model.scoring", "medad.model.decision", "medad.model.losses"])
def test_public_functions_show_a_runnable_example(module):
    """Doctests run by discovery (pyproject: ``--doctest-modules`` over ``medad``); this keeps the
    promise that every public function of the method's core modules has one."""
    import doctest
    import importlib
    import inspect

    loaded = importlib.import_module(module)
    with_examples = {test.name.split(".")[-1] for test in doctest.DocTestFinder().find(loaded) if test.examples}
    public = [name for name in loaded.__all__ if inspect.isfunction(getattr(loaded, name))]
    assert public and not [name for name in public if name not in with_examples]


def test_a_coreset_memory_bounds_the_cost_and_states_its_parity(tiny_detector, golden):
    """An approximation, off by default. Measured on this fixture (2 support images x 11, 374
    tokens per level, a random tiny CLIP: little redundancy to drop): half the memory moves the
    few-shot maps by 3.2 % of their range on average (10 % at most) and fused pixel AUROC from
    0.7775 to 0.766; a quarter by 8 % (19 %) and to 0.756."""
    from sklearn.metrics import roc_auc_score

    from medad.model.scoring import FusionRange, coreset_indices

    support = medad.augment_fewshot(golden["support_images"])[0]
    masks = (golden["masks"] > 0.5).flatten().numpy()

    def pixel_auroc(raw: medad.RawScores) -> float:
        ranges = {name: FusionRange.of(getattr(raw, name)) for name in ("zero_map", "few_map", "zero_score", "few_score")}
        return roc_auc_score(masks, tiny_detector.finalize(raw, ranges).anomaly_map.flatten().numpy())

    with torch.no_grad():
        tiny_detector.build_memory(support)
        exact, points = tiny_detector.raw_scores(golden["images"]), tiny_detector.memory_seg[0].clone()
        full = points.shape[0]
        tiny_detector.build_memory(support, memory_size=full // 2)
        reduced = tiny_detector.raw_scores(golden["images"])
    assert tiny_detector.memory_seg.shape[1] == tiny_detector.memory_det.shape[1] == full // 2
    # Fewer memory tokens can only raise the nearest distances.
    assert bool((reduced.few_map >= exact.few_map - 1e-6).all())
    spread = exact.few_map.max() - exact.few_map.min()
    assert float((reduced.few_map - exact.few_map).abs().mean() / spread) <= 0.05
    assert abs(pixel_auroc(reduced) - pixel_auroc(exact)) <= 0.02
    # k-center greedy covers the tokens better than a random subset of the same size, and the
    # stored coreset is exactly those tokens.
    chosen = coreset_indices(points, full // 2)
    assert len(set(chosen.tolist())) == full // 2 and torch.equal(tiny_detector.memory_seg[0], points[chosen])
    radius = lambda index: torch.cdist(points, points[index]).amin(dim=1).max()  # noqa: E731
    assert radius(chosen) < radius(torch.randperm(full, generator=torch.Generator().manual_seed(0))[: full // 2])
