"""WinCLIP (medad.model.winclip): its equations against oracles written from the paper's definitions
(explicit loops), its encoder against the open_clip tower run by hand, and the method's zero-
and few-shot scores; then the method through the detector, the model file and back.

Everything runs on the CPU with the seeded random tiny CLIP, offline."""

from __future__ import annotations

import copy

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import medad
from medad.model.towers import vision_tower
from medad.model.winclip import (
    WinCLIP,
    WindowEncoder,
    anomaly_probability,
    harmonic_aggregation,
    harmonic_mean,
    visual_association,
    window_indices,
)

from helpers import IMAGE_SIZE

GRID = IMAGE_SIZE // 14  # the tiny CLIP's 14 px patches: an 8 x 8 grid at 112 px


# ---------------------------------------------------------------------------- oracles


def windows_by_loops(rows: int, cols: int, k: int) -> list[list[int]]:
    """Each k x k window (stride 1, row-major by its top-left patch): its row-major patch indices."""
    return [
        [(top + i) * cols + (left + j) for i in range(k) for j in range(k)]
        for top in range(rows - k + 1)
        for left in range(cols - k + 1)
    ]


def harmonic_by_loops(scores: torch.Tensor, rows: int, cols: int, k: int) -> torch.Tensor:
    """The paper's harmonic aggregation: each patch, n / sum(1 / s) over the n windows holding it."""
    windows = windows_by_loops(rows, cols, k)
    out = torch.zeros(scores.shape[0], rows, cols, dtype=torch.float64)
    for b in range(scores.shape[0]):
        for patch in range(rows * cols):
            covering = [float(scores[b, w]) for w, members in enumerate(windows) if patch in members]
            out[b, patch // cols, patch % cols] = len(covering) / sum(1 / s for s in covering)
    return out


def probability_by_hand(embedding: torch.Tensor, text: torch.Tensor, temperature: float) -> float:
    """exp(cos_a / T) / (exp(cos_n / T) + exp(cos_a / T)), cosines from dot products and norms."""
    e = [float(v) for v in embedding]

    def cos(column: int) -> float:
        t = [float(v) for v in text[:, column]]
        return sum(a * b for a, b in zip(e, t)) / math.sqrt(sum(a * a for a in e) * sum(b * b for b in t))

    normal, anomalous = math.exp(cos(0) / temperature), math.exp(cos(1) / temperature)
    return anomalous / (normal + anomalous)


def association_by_loops(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """min over references of (1 - cosine) / 2, for every query of every image."""
    out = torch.zeros(queries.shape[:2], dtype=torch.float64)
    for b in range(queries.shape[0]):
        for n in range(queries.shape[1]):
            q = queries[b, n].double()
            out[b, n] = min((1 - float(q @ r.double() / (q.norm() * r.double().norm()))) / 2 for r in references)
    return out


# ---------------------------------------------------------------------------- pure functions


def test_windows_of_a_15x15_grid():
    small, middle = window_indices((15, 15), 2), window_indices((15, 15), 3)
    assert small.shape == (196, 4) and middle.shape == (169, 9)  # 14 * 14 and 13 * 13 windows
    assert small.tolist() == windows_by_loops(15, 15, 2)
    assert middle.tolist() == windows_by_loops(15, 15, 3)
    assert window_indices((5, 7), 3).tolist() == windows_by_loops(5, 7, 3)  # not square
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((2, 5), 3)


@pytest.mark.parametrize(("rows", "cols", "k"), [(15, 15, 2), (15, 15, 3), (5, 7, 2), (4, 6, 3)])
def test_harmonic_aggregation_is_the_papers_definition(rows, cols, k):
    count = (rows - k + 1) * (cols - k + 1)
    scores = torch.rand(2, count, generator=torch.Generator().manual_seed(rows * k)) + 0.01
    got = harmonic_aggregation(scores, (rows, cols), k)
    torch.testing.assert_close(got.double(), harmonic_by_loops(scores, rows, cols, k), rtol=1e-5, atol=1e-7)


def test_a_zero_window_score_zeroes_the_patches_it_covers():
    scores = torch.ones(1, 9)
    scores[0, 4] = 0.0  # the centre 2 x 2 window of a 4 x 4 grid: patches (1..2, 1..2)
    got = harmonic_aggregation(scores, (4, 4), 2)[0]
    expected = torch.ones(4, 4)
    expected[1:3, 1:3] = 0
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="window scores"):
        harmonic_aggregation(torch.ones(1, 8), (4, 4), 2)


def test_harmonic_mean_of_scales():
    a, b, c = torch.tensor([0.2, 1.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.8, 0.0])
    torch.testing.assert_close(harmonic_mean([a, b, c]), torch.tensor([3 / (5 + 2 + 1.25), 0.0]))


def test_class_probability_by_hand():
    generator = torch.Generator().manual_seed(3)
    embeddings, text = torch.randn(2, 5, 16, generator=generator), torch.randn(16, 2, generator=generator)
    got = anomaly_probability(embeddings, text, temperature=0.07)
    expected = [[probability_by_hand(embeddings[b, n], text, 0.07) for n in range(5)] for b in range(2)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert got.dtype == torch.float32


def test_visual_association_by_loops():
    generator = torch.Generator().manual_seed(4)
    queries, references = torch.randn(2, 6, 8, generator=generator), torch.randn(11, 8, generator=generator)
    memory = F.normalize(references, dim=-1)
    expected = association_by_loops(queries, references)
    for chunk in (4096, 3):  # chunked scans give the same
        torch.testing.assert_close(visual_association(queries, memory, chunk=chunk).double(), expected, rtol=1e-5, atol=1e-6)
    same = visual_association(memory[None, :4] * 3.0, memory)  # a query that is a reference: exactly 0 or more
    assert (same >= 0).all() and same.max() < 1e-6


# ---------------------------------------------------------------------------- the encoder


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return medad.create_clip(medad.TINY_MODEL_NAME, image_size=IMAGE_SIZE, random_init=True)


@pytest.fixture(scope="module")
def encoder(clip) -> WindowEncoder:
    return WinCLIP().build_encoder(vision_tower(clip.visual), None, torch.float32)


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def tower_by_hand(visual, images: torch.Tensor, keep: list[int] | None = None) -> torch.Tensor:
    """open_clip's tower step by step: patchify, class token, positions, pre-norm; ``keep``: only
    the class token and those patches go on through the blocks; ln_post and proj on every token."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    if keep is not None:
        x = x[:, [0] + [1 + patch for patch in keep]]
    for block in visual.transformer.resblocks:
        x = block(x)
    return visual.ln_post(x) @ visual.proj


def test_encoder_outputs_match_the_tower_run_by_hand(clip, encoder):
    x = images(2, 1)
    with torch.no_grad():
        out = encoder(x)
        assert out.image.shape == (2, 32) and out.patches.shape == (2, GRID * GRID, 32)
        assert [w.shape for w in out.windows] == [(2, 49, 32), (2, 36, 32)]  # 7 * 7 and 6 * 6 windows of 8 x 8
        assert all(t.dtype == torch.float32 for t in (out.image, out.patches, *out.windows))
        full = tower_by_hand(clip.visual, x)
        torch.testing.assert_close(out.image, full[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.image, clip.visual(x), rtol=1e-4, atol=1e-5)  # CLIP's image embedding
        torch.testing.assert_close(out.patches, full[:, 1:], rtol=1e-4, atol=1e-5)
        for s, k in enumerate((2, 3)):
            side = GRID - k + 1
            for top, left in ((0, 0), (2, 5), (side - 1, side - 1)):
                members = [(top + i) * GRID + left + j for i in range(k) for j in range(k)]
                by_hand = tower_by_hand(clip.visual, x, keep=members)[:, 0]
                torch.testing.assert_close(out.windows[s][:, top * side + left], by_hand, rtol=1e-4, atol=1e-5)
        again = encoder.adapt(encoder.trunk(x))  # forward = adapt(trunk(x))
        for got, expected in zip((again.image, again.patches, *again.windows), (out.image, out.patches, *out.windows)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert encoder.state_dict() == {} and encoder.levels == (4,) and encoder.token_dim == 32


def test_encoder_needs_no_grad_and_batches_windows(clip, encoder):
    x = images(3, 2)
    out = encoder(x)  # outside no_grad: nothing records a graph
    assert not any(t.requires_grad for t in (out.image, out.patches, *out.windows))
    small = WindowEncoder(clip.visual, window_batch=10)  # windows run 10 sequences at a time
    for got, expected in zip(small(x).windows, out.windows):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_encoder_levels_and_scales(clip):
    assert WindowEncoder(clip.visual, [4]).levels == (4,)
    with pytest.raises(ValueError, match=r"last block only.*\[4\]"):
        WindowEncoder(clip.visual, (1, 2, 3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        WindowEncoder(clip.visual, scales=(9,))


def test_encoder_in_bf16_keeps_float32_embeddings(clip, encoder):
    x = images(1, 3)
    half = WindowEncoder(copy.deepcopy(clip.visual), matmul_dtype=torch.bfloat16)  # lowers its blocks in place
    with torch.no_grad():
        got, expected = half(x), encoder(x)
    assert all(t.dtype == torch.float32 for t in (got.image, got.patches, *got.windows))
    assert F.cosine_similarity(got.image, expected.image).min() > 0.99
    with pytest.raises(ValueError, match="another tower lowered them in place"):
        WindowEncoder(half.visual)  # a float32 tower over those bf16 blocks would fail at its first product


# ---------------------------------------------------------------------------- the method's scores


def scoring_detector(encoder: WindowEncoder, memory: dict | None = None) -> SimpleNamespace:
    """What WinCLIP reads of a detector: its encoder, text features, memory buffers."""
    text = F.normalize(torch.randn(32, 2, generator=torch.Generator().manual_seed(5)), dim=0)
    detector = SimpleNamespace(encoder=encoder, text_features_for=lambda: text, has_memory=bool(memory))
    for name, value in (memory or WinCLIP().empty_memory(encoder)).items():
        setattr(detector, f"memory_{name}", value)
    return detector


def test_zero_shot_scores_by_hand(encoder):
    method, x = WinCLIP(), images(2, 6)
    detector = scoring_detector(encoder)
    with torch.no_grad():
        tokens = encoder(x)
        raw = method.score_tokens(detector, tokens, GRID)  # at the grid's size: the grid map itself
    text = detector.text_features_for()
    assert raw.few_map is None and raw.few_score is None
    image = torch.tensor([probability_by_hand(tokens.image[b], text, 0.07) for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(raw.zero_score.double(), image, rtol=1e-4, atol=1e-6)
    scales = [image[:, None, None].expand(2, GRID, GRID)]
    for k, windows in zip((2, 3), tokens.windows):
        probabilities = torch.tensor([[probability_by_hand(w, text, 0.07) for w in row] for row in windows])
        scales.append(harmonic_by_loops(probabilities, GRID, GRID, k))
    expected = 3 / sum(1 / s for s in scales)
    torch.testing.assert_close(raw.zero_map.double(), expected, rtol=1e-4, atol=1e-6)
    final = method.finalize(detector, raw, None)
    assert final.anomaly_map is raw.zero_map and final.score is raw.zero_score
    upsampled = method.score_tokens(detector, tokens, IMAGE_SIZE).zero_map
    assert upsampled.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert upsampled.min() >= raw.zero_map.min() and upsampled.max() <= raw.zero_map.max()  # bilinear keeps the range


def test_few_shot_scores_by_hand(encoder):
    method, support, queries = WinCLIP(), images(2, 7), images(2, 8)
    with torch.no_grad():
        memory = method.memory_from([encoder(support[:1]), encoder(support[1:])])
        tokens = encoder(queries)
    assert {name: tuple(value.shape) for name, value in memory.items()} == {
        "patch": (2 * 64, 32), "window2": (2 * 49, 32), "window3": (2 * 36, 32)
    }
    assert set(memory) == set(method.empty_memory(encoder))
    detector = scoring_detector(encoder, memory)
    raw = method.score_tokens(detector, tokens, GRID)
    with torch.no_grad():
        reference = encoder(support)
    scales = [association_by_loops(tokens.patches, reference.patches.flatten(0, 1)).view(2, GRID, GRID)]
    for s, k in enumerate((2, 3)):
        association = association_by_loops(tokens.windows[s], reference.windows[s].flatten(0, 1))
        scales.append(harmonic_by_loops(association, GRID, GRID, k))
    few = sum(scales) / 3
    torch.testing.assert_close(raw.few_map.double(), few, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(raw.few_score.double(), few.flatten(1).amax(1), rtol=1e-4, atol=1e-6)
    final = method.finalize(detector, raw, None)
    torch.testing.assert_close(final.anomaly_map, (raw.zero_map + raw.few_map) / 2)
    torch.testing.assert_close(final.score, (raw.zero_score + raw.few_score) / 2)
    # a support image scored against its own memory: every patch and window is a reference
    own = method.score_tokens(detector, reference, IMAGE_SIZE)
    assert (own.few_map >= 0).all() and own.few_map.max() < 1e-5 and own.few_score.max() < 1e-5
    # every map within the method's [0, 1]
    final = method.finalize(detector, method.score_tokens(detector, tokens, IMAGE_SIZE), None)
    low, high = method.map_scale(1, True)
    for values in (final.anomaly_map, final.score, own.zero_map):
        assert low <= values.min() and values.max() <= high


def test_memory_size_keeps_a_coreset_per_buffer(encoder):
    with torch.no_grad():
        outputs = [encoder(images(2, 9))]
    memory = WinCLIP().memory_from(outputs, memory_size=20)
    assert {name: tuple(value.shape) for name, value in memory.items()} == {name: (20, 32) for name in memory}
    torch.testing.assert_close(memory["window3"].norm(dim=-1), torch.ones(20))


def test_registered():
    from medad.model.methods import METHODS, get_method

    method = get_method("winclip")
    assert isinstance(method, WinCLIP) and METHODS["winclip"] is method
    assert (method.label, method.trained, method.scores_text, method.takes_memory) == ("WinCLIP", False, True, True)
    assert not method.needs_support and method.map_scale(4, False) == (0.0, 1.0)


# ---------------------------------------------------------------------------- through the detector


def winclip_detector(**options) -> medad.MVFADetector:
    torch.manual_seed(0)
    return medad.build_detector(
        ["Brain"], "Brain", model_name=medad.TINY_MODEL_NAME, image_size=IMAGE_SIZE, random_init=True, method="winclip",
        **options,
    ).eval()


def test_detector_zero_shot():
    detector = winclip_detector()
    assert isinstance(detector.encoder, WindowEncoder) and detector.encoder.levels == (4,)
    assert {name: tuple(buffer.shape) for name, buffer in detector.named_buffers() if name.startswith("memory_")} == {
        "memory_patch": (0, 32), "memory_window2": (0, 32), "memory_window3": (0, 32)
    }
    assert not detector.has_memory and detector.map_scale() == (0.0, 1.0)
    x = images(3, 10)
    with torch.no_grad():
        final, tokens = detector.predict(x), detector.encoder(x)
    assert final.anomaly_map.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and final.score.shape == (3,)
    torch.testing.assert_close(final.score, anomaly_probability(tokens.image, detector.text_features_for()))
    assert 0 <= final.anomaly_map.min() and final.anomaly_map.max() <= 1
    with pytest.raises(ValueError, match="last block only"):
        winclip_detector(levels=(1, 2, 3, 4))


def test_detector_few_shot_save_load_and_compile(tmp_path):
    from medad.model.checkpoint import save_model

    detector, support, x = winclip_detector(), images(2, 11), images(3, 12)
    with torch.no_grad():
        detector.build_memory(support, batch_size=1)
        detector.calibrate(images(4, 13), labels=torch.tensor([0, 0, 1, 1]))
        raw, final = detector.raw_scores(x), detector.predict(x)
    assert detector.has_memory and detector.memory_patch.shape == (2 * GRID * GRID, 32)
    assert detector.memory_window2.shape == (2 * 49, 32) and detector.memory_window3.shape == (2 * 36, 32)
    torch.testing.assert_close(final.anomaly_map, (raw.zero_map + raw.few_map) / 2)
    torch.testing.assert_close(final.score, (raw.zero_score + raw.few_score) / 2)
    assert 0 <= final.anomaly_map.min() and final.anomaly_map.max() <= 1
    save_model(detector, tmp_path / "model.pt")
    loaded = medad.load_detector(tmp_path / "model.pt")
    assert loaded.method is detector.method and loaded.has_memory
    with torch.no_grad():
        again = loaded.predict(x)
    torch.testing.assert_close(again.anomaly_map, final.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(again.score, final.score, rtol=0, atol=0)
    loaded.compile_paths(backend="eager")  # graph capture of trunk, adapt and scoring (no code generation)
    with torch.no_grad():
        compiled = loaded.predict(x)
    torch.testing.assert_close(compiled.anomaly_map, final.anomaly_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.score, final.score, rtol=1e-5, atol=1e-6)
