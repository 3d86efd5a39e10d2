"""Exports with the whole answer (issue 30): ONNX and OpenVINO IR graphs of a few-shot detector
return the final map, the image score and the raw scores within 1e-4 of PyTorch float32 (float32
kernels of other libraries: sums in another order, measured ~1e-6); the thresholds and the map's
display range live in ``model.json`` beside the graph; ``runtime`` runs them through
:func:`medad.predict_input` and the bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medad
from medad.io.ledger import MANIFEST_NAME
from medad.model.decision import Thresholds
from medad.surfaces.deploy import (
    RuntimeDetector,
    WholeAnswer,
    export_detector,
    export_metadata,
    output_names,
    read_metadata,
    runtime_network,
    state_sha256,
)

from helpers import CONFIGS, run_bundle_here, run_bundle_in_process

pytest.importorskip("onnxruntime", reason="the exports need onnx, onnxruntime and onnxscript (medad[test])")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (medad[test])")
pytest.importorskip("openvino", reason="the OpenVINO export needs openvino (medad[test])")

#: Exported graphs against PyTorch float32: the same float32 arithmetic in other kernels.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def detector(random_fewshot_model) -> medad.MVFADetector:
    """The few-shot tiny model (memory bank, calibration, support-F1 thresholds) at 112 px."""
    return medad.load_detector(random_fewshot_model)


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory) -> Path:
    """Both graphs of ``detector`` in one folder, exported once."""
    return export_detector(detector, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Three images (another batch size than the export's example of two)."""
    return torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_map_score_and_raw_scores_match_pytorch_float32(detector, exported, images, runtime):
    with torch.no_grad():
        expected = WholeAnswer(detector)(images)
    network = runtime_network(detector, "cpu", runtime, export_dir=exported)
    assert isinstance(network, RuntimeDetector)
    final, raw = network.predict(images), network.raw_scores(images[:1])  # batch 1 too
    assert final.anomaly_map.shape == (3, 112, 112) and final.score.shape == (3,)
    assert (final.anomaly_map - expected[0]).abs().max().item() <= TOLERANCE
    assert (final.score - expected[1]).abs().max().item() <= TOLERANCE
    names = output_names(detector)[2:]
    assert names == ("zero_map", "zero_score", "few_map", "few_score")  # the memory bank is in the graph
    for name, value in zip(names, expected[2:]):
        assert (getattr(raw, name) - value[:1]).abs().max().item() <= TOLERANCE, name


def test_metadata_round_trip_decides_as_pytorch(detector, exported, images):
    """``model.json`` holds what the detector decides with; applied by hand to the ONNX scores
    (no medad involved), it gives PyTorch's decisions."""
    metadata = read_metadata(exported)
    assert metadata == export_metadata(detector)
    thresholds = detector.effective_thresholds()
    assert metadata["thresholds"]["image"] == thresholds.image and metadata["thresholds"]["image_rule"] == "support_f1"
    assert metadata["thresholds"]["pixel"] == thresholds.pixel
    assert metadata["map_scale"] == list(detector.map_scale())
    assert metadata["model_sha256"] == state_sha256(detector)
    assert metadata["outputs"] == list(output_names(detector))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == metadata["outputs"]
    scores = session.run(["score"], {"image": images.numpy()})[0]
    with torch.no_grad():
        expected = detector.predict(images).score
    assert ((scores >= metadata["thresholds"]["image"]) == (expected >= thresholds.image).numpy()).all()


def test_metadata_that_is_not_an_export_is_refused_naming_the_file(tmp_path):
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'model.json'}: not JSON"):
        read_metadata(tmp_path)
    (tmp_path / "model.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="not a medad export's metadata of format 1"):
        read_metadata(tmp_path)


def test_a_current_export_is_reused_and_another_model_is_exported_again(detector, exported, tmp_path):
    onnx = exported / "model.onnx"
    before = onnx.stat().st_mtime_ns
    runtime_network(detector, "cpu", "onnxruntime", export_dir=exported)
    assert onnx.stat().st_mtime_ns == before
    folder = tmp_path / "stale"
    folder.mkdir()
    for name in ("model.onnx", "model.json"):
        (folder / name).write_bytes((exported / name).read_bytes())
    metadata = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**metadata, "model_sha256": "0" * 64}))
    runtime_network(detector, "cpu", "onnxruntime", export_dir=folder)
    assert read_metadata(folder)["model_sha256"] == state_sha256(detector)


def test_runtime_through_predict_input(detector, exported, tmp_path):
    gray = (np.linspace(0, 1, 150)[None, :] * np.linspace(0.3, 1, 130)[:, None] * 255).astype(np.uint8)
    path = tmp_path / "scan.png"
    Image.fromarray(gray).save(path)
    reference = medad.predict_input(detector, path)
    for runtime in ("onnxruntime", "openvino"):
        prediction = medad.predict_input(detector, path, runtime=runtime, export_dir=exported)
        assert prediction.anomaly_map.shape == reference.anomaly_map.shape == (130, 150)
        assert np.abs(prediction.anomaly_map - reference.anomaly_map).max() <= TOLERANCE, runtime
        assert prediction.score == pytest.approx(reference.score, abs=TOLERANCE), runtime
        assert prediction.anomalous == reference.anomalous and prediction.thresholds == reference.thresholds


def test_runtime_network_refuses_what_it_cannot_run(detector, tmp_path, tiny_config, tiny_weights):
    with pytest.raises(ValueError, match="runtime must be one of torch, onnxruntime, openvino, got 'tensorrt'"):
        runtime_network(detector, "cpu", "tensorrt")
    with pytest.raises(ValueError, match="compile is PyTorch's"):
        runtime_network(detector, "cpu", "onnxruntime", compile=True)
    assert runtime_network(detector, "cpu", "torch") is detector
    low = medad.build_detector(
        [tiny_config["object"]], tiny_config["object"], model_name=medad.TINY_MODEL_NAME, image_size=tiny_config["image_size"],
        pretrained=tiny_weights["clip"], levels=tiny_config["features"], precision="bf16",
    )
    with pytest.raises(ValueError, match="export a float32 detector"):
        export_detector(low, tmp_path)
    assert not (tmp_path / "model.json").exists()


@pytest.mark.parametrize("method", ["clip", "memory", "winclip"])
def test_the_baselines_export_with_their_memory(method, tmp_path):
    """Which methods export: every registered one, few-shot memory included."""
    torch.manual_seed(0)
    detector = medad.build_detector(
        ["Brain"], "Brain", model_name=medad.TINY_MODEL_NAME, image_size=112, random_init=True, method=method,
        levels=(4,) if method == "winclip" else (1, 2, 3, 4),
    )
    with torch.no_grad():
        if detector.takes_memory:
            detector.build_memory(torch.rand(1, 3, 112, 112))
        detector.calibrate(torch.rand(2, 3, 112, 112))
        images = torch.rand(2, 3, 112, 112)
        expected = detector.predict(images)
    final = runtime_network(detector, "cpu", "onnxruntime", export_dir=tmp_path).predict(images)
    assert (final.anomaly_map - expected.anomaly_map).abs().max().item() <= TOLERANCE
    assert (final.score - expected.score).abs().max().item() <= TOLERANCE


def test_the_benchmarks_flip_share_is_the_share_of_decisions_that_differ(detector, exported):
    """``scripts/benchmark.py``'s parity of a runtime against PyTorch float32, on a few dozen
    generated images with the model's stored thresholds, against the decisions counted here
    with numpy from each runtime's own scores."""
    import benchmark  # scripts/benchmark.py

    images, _ = benchmark.lesion_images(36, seed=5, size=112)
    thresholds = detector.effective_thresholds()
    expected = benchmark.scores_of(detector, images, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(expected.score.numpy(), detector.predict(images).score.numpy())
    # A lowered threshold pair that cuts through the scores, so that bf16 flips some decisions.
    median = Thresholds(float(expected.score.median()), float(expected.anomaly_map.median()))
    low = medad.build_detector(
        ["Brain"], "Brain", model_name=medad.TINY_MODEL_NAME, image_size=112, random_init=True, levels=(1, 2, 3, 4),
        precision="bf16",
    )
    low.load_state_dict(detector.state_dict())
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    for network, own_scores in (
        (runtime_network(detector, "cpu", "onnxruntime", export_dir=exported), lambda: session.run(["score", "anomaly_map"], {"image": images.numpy()})),
        (low, lambda: [value.numpy() for value in (low.predict(images).score, low.predict(images).anomaly_map)]),
    ):
        with torch.no_grad():
            score, anomaly_map = own_scores()
        for given in (thresholds, median):
            report = benchmark.decision_parity(expected, benchmark.scores_of(network, images, 8), given)
            flips = (score >= given.image) != (expected.score.numpy() >= given.image)
            pixel_flips = (anomaly_map >= given.pixel) != (expected.anomaly_map.numpy() >= given.pixel)
            assert report["images"] == 36
            assert report["flipped_decisions"] == int(flips.sum())
            assert report["flipped_share"] == pytest.approx(flips.mean())
            assert report["flipped_pixel_share"] == pytest.approx(pixel_flips.mean())
            assert report["max_abs_score_difference"] == pytest.approx(np.abs(score - expected.score.numpy()).max())
            assert report["scores_within_tolerance"] == bool(np.abs(score - expected.score.numpy()).max() <= 1e-3)
    assert report["flipped_pixel_share"] > 0  # bf16 at the median pixel threshold: the count is exercised


# ----------------------------------------------------------------------------- the bundle's runtime key

@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_bundle_inference_with_a_runtime_gives_pytorchs_scores(random_fewshot_model, tmp_path, runtime):
    """The bundle's ``runtime`` key runs inference through the exported graph (exported into
    ``export_dir``) with PyTorch's scores and decisions; the manifest records the runtime."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    for index in range(3):
        Image.fromarray((rng.random((90, 100)) * 255).astype(np.uint8)).save(inputs / f"case{index}.png")
    rows = {}
    for name, overrides in (("torch", {}), (runtime, {"runtime": runtime, "export_dir": str(tmp_path / "export")})):
        root = tmp_path / name
        (root / "models").mkdir(parents=True)
        (root / "models" / "model.pt").write_bytes(random_fewshot_model.read_bytes())
        run_bundle_here("inferring", ("inference",), root, dataset_dir=inputs, num_workers=0, **overrides)
        with open(root / "outputs" / "scores.csv", newline="") as handle:
            rows[name] = {Path(row["image"]).name: row for row in csv.DictReader(handle)}
    assert (tmp_path / "export" / "model.json").is_file()
    assert json.loads((tmp_path / runtime / "outputs" / MANIFEST_NAME).read_text())["settings"]["runtime"] == runtime
    assert set(rows[runtime]) == set(rows["torch"]) == {f"case{index}.png" for index in range(3)}
    for case, row in rows["torch"].items():
        assert float(rows[runtime][case]["score"]) == pytest.approx(float(row["score"]), abs=TOLERANCE), case
        assert rows[runtime][case]["anomalous"] == row["anomalous"], case


def test_bundle_refuses_an_unknown_runtime_and_compile_with_an_exported_one(random_fewshot_model, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(random_fewshot_model.read_bytes())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(inputs / "case.png")
    status, lines = run_bundle_in_process("inferring", ("inference",), tmp_path, dataset_dir=inputs, runtime="onnx")
    assert status == 1 and lines[-1] == "medad: runtime must be one of ['torch', 'onnxruntime', 'openvino'], got 'onnx'"
    status, lines = run_bundle_in_process("inferring", ("inference",), tmp_path, dataset_dir=inputs, runtime="openvino", compile=True)
    assert status == 1 and "the openvino runtime compiles its graph itself; leave compile false" in lines[-1]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "models" / "exported").exists()


# ----------------------------------------------------------------------------- TensorRT (configs/inference_trt.json)


def _trt_parser(root: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "inference_trt.json")])
    parser.update({"bundle_root": str(root), **overrides})
    return parser


def test_the_trt_overlay_compiles_the_frozen_blocks_by_their_real_names(random_fewshot_model, tmp_path, monkeypatch):
    """The overlay parses over inference.json and hands MONAI's ``trt_compile`` the frozen tower's
    blocks, each a real submodule of the network (a misspelt path fails here, on any machine),
    with the precision and the batch sizes of the run."""
    import monai.networks

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(random_fewshot_model.read_bytes())
    calls = []

    def recording_trt_compile(model, base_path, args=None, submodule=None, logger=None):
        calls.append((base_path, args, [model.get_submodule(name) for name in submodule]))
        return model

    monkeypatch.setattr(monai.networks, "trt_compile", recording_trt_compile)
    parser = _trt_parser(tmp_path, device="$torch.device('cpu')", batch_size=4, trt_precision="fp32")
    network = parser.get_parsed_content("network")
    assert isinstance(network, medad.MVFADetector)
    (base_path, args, blocks), = calls
    assert blocks == list(network.encoder.tower.blocks) and len(blocks) == 4
    assert parser.get_parsed_content("trt_submodules")[0] == "encoder.visual.transformer.resblocks.0"
    assert base_path == str(tmp_path / "models" / "model.pt")
    assert args == {"precision": "fp32", "dynamic_batchsize": [1, 4, 4]}


def _trt_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device here: TensorRT needs one (the overlay's parsing is tested above)"
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT or polygraphy is not installed (pip install tensorrt polygraphy)"
    return None


@pytest.mark.skipif(_trt_missing() is not None, reason=str(_trt_missing()))
@pytest.mark.parametrize("precision, bound", [("fp32", 1e-3), ("fp16", 1e-2)])
def test_the_trt_overlay_scores_as_pytorch(random_fewshot_model, tmp_path, precision, bound):
    """On a CUDA device with TensorRT: the blocks' engines give PyTorch float32's maps (relative to
    their range) and scores within ``bound``."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(random_fewshot_model.read_bytes())
    network = _trt_parser(tmp_path, device="$torch.device('cuda')", batch_size=2, trt_precision=precision).get_parsed_content("network")
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)).cuda()
    reference = medad.load_detector(random_fewshot_model, device="cuda")
    with torch.no_grad():
        expected, final = reference.predict(images), network.predict(images)
    spread = float(expected.anomaly_map.max() - expected.anomaly_map.min())
    assert float((final.anomaly_map - expected.anomaly_map).abs().max()) / spread <= bound
    assert float((final.score - expected.score).abs().max()) <= bound
    assert any(path.suffix == ".plan" for path in (tmp_path / "models").iterdir())


# ----------------------------------------------------------------------------- parity on the golden fixture

#: Largest map and score differences from PyTorch float32 on the golden fixture, relative to the
#: float32 range of each (its few-shot maps span ~5e4 on two support images): exports are float32
#: (measured ~9e-6), bf16 and fp16 round the frozen blocks' products (measured 1.05e-2 and 1.4e-3
#: for the maps; the bounds of tests/test_precision.py).
GOLDEN_BOUNDS = {"onnxruntime": 1e-4, "openvino": 1e-4, "bf16": 1.5e-2, "fp16": 1e-2}


def _golden_detector(tiny_config, tiny_weights, golden, precision: str) -> medad.MVFADetector:
    detector = medad.build_detector(
        [tiny_config["object"]], tiny_config["object"], model_name=medad.TINY_MODEL_NAME,
        image_size=tiny_config["image_size"], pretrained=tiny_weights["clip"], levels=tiny_config["features"],
        checkpoint=tiny_weights["adapters"], precision=precision,
    )
    with torch.no_grad():
        detector.build_memory(golden["support_images"])
        detector.calibrate(golden["support_images"])
    return detector


@pytest.fixture(scope="module")
def golden_reference(tiny_config, tiny_weights, golden, tmp_path_factory) -> tuple[medad.MVFADetector, Path]:
    """The golden fixture's few-shot detector in float32 and its export (both graphs)."""
    detector = _golden_detector(tiny_config, tiny_weights, golden, "fp32")
    return detector, export_detector(detector, tmp_path_factory.mktemp("golden_export"))


@pytest.mark.parametrize("variant", list(GOLDEN_BOUNDS))
def test_maps_and_scores_of_each_precision_and_runtime_against_float32_on_the_golden_fixture(
    tiny_config, tiny_weights, golden, golden_reference, variant
):
    reference, exported = golden_reference
    if variant in ("bf16", "fp16"):  # a model.pt fitted in float32 (memory, calibration), run at that precision
        network = _golden_detector(tiny_config, tiny_weights, golden, variant)
        network.load_state_dict(reference.state_dict())
    else:
        network = runtime_network(reference, "cpu", variant, export_dir=exported)
    with torch.no_grad():
        expected, final = reference.predict(golden["images"]), network.predict(golden["images"])
    for name in ("anomaly_map", "score"):
        values, wanted = getattr(final, name).float(), getattr(expected, name)
        relative = float((values - wanted).abs().max() / (wanted.max() - wanted.min()))
        assert relative <= GOLDEN_BOUNDS[variant], (name, relative)


def test_runs_sharing_an_export_dir_export_once_and_run_the_same_graph(detector, images, tmp_path, monkeypatch):
    """Two callers at once on one ``export_dir`` (as the ranks of a torchrun inference are): one
    exports while the other waits on the folder's lock, then finds the graph and compiles it."""
    import threading

    from medad.surfaces import deploy

    exports = []

    def counted_export(*args, **kwargs):
        exports.append(threading.get_ident())
        return export_detector(*args, **kwargs)

    monkeypatch.setattr(deploy, "export_detector", counted_export)
    networks, errors = [], []

    def place() -> None:
        try:
            networks.append(runtime_network(detector, "cpu", "onnxruntime", export_dir=tmp_path))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=place) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(exports) == 1 and len(networks) == 2
    first, second = (network.predict(images) for network in networks)
    assert torch.equal(first.score, second.score) and torch.equal(first.anomaly_map, second.anomaly_map)


def test_the_runtimes_benchmark_leaves_bf16_out_on_a_cpu_without_native_bf16(monkeypatch):
    """``scripts/benchmark.py``'s runtimes section, end to end on the tiny model: without native
    bf16 it times float32 PyTorch and both exports, says why bf16 is missing, and its roofline
    is float32's alone."""
    import benchmark  # scripts/benchmark.py
    from medad.model import backbone

    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    result = benchmark.runtime_section(medad.TINY_MODEL_NAME, 112, batch=2, parity_images=4, repeats=1,
                                       compile=False, reference=False)
    assert set(result["images_per_second"]) == {"torch_fp32", "onnxruntime", "openvino"}
    assert result["bf16"].startswith("not timed: no native bf16")
    assert set(result["gflop_per_image_by_dtype"]) == {"fp32"} and set(result["matmul_peak_gflops"]) == {"float32"}
    assert set(result["parity_vs_torch_fp32"]) == {"onnxruntime", "openvino"}
    assert all(parity["scores_within_tolerance"] for parity in result["parity_vs_torch_fp32"].values())
