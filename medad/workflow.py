"""What the bundle configs call where a user's input can be wrong: the library's functions, with
errors that end the run with one clear last line.

MONAI's config parser wraps every exception in ``Failed to evaluate ConfigExpression`` and a
traceback of its own, hundreds of lines that end far from the reason. These wrappers let a
user-input problem (a missing or bad file, bad data, a model that does not fit, a bad setting)
end the process with its message as the last line and exit status 1 (:class:`RunError`, a
``SystemExit``), and log any other failure's traceback before a one-line summary. From Python,
call the library functions themselves: they raise ordinary exceptions.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from medad.backbone import MissingWeightsError
from medad.checks import check_items
from medad.detector import MVFADetector, load_detector
from medad.handlers import check_resumable
from medad.volumes import list_inputs

__all__ = [
    "RunError",
    "bundle_command",
    "check_choice",
    "checked_items",
    "inputs",
    "model_detector",
    "placed_network",
    "resumable",
    "run_engine",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Errors that describe the user's input (files, data, settings), shown without a traceback.
INPUT_ERRORS = (OSError, ValueError, KeyError, MissingWeightsError)


class RunError(SystemExit):
    """Ends a bundle run: Python prints the message as the last line and exits with status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"medad: {message}" if "\n" not in message else f"medad:\n{message}")


def _ending_on_input_errors(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except INPUT_ERRORS as error:
            logger.debug("%s failed", function.__name__, exc_info=True)
            raise RunError(str(error).strip()) from error

    return wrapper


#: :func:`medad.load_detector`, ending the run on a missing, bad or unfitting model file.
model_detector = _ending_on_input_errors(load_detector)
#: :func:`medad.checks.check_items`, ending the run with the report of every bad item.
checked_items = _ending_on_input_errors(check_items)
#: :func:`medad.volumes.list_inputs`, ending the run when no usable input is found.
inputs = _ending_on_input_errors(list_inputs)
#: :func:`medad.handlers.check_resumable`, ending the run before it resumes with other settings.
resumable = _ending_on_input_errors(check_resumable)


@_ending_on_input_errors
def check_choice(name: str, value: Any, choices: Sequence[Any], hint: str = "") -> Any:
    """``value`` if it is one of ``choices``; otherwise end the run naming the setting (and
    ``hint``, e.g. the overlay file a mode needs)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}" + (f": {hint}" if hint else ""))
    return value


@_ending_on_input_errors
def placed_network(detector: MVFADetector, device: Any, compile: bool = False) -> MVFADetector:
    """The ``network`` of every workflow: ``detector`` on ``device``, run through
    ``torch.compile`` when ``compile`` is true (:meth:`medad.MVFADetector.compile_paths`)."""
    check_choice("compile", compile, [False, True])
    return detector.to(device).compile_paths(bool(compile))


def run_engine(engine: Any) -> None:
    """Run a MONAI engine; a failure ends the run with a one-line summary of its root cause after
    the traceback in the log (errors raised in DataLoader workers carry the worker's traceback
    in their text: the summary keeps its last line, the reason)."""
    try:
        engine.run()
    except Exception as error:  # any failure: the traceback is logged, the summary ends the output
        logger.error("the run failed", exc_info=True)
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
        raise RunError(f"the run failed: {type(root).__name__}: {lines[-1] if lines else ''}") from error


def _cli_value(value: object) -> str:
    """A value as ``python -m monai.bundle`` parses it back (Python literals through ``fire``)."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return repr([str(v) if isinstance(v, os.PathLike) else v for v in value])
    return repr(value)


def bundle_command(
    run_id: str,
    config_files: Sequence[str | os.PathLike],
    bundle_root: str | os.PathLike,
    overrides: Mapping[str, object] | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The ``python -m monai.bundle run`` command line of a medad workflow: ``config_files``
    merged in order (``metadata.json`` and ``logging.conf`` from the first one's folder),
    ``bundle_root``, and ``--key value`` per override (what the demo, the reproduction grid and
    the tests run).

    >>> bundle_command("training", ["configs/train.json"], "runs/a", {"epochs": 2})[3:6]
    ['run', 'training', '--config_file']
    """
    configs = Path(config_files[0]).parent
    command = [
        python, "-m", "monai.bundle", "run", run_id,
        "--config_file", repr([str(path) for path in config_files]),
        "--meta_file", str(configs / "metadata.json"),
        "--logging_file", str(configs / "logging.conf"),
        "--bundle_root", str(bundle_root),
    ]
    for key, value in (overrides or {}).items():
        command += [f"--{key}", _cli_value(value)]
    return command
