"""Helpers for tests that run the bundle through `python -m monai.bundle` in subprocesses."""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import logging
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from sklearn.metrics import roc_auc_score

from medad.surfaces.workflow import bundle_command as _bundle_command

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: Model input size in bundle tests: 8 x 8 patches keeps the tiny backbone fast.
IMAGE_SIZE = 112
#: The report gallery size of the shared evaluation (conftest.py, ``fewshot_evaluation``).
REPORT_GALLERY_SIZE = 3


def configs(*names: str) -> str:
    """A `--config_file` value merging ``configs/<name>.json`` files in order."""
    return repr([str(CONFIGS / f"{name}.json") for name in names])


def bundle_command(run_id: str, config_names: tuple[str, ...], bundle_root: Path, **overrides) -> list[str]:
    """The ``python -m monai.bundle run`` command merging ``configs/<name>.json`` files in order
    (:func:`medad.surfaces.workflow.bundle_command`)."""
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


def run_bundle_in_process(run_id: str, config_names: tuple[str, ...], bundle_root: Path, **overrides) -> tuple[int, list[str]]:
    """The :func:`bundle_command` run inside this process, whose imports are paid already: the
    exit status that ``python -m monai.bundle run`` would end with, and its stderr lines.

    ``monai.bundle``'s ``__main__`` runs under ``runpy`` with the command's ``sys.argv``, so medad
    sees the bundle's command line as in the process (``medad.surfaces.workflow.check_command_line``), and
    an exception that ends it goes to the bundle process's ``sys.excepthook``,
    ``medad.surfaces.workflow.summarise_failure`` (the last stderr line). For refusals and failures whose
    outcome does not depend on the process boundary; test_run_safety.py checks that a real bundle
    process ends with the same line and a failure status."""
    return run_command_in_process(bundle_command(run_id, config_names, bundle_root, **overrides))


def run_command_in_process(command: list[str]) -> tuple[int, list[str]]:
    """:func:`run_bundle_in_process` for a ``python -m monai.bundle ...`` command made elsewhere
    (such as ``scripts/reproduction.py``'s grid): its exit status and stderr lines."""
    from medad.surfaces.workflow import summarise_failure

    assert command[1:3] == ["-m", "monai.bundle"], command
    argv, stderr, status = sys.argv, io.StringIO(), 0
    sys.argv = command[2:]  # runpy puts the module's file in sys.argv[0], as python -m does
    # MONAI applies the bundle's logging.conf with logging.config.fileConfig, which closes every
    # live handler; some (absl's, imported with onnxscript by the export tests) close their stream
    # unless it is sys.stderr at that moment, which the redirection below changes: the handlers on
    # this process's stderr (pytest's capture) are pointed at the interpreter's own meanwhile.
    on_outer = {handler: handler.stream for handler in (reference() for reference in logging._handlerList[:])
                if handler is not None and vars(handler).get("stream") is sys.stderr}
    for handler in on_outer:
        handler.stream = sys.__stderr__
    try:
        with contextlib.redirect_stderr(stderr):
            try:
                runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
            except SystemExit as ended:  # as the interpreter ends on it: no excepthook
                if ended.code is None or isinstance(ended.code, int):
                    status = ended.code or 0
                else:
                    print(ended.code, file=sys.stderr)
                    status = 1
            except Exception as error:  # what the process's excepthook receives (a Ctrl-C ends the tests)
                summarise_failure(type(error), error, error.__traceback__)
                status = 1
            # What the process's end would drop: the workflow and what it holds (its RunLock, open
            # files, progress bars, which would write to stderr after the summary if left open).
            gc.collect()
    finally:
        sys.argv = argv
        for handler, stream in on_outer.items():
            if handler.stream is sys.__stderr__:
                handler.stream = stream
    return status, stderr.getvalue().strip().splitlines()


def _console_handlers() -> list:
    """The plain ``logging.StreamHandler`` of every named logger: MONAI's ``get_logger`` (its
    handlers' loggers, ``monai.handlers.StatsHandler`` among them) gives a logger its own handler
    on ``sys.stdout`` as it is at the logger's creation, and stops it propagating to the root."""
    loggers = [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    return [handler for logger in loggers for handler in logger.handlers if type(handler) is logging.StreamHandler]


def run_bundle_logged_in_process(run_id: str, config_names: tuple[str, ...], bundle_root: Path,
                                 **overrides) -> tuple[int, str, list[str]]:
    """:func:`run_bundle_in_process` with the run's stdout captured too, where the bundle's log
    goes, as in a ``python -m monai.bundle`` process: the exit status, the stdout text and the
    stderr lines. Its ``logging.conf`` handler is bound to ``sys.stdout`` when MONAI applies it
    inside the run; the console handlers that loggers made by earlier runs or tests hold (see
    :func:`_console_handlers`; those on stderr stay) write to the run's stdout while it lasts.
    Afterwards the root logger's handlers and level are put back, the earlier handlers get their
    streams back, and the handlers made during the run write to this process's ``sys.stdout``."""
    return run_command_logged_in_process(bundle_command(run_id, config_names, bundle_root, **overrides))


def run_command_logged_in_process(command: list[str]) -> tuple[int, str, list[str]]:
    """:func:`run_bundle_logged_in_process` for a ``python -m monai.bundle ...`` command made
    elsewhere: the exit status, the stdout text and the stderr lines."""
    root_logger = logging.getLogger()
    handlers, level = root_logger.handlers[:], root_logger.level
    stdout = io.StringIO()
    earlier = {handler: handler.stream for handler in _console_handlers()
               if handler.stream not in (sys.stderr, sys.__stderr__)}
    try:
        # plain assignment, not setStream: setStream flushes the old stream, which may be an
        # earlier test's capture stream, closed by now
        for handler in earlier:
            handler.stream = stdout
        with contextlib.redirect_stdout(stdout):
            status, stderr = run_command_in_process(command)
    finally:
        for handler in _console_handlers():
            if handler.stream is stdout:  # handlers made during the run: the process's own stdout, which
                # outlives this test (and which the next run swaps for its stdout, as above)
                handler.stream = earlier.get(handler, sys.__stdout__)
        for handler in root_logger.handlers[:]:
            root_logger.removeHandler(handler)
        for handler in handlers:
            root_logger.addHandler(handler)
        root_logger.setLevel(level)
    return status, stdout.getvalue(), stderr


def run_bundle_here(run_id: str, config_names: tuple[str, ...], bundle_root: Path, **overrides) -> str:
    """:func:`run_bundle` inside this process (:func:`run_bundle_logged_in_process`): assert it
    succeeded and return its log (stdout, then stderr). For runs whose outcome does not depend on
    the process boundary; each ``python -m monai.bundle`` process pays ~12 CPU-s of imports."""
    status, stdout, stderr = run_bundle_logged_in_process(run_id, config_names, bundle_root, **overrides)
    log = stdout + "\n".join(stderr)
    assert status == 0, log[-6000:]
    return log


def common(dataset_dir: Path, backbone: dict) -> dict:
    """Overrides shared by the bundle tests: generated data, target Alpha, tiny backbone."""
    return {"dataset_dir": dataset_dir, "target": "Alpha", "num_workers": 0, "batch_size": 4, "eval_batch_size": 8, **backbone}


def copy_bundle(source: Path, destination: Path) -> Path:
    """A private copy of a shared bundle folder (its ``models/``, and ``eval/`` where evaluated),
    for a test that writes into its bundle root: the shared folder stays as it was."""
    shutil.copytree(source, destination)
    return destination


def scores_csv_image_auroc(path: Path) -> float:
    """scikit-learn's image AUROC on an evaluation's ``scores.csv`` rows: the column the metrics
    are computed on (``score_set_fused`` where the paper's set fusion applies, else ``score``)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    column = "score_set_fused" if "score_set_fused" in rows[0] else "score"
    return float(roc_auc_score([int(row["label"]) for row in rows], [float(row[column]) for row in rows]))


def sklearn_set_metrics(detector, dataset_dir: Path, target: str) -> dict[str, float]:
    """Image and pixel AUROC by scikit-learn on the detector's outputs for the whole test split,
    fused over the set with the set's own min-max ranges as the paper does: computed in this
    process, outside the bundle's streamed (binned) metrics, as an oracle for ``metrics.json``."""
    import numpy as np
    import torch

    from medad.io.data import bmad_datalist
    from medad.model.scoring import FusionRange
    from medad.io.transforms import mvfa_preprocessing

    items = bmad_datalist(dataset_dir, target, "test")
    preprocess = mvfa_preprocessing(detector.image_size)
    loaded = [preprocess(item) for item in items]
    images = torch.stack([torch.as_tensor(item["image"]) for item in loaded])
    masks = torch.stack([torch.as_tensor(item["mask"]) for item in loaded])[:, 0].numpy() > 0.5
    labels = np.array([item["label"] for item in items])
    with torch.no_grad():
        raw = detector.raw_scores(images)
    ranges = None
    if raw.few_map is not None:
        ranges = {name: FusionRange.of(getattr(raw, name)) for name in ("zero_map", "few_map", "zero_score", "few_score")}
    fused = detector.finalize(raw, ranges)
    return {
        "image_auroc": float(roc_auc_score(labels, fused.score.numpy())),
        "pixel_auroc": float(roc_auc_score(masks.ravel(), fused.anomaly_map.numpy().ravel())),
    }
