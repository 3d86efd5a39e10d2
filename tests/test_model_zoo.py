"""Model-zoo release: the archive of scripts/build_bundle.py, served from a loopback HTTP
server, downloaded, loaded, run, checked and exported with MONAI's own bundle tools.

The released model is an :class:`medad.MVFADetector` ``state_dict`` built in-process on the
seeded random-init tiny backbone of ``configs/tiny.json`` (every process builds the same
backbone), with a few-shot memory bank and calibration so that the fullest state travels.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigWorkflow, download, download_large_files, load, verify_metadata
from monai.data import load_net_with_metadata
from PIL import Image

import medad
from medad.surfaces.workflow import RunError, error_summary

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METADATA = json.loads((CONFIGS / "metadata.json").read_text())
NAME, VERSION = METADATA["name"], METADATA["version"]
TINY = json.loads((CONFIGS / "tiny.json").read_text())
TINY_LEVELS = [1, 2, 3, 4]  # MVFA's default levels (four evenly spaced blocks) of the 4-block tiny CLIP
IMAGE_SIZE = medad.model.backbone.MVFA_IMAGE_SIZE  # train.json's default for ViT-L-14-336, as metadata.json says

_spec = importlib.util.spec_from_file_location("build_bundle", ROOT / "scripts" / "build_bundle.py")
build_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_bundle)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_monai(*args: str, cwd: Path) -> subprocess.Popen:
    """Start ``python -m monai.bundle <args>`` in ``cwd`` (stdout and stderr together)."""
    return subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(process: subprocess.Popen) -> str:
    """Wait for a started command; return its log, failing the test if it failed."""
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-6000:]
    return log


@dataclass
class Trained:
    model: Path  # the detector's state_dict, as training writes models/model.pt
    images: torch.Tensor  # (3, 3, S, S) reference inputs
    maps: torch.Tensor  # eager outputs of the detector on them


@dataclass
class Release:
    archive: Path  # weights packed
    lite_archive: Path  # weights left to download_large_files
    local_archive: Path  # built without --model-url: weights packed, no large_files.yml
    base_url: str
    bundle: Path  # the downloaded and unpacked full archive


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    torch.manual_seed(0)
    detector = medad.build_detector(
        ["Brain", "Liver"], "Brain", model_name=TINY["clip_model"], image_size=IMAGE_SIZE,
        pretrained=TINY["clip_weights"], random_init=TINY["clip_random_init"], levels=TINY_LEVELS,
    ).eval()
    with torch.no_grad():
        detector.build_memory(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
        detector.calibrate(torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE))
        images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)
        maps = detector(images)
    model = tmp_path_factory.mktemp("trained") / "model.pt"
    torch.save(detector.state_dict(), model)
    return Trained(model, images, maps)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 only (an ephemeral port), and its base URL."""
    folder = tmp_path_factory.mktemp("served")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def release(trained, served, tmp_path_factory) -> Release:
    folder, base_url = served
    (folder / "model.pt").write_bytes(trained.model.read_bytes())
    common = ["--model", str(trained.model), "--model-url", f"{base_url}/model.pt"]
    assert build_bundle.main([*common, "--output-dir", str(folder)]) == 0
    assert build_bundle.main([*common, "--output-dir", str(folder / "lite"), "--exclude-model"]) == 0
    assert build_bundle.main(["--model", str(trained.model), "--output-dir", str(folder / "local")]) == 0
    archive = folder / f"{NAME}_v{VERSION}.zip"
    bundle_dir = tmp_path_factory.mktemp("downloaded")
    download(name=NAME, url=f"{base_url}/{archive.name}", bundle_dir=bundle_dir, progress=False)
    return Release(archive, folder / "lite" / archive.name, folder / "local" / archive.name, base_url, bundle_dir / NAME)


# ----------------------------------------------------------------------------- metadata and configs


def test_metadata_has_the_fields_the_bundle_schema_and_model_zoo_require():
    # Required by MONAI's meta_schema_20240725.json, which is the schema that has
    # required_packages_version (older schemas require optional_packages_version instead).
    required = ["schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "network_data_format"]
    assert [key for key in required if key not in METADATA] == []
    assert METADATA["schema"].endswith("/meta_schema_20240725.json")
    assert VERSION in METADATA["changelog"], "the model-zoo CI wants the version in the changelog"
    assert METADATA["required_packages_version"]["medad"] == medad.__version__
    image = METADATA["network_data_format"]["inputs"]["image"]
    pred = METADATA["network_data_format"]["outputs"]["pred"]
    for tensor in (image, pred):
        assert {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range"} <= set(tensor)
        assert all(isinstance(v, (int, float)) for v in tensor["value_range"])
    # What verify_net_in_out and ckpt_export read: the network takes (1, 3, 240, 240) float32 in
    # [0, 1] and returns a one-channel float32 map at the input size.
    assert (image["num_channels"], image["spatial_shape"], image["dtype"]) == (3, [IMAGE_SIZE] * 2, "float32")
    assert image["value_range"] == [0, 1]
    assert (pred["num_channels"], pred["spatial_shape"], pred["dtype"]) == (1, [IMAGE_SIZE] * 2, "float32")
    assert build_bundle.metadata_problems(METADATA) == []
    broken = {k: v for k, v in METADATA.items() if k not in ("authors", "changelog")}
    problems = build_bundle.metadata_problems(broken)
    assert "missing field 'authors'" in problems and any("changelog" in p for p in problems)


def test_every_config_path_derives_from_bundle_root():
    for path in sorted(CONFIGS.glob("*.json")):
        if path.name != "metadata.json":
            assert build_bundle.config_path_problems(json.loads(path.read_text())) == [], path.name
    bad = {
        "bundle_root": "/opt/bundle",
        "ckpt_dir": "models",
        "output_dir": "./eval",
        "handlers": [{"load_path": "$'/abs/model.pt'"}, {"load_path": "$@ckpt_dir + '/model.pt'"}],
        "dataset_dir": "/workspace/data",  # the user's data may live anywhere
    }
    problems = build_bundle.config_path_problems(bad)
    assert len(problems) == 4 and "handlers#0#load_path" in problems[-1], problems


def test_configs_pass_monai_property_checks_without_a_model_and_the_run_names_it(synthetic_bmad, tmp_path):
    # A bundle folder with inputs but no models/model.pt (a fresh checkout, a release without its
    # weights): MONAI's ConfigWorkflow initialises and checks the properties of inference and
    # evaluation, which builds every component; running then ends with one line naming the file.
    root = tmp_path / "bundle"
    (root / "samples").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)).save(root / "samples" / "a.png")
    model = root / "models" / "model.pt"
    workflows = {
        "infer": (("inference",), {}),
        "eval": (("train", "evaluate"), {"dataset_dir": str(synthetic_bmad), "target": "Alpha"}),
    }
    for kind, (names, overrides) in workflows.items():
        workflow = ConfigWorkflow(
            config_file=[str(CONFIGS / f"{name}.json") for name in names], meta_file=str(CONFIGS / "metadata.json"),
            logging_file=False, workflow_type=kind, bundle_root=str(root), num_workers=0, **overrides,
        )
        workflow.initialize()
        try:
            assert workflow.check_properties() == [], kind
            assert isinstance(workflow.network_def, medad.surfaces.workflow.MissingModel)
            with pytest.raises(RuntimeError) as raised:
                workflow.run()
        finally:
            workflow.finalize()
        line, user_error = error_summary(raised.value)
        assert user_error and "\n" not in line and line.startswith(f"{model}: model file not found"), (kind, line)
        assert isinstance(raised.value.__cause__, RunError)
    assert sorted(path.name for path in root.iterdir()) == [".medad.lock", ".outputs.lock", "samples"], "nothing written"


# ----------------------------------------------------------------------------- the archive


def test_build_reports_what_is_missing_and_leaves_nothing_behind(trained, tmp_path, capsys):
    output = tmp_path / "dist"
    url = ["--model-url", "http://127.0.0.1/model.pt"]
    assert build_bundle.main(["--model", str(tmp_path / "none.pt"), *url, "--output-dir", str(output)]) == 1
    assert "none.pt (train a model first" in capsys.readouterr().err
    assert build_bundle.main(["--model", str(trained.model), "--output-dir", str(output), "--exclude-model"]) == 1
    assert "a release without its weights needs --model-url" in capsys.readouterr().err
    resume = tmp_path / "resume_checkpoint_epoch=1.pt"
    torch.save({"model": torch.load(trained.model, weights_only=True), "optimizer": {}}, resume)
    assert build_bundle.main(["--model", str(resume), *url, "--output-dir", str(output)]) == 1
    assert "not a detector state dict" in capsys.readouterr().err
    assert not output.exists() or list(output.iterdir()) == []


def test_archive_has_the_model_zoo_layout(release, trained):
    with zipfile.ZipFile(release.archive) as archive:
        names = set(archive.namelist())
        large_files = yaml.safe_load(archive.read(f"{NAME}/large_files.yml"))
    assert {name.split("/")[0] for name in names} == {NAME}, "one top folder named after the bundle"
    expected = {f"configs/{p.name}" for p in CONFIGS.glob("*.json")} | {
        "configs/logging.conf", "models/model.pt", "docs/README.md", "docs/data_license.txt", "LICENSE", "large_files.yml",
        f"docs/{build_bundle.SCHEMA_NAME}", *(f"samples/{sample}" for sample in build_bundle.SAMPLES),
    }
    assert {name.removeprefix(f"{NAME}/") for name in names} == expected
    assert large_files["large_files"] == [
        {
            "path": "models/model.pt", "url": f"{release.base_url}/model.pt",
            "hash_val": sha256(trained.model), "hash_type": "sha256",
        }
    ]
    with zipfile.ZipFile(release.lite_archive) as archive:
        assert f"{NAME}/models/model.pt" not in archive.namelist()
        assert f"{NAME}/large_files.yml" in archive.namelist()
    with zipfile.ZipFile(release.local_archive) as archive:
        assert {name.removeprefix(f"{NAME}/") for name in archive.namelist()} == expected - {"large_files.yml"}
        released_train = json.loads(archive.read(f"{NAME}/configs/train.json"))
    # The release's train.json describes the released model, which its network_def starts from.
    assert {key: released_train[key] for key in ("clip_model", "clip_random_init", "image_size", "levels", "target")} == {
        "clip_model": TINY["clip_model"], "clip_random_init": True, "image_size": IMAGE_SIZE, "levels": TINY_LEVELS,
        "target": "Brain",
    }
    assert released_train["network_def"]["checkpoint"] == "@init_checkpoint"
    assert released_train["init_checkpoint"] == "$@ckpt_dir + '/model.pt'"


def test_download_load_and_infer_from_the_released_archive(release, trained, tmp_path, monkeypatch):
    bundle = release.bundle
    monkeypatch.chdir(bundle)  # bundle_root ".", as MONAI's bundle commands run
    assert (bundle / "configs" / "metadata.json").is_file()
    assert sha256(bundle / "models" / "model.pt") == sha256(trained.model)

    # MONAI's own loader with its defaults (train.json's network_def, which in a release starts
    # from models/model.pt) and with the inference config (the network built from models/model.pt:
    # its architecture, memory and the backbone it records): load() copies the same tensors into
    # it, and it comes back in eval mode, the released detector whole.
    for network in (load(name=NAME, bundle_dir=bundle.parent), load(name=NAME, bundle_dir=bundle.parent,
                                                                     workflow_type="inference", device="cpu")):
        assert isinstance(network, medad.MVFADetector) and network.has_memory and network.target == "Brain"
        assert not network.training
        with torch.no_grad():
            maps = network.cpu()(trained.images)
        assert maps.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(maps, trained.maps, rtol=0, atol=1e-5)

    samples = tmp_path / "samples"
    samples.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in {"a": (130, 150), "b": (IMAGE_SIZE, IMAGE_SIZE)}.items():
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(samples / f"{name}.png")
    finish(start_monai(
        "run", "inferring", "--config_file", "configs/inference.json", "--dataset_dir", str(samples), "--num_workers", "0",
        cwd=bundle,
    ))
    assert nib.load(bundle / "outputs" / "a_anomaly_map.nii.gz").shape[:2] == (150, 130)  # as LoadImage reads a.png
    assert (bundle / "outputs" / "b_anomaly_map.nii.gz").is_file()
    assert len((bundle / "outputs" / "scores.csv").read_text().splitlines()) == 3


def test_local_release_infers_on_its_samples_and_verifies_its_metadata_offline(release, tmp_path):
    with zipfile.ZipFile(release.local_archive) as archive:
        archive.extractall(tmp_path)
    bundle = tmp_path / NAME
    # Nothing but the config: inputs from the shipped samples/, every other setting the release's.
    finish(start_monai("run", "inferring", "--config_file", "configs/inference.json", cwd=bundle))
    rows = (bundle / "outputs" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + len(build_bundle.SAMPLES)
    for sample in build_bundle.SAMPLES:
        assert (bundle / "outputs" / sample.replace(".png", "_anomaly_map.nii.gz")).is_file()

    # MONAI reads the shipped copy of the schema that metadata.json names instead of downloading it.
    pytest.importorskip("jsonschema", reason="MONAI's verify_metadata needs jsonschema (the test extra)")
    schema = bundle / "docs" / build_bundle.SCHEMA_NAME
    assert schema.read_bytes() == (ROOT / "bundle" / "docs" / build_bundle.SCHEMA_NAME).read_bytes()
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({k: v for k, v in METADATA.items() if k != "authors"}))
    with pytest.raises(ValueError, match="authors"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))


def test_download_large_files_fetches_the_weights_and_checks_their_hash(release, trained, tmp_path):
    download(name=NAME, url=f"{release.base_url}/lite/{release.lite_archive.name}", bundle_dir=tmp_path, progress=False)
    bundle = tmp_path / NAME
    weights = bundle / "models" / "model.pt"
    assert not weights.exists()
    download_large_files(bundle_path=str(bundle))
    assert sha256(weights) == sha256(trained.model)

    # A file that does not match the recorded hash is refused, whether already there or fetched.
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(bundle))
    weights.unlink()
    listing = bundle / "large_files.yml"
    config = yaml.safe_load(listing.read_text())
    config["large_files"][0]["hash_val"] = "0" * 64
    listing.write_text(yaml.safe_dump(config))
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(bundle))
    assert not weights.exists()


# ----------------------------------------------------------------------------- MONAI's checks and exports


def test_verify_net_in_out_and_torchscript_export(release, trained):
    bundle = release.bundle
    # Exactly as the model-zoo CI (ci/verify_bundle.py) runs them, from the unpacked bundle, with no
    # flag of medad's (both at once: most of each is imports). The CI scripts: the detector's
    # __prepare_scriptable__ traces open_clip's tower, which cannot be scripted.
    verify = start_monai(
        "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json", "--bundle_root", ".", cwd=bundle,
    )
    export = start_monai(
        "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--bundle_root", ".", cwd=bundle,
    )
    assert "data shape of network is verified with no error" in finish(verify)
    finish(export)
    module, meta, _ = load_net_with_metadata(bundle / "models" / "model.ts", map_location="cpu")
    assert meta["version"] == VERSION
    with torch.no_grad():
        maps = module(trained.images)  # another batch size than the traced one
    assert (maps - trained.maps).abs().max().item() <= 1e-4


def test_onnx_export_matches_eager(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnx, onnxruntime and onnxscript")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (pip install onnxscript)")
    detector = medad.build_detector(
        [], None, model_name=TINY["clip_model"], image_size=IMAGE_SIZE, pretrained=TINY["clip_weights"],
        random_init=TINY["clip_random_init"], levels=TINY_LEVELS, checkpoint=trained.model,
    ).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        detector, (trained.images,), str(path), input_names=["image"], output_names=["pred"],
        dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (maps,) = session.run(None, {"image": trained.images.numpy()})
    assert np.abs(maps - trained.maps.numpy()).max() <= 1e-4
