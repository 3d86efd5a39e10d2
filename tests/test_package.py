"""The installed package holds the library only, and works without the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the package is made of: an in-tree build/ could carry stale modules.
    source = folder / "source"
    shutil.copytree(ROOT / "medad", source / "medad", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(folder), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"building a wheel needs setuptools and wheel in this environment: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = folder.glob("medad-*.whl")
    return path


def test_the_wheel_holds_the_library_and_its_model_configs_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = {name for name in names if name.startswith("medad/")}
    assert "medad/model_configs/medad-tiny.json" in modules
    assert not {"medad/reproduce.py", "medad/demo.py"} & modules, "product tools live in scripts/"
    assert all(name.startswith(("medad/", "medad-")) for name in names), names


def test_the_library_imports_outside_the_checkout_with_every_config_target(wheel, tmp_path):
    # Unpacked beside nothing else: every `_target_` and `$import` of the configs resolves.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    script = (
        "import importlib, json, pathlib, re, sys\n"
        f"configs = pathlib.Path({str(ROOT / 'configs')!r})\n"
        "names = set()\n"
        "for path in configs.glob('*.json'):\n"
        "    text = path.read_text()\n"
        "    names |= set(re.findall(r'\"_target_\": \"(medad[.\\w]+)\"', text))\n"
        "    names |= {m + '.x' for m in re.findall(r'import (medad[.\\w]*)', text)}\n"
        "for name in sorted(names):\n"
        "    module, attribute = name.rsplit('.', 1)\n"
        "    target = importlib.import_module(module)\n"
        "    assert attribute == 'x' or hasattr(target, attribute), name\n"
        "    assert pathlib.Path(target.__file__).is_relative_to(pathlib.Path(sys.path[0])), target.__file__\n"
        "print(len(names))\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); " + script.replace("\n", "\n")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 10
