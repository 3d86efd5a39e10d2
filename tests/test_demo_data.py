"""The demo benchmark generator: determinism, exact masks, BMAD layout, safe writing."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo_data as demo  # scripts/demo_data.py

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SMALL = {"valid": {"good": 1, "Ungood": 2}, "test": {"good": 2, "Ungood": 2}}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """The default benchmark, written once for the layout tests."""
    root = tmp_path_factory.mktemp("demo")
    return root, demo.make_demo_dataset(root)


def test_imports_without_the_image_sources():
    # A fresh interpreter, with scripts/ on sys.path, where nilearn, skimage and pydicom cannot
    # be imported (a None entry in sys.modules makes their import fail). medad's __init__ is
    # bypassed by an empty package module: it pulls in torch and MONAI (slow, and MONAI loads
    # skimage itself when present), while what is checked here is that demo_data defers these
    # imports until first use.
    code = (
        "import importlib.util, sys, types\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "sys.modules.update(nilearn=None, skimage=None, pydicom=None)\n"
        "package = types.ModuleType('medad')\n"
        "package.__path__ = list(importlib.util.find_spec('medad').submodule_search_locations)\n"
        "sys.modules['medad'] = package\n"
        "import demo_data\n"
        "print(demo_data.DEMO_DOMAINS)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(demo.DEMO_DOMAINS)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        demo.make_demo_dataset(tmp_path / name, seed=seed, size=96, counts=SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("domain", demo.DEMO_DOMAINS)
def test_anomaly_changes_exactly_its_mask_inside_the_roi(domain):
    sample = demo.domain_sampler(domain, 128)
    for kind, trial in itertools.product(demo.ANOMALY_KINDS, range(4)):
        rng = np.random.default_rng([11, trial])
        image, roi = sample(rng)
        donor = sample(rng)[0] if trial % 2 else None
        out, mask = demo.synthesize_anomaly(image, rng, roi, kind=kind, donor=donor)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert mask.dtype == bool and mask.shape == roi.shape
        changed = out != image if image.ndim == 2 else (out != image).any(axis=-1)
        assert not changed[~mask].any(), (kind, trial)
        assert not (mask & ~roi).any(), (kind, trial)
        assert changed[mask].mean() > 0.5, (kind, trial)
        assert 0.003 < mask.mean() < 0.08, (kind, trial)


@pytest.mark.parametrize("domain", ["Brain_MRI", "Retina_Fundus", "CT_Chest"])
def test_roi_is_the_imaged_anatomy(domain):
    # Brain, fundus disc and body are bright against a near-black background.
    image, roi = demo.domain_sampler(domain, 128)(np.random.default_rng(0))
    gray = image if image.ndim == 2 else image.mean(axis=-1)
    assert 0.2 < roi.mean() < 0.97
    assert gray[~roi].mean() < 0.5 * gray[roi].mean()


def test_default_anomaly_kind_and_roi():
    image = np.full((64, 64), 100, np.uint8)
    out, mask = demo.synthesize_anomaly(image, np.random.default_rng(0))
    assert mask.any() and (out[~mask] == 100).all()
    with pytest.raises(ValueError, match="kind"):
        demo.synthesize_anomaly(image, np.random.default_rng(0), kind="crack")


def test_layout(dataset):
    root, summary = dataset
    assert set(summary) == set(demo.DEMO_DOMAINS)
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{d}_AD" for d in demo.DEMO_DOMAINS)
    for domain in demo.DEMO_DOMAINS:
        normal_hashes = set()
        for split, cls in itertools.product(("valid", "test"), ("good", "Ungood")):
            folder = root / f"{domain}_AD" / split / cls
            images = sorted((folder / "img").iterdir())
            assert len(images) == summary[domain][split][cls] == demo.DEFAULT_COUNTS[split][cls]
            assert [p.name for p in images] == [f"{i:05d}.png" for i in range(len(images))]
            has_masks = cls == "Ungood" and domain in demo.DOMAINS_WITH_MASKS
            assert (folder / "anomaly_mask").is_dir() == has_masks
            for path in images:
                with Image.open(path) as im:
                    assert im.size == (240, 240) and im.mode in ("L", "RGB")
                if cls == "good":
                    normal_hashes.add(hashlib.sha256(path.read_bytes()).hexdigest())
            if has_masks:
                assert [p.name for p in sorted((folder / "anomaly_mask").iterdir())] == [p.name for p in images]
                for path in images:
                    with Image.open(folder / "anomaly_mask" / path.name) as im:
                        assert im.mode == "L" and im.size == (240, 240)
                        mask = np.asarray(im)
                    assert set(np.unique(mask)) == {0, 255}
        n_normal = sum(demo.DEFAULT_COUNTS[split]["good"] for split in ("valid", "test"))
        assert len(normal_hashes) == n_normal, f"{domain}: identical normal images"


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        demo.make_demo_dataset(tmp_path, size=64, counts=SMALL)
    demo.make_demo_dataset(tmp_path, size=64, counts={"test": {"good": 3, "Ungood": 3}}, overwrite=True)
    # Overwriting replaces earlier demo data (no stale files) and leaves other files alone.
    demo.make_demo_dataset(tmp_path, size=64, counts=SMALL, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    good = list((tmp_path / "Brain_MRI_AD" / "test" / "good" / "img").iterdir())
    assert len(good) == SMALL["test"]["good"]
    assert not list(tmp_path.rglob(".*.tmp"))
    assert not list(tmp_path.rglob(".*"))  # no temporary files of atomic writes left behind


def test_cli(tmp_path, capsys):
    # In-process: a fresh interpreter would spend most of the time importing torch.
    script = SCRIPTS / "make_demo_data.py"
    main = runpy.run_path(str(script))["main"]
    main(["--output", str(tmp_path / "out"), "--per-split", "2", "--size", "64"])
    printed = capsys.readouterr().out
    assert "Brain_MRI_AD: valid 1 good + 1 Ungood, test 2 good + 2 Ungood" in printed
    assert "wrote 24 images" in printed
