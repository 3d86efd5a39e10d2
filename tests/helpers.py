"""Helpers for tests that run the bundle through `python -m monai.bundle` in subprocesses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from medad.workflow import bundle_command as _bundle_command

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: Model input size in bundle tests: 8 x 8 patches keeps the tiny backbone fast.
IMAGE_SIZE = 112


def configs(*names: str) -> str:
    """A `--config_file` value merging ``configs/<name>.json`` files in order."""
    return repr([str(CONFIGS / f"{name}.json") for name in names])


def bundle_command(run_id: str, config_names: tuple[str, ...], bundle_root: Path, **overrides) -> list[str]:
    """The ``python -m monai.bundle run`` command merging ``configs/<name>.json`` files in order
    (:func:`medad.workflow.bundle_command`)."""
    return _bundle_command(run_id, [CONFIGS / f"{name}.json" for name in config_names], bundle_root, overrides)


def run_bundle(run_id: str, config_names: tuple[str, ...], bundle_root: Path, **overrides) -> str:
    """Run a bundle workflow in a subprocess, assert it succeeded, and return its log."""
    result = subprocess.run(
        bundle_command(run_id, config_names, bundle_root, **overrides),
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


def common(dataset_dir: Path, backbone: dict) -> dict:
    """Overrides shared by the bundle tests: generated data, target Alpha, tiny backbone."""
    return {"dataset_dir": dataset_dir, "target": "Alpha", "num_workers": 0, "batch_size": 4, "eval_batch_size": 8, **backbone}
