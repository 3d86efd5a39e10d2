"""What the bundle configs call where a user's input can be wrong, and the bundle entry point's
one-line ending.

MONAI's config parser wraps every exception in ``Failed to evaluate ConfigExpression`` and a
traceback of its own, hundreds of lines that end far from the reason. Under ``python -m
monai.bundle`` (and ``torchrun -m monai.bundle``) importing this module, which every medad config
does first, installs :func:`summarise_failure` as the process's exception hook: a run that fails
on a user-input problem (a missing or bad file, bad data, a model that does not fit, a bad
setting, a full disk) ends with one line, ``medad: <what and where, and what to do>``, found by
following the exception's ``__cause__`` and ``__context__`` to its root; any other failure ends
with its traceback and then that line. SIGTERM is handled as SIGINT is (the run unwinds: staged
outputs and temporary files are removed). Library functions, and the wrappers below, raise
ordinary exceptions, so Python callers (``monai.bundle.load``, ``ConfigWorkflow``) catch them.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, TypeVar

import torch

from medad.model.backbone import MVFA_MODEL_NAME, MissingWeightsError, default_image_size, weights_come_with_name
from medad.io.checks import check_items
from medad.model.decision import Thresholds, effective_thresholds
from medad.model.detector import MVFADetector, unwrap
from medad.model.factory import load_detector
from medad.io.discovery import is_dicom_input, list_inputs
from medad.model.methods import get_method
from medad.model.network import default_levels
from medad.engine.resume import check_resumable
from medad.surfaces.deploy import RUNTIMES, runtime_network
from medad.io.files import RunLock, discard_unfinished, disk_full, exception_chain

__all__ = [
    "CheckedData",
    "MissingModel",
    "RunError",
    "bundle_command",
    "check_choice",
    "check_command_line",
    "checked_output_format",
    "check_settings",
    "checked_items",
    "default_clip_weights",
    "default_device",
    "device_ids",
    "error_summary",
    "fewshot_seed_file",
    "init_distributed",
    "inference_threshold",
    "inputs",
    "lock_output",
    "lock_run",
    "map_formats",
    "map_range",
    "model_detector",
    "placed_network",
    "report_settings",
    "resumable",
    "run_engine",
    "run_step",
    "summarise_failure",
    "tracking_store",
    "unknown_keys",
    "validation_interval",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Errors that describe the user's input (files, data, settings), shown without a traceback.
INPUT_ERRORS = (OSError, ValueError, KeyError, MissingWeightsError)


class RunError(RuntimeError):
    """A bundle run cannot go on because of its input; the message says what and where, in one line."""


def _ending_on_input_errors(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except INPUT_ERRORS as error:
            raise RunError(str(error).strip()) from error

    return wrapper


class MissingModel(torch.nn.Module):
    """The ``network_def`` of an evaluation or inference whose model file does not exist (yet): a
    fresh checkout, or a release fetched without its weights. It lets MONAI's ``ConfigWorkflow``
    initialise the workflow and check its properties, which builds every component, without
    the model; the run itself does not start (:func:`run_engine`), and using the network ends
    it too, with one line naming the file (:meth:`error`).

    While the configs resolve, it answers what they read from a model (input size, levels,
    thresholds, map scale, fitted images) for the architecture the run asks for: ``expect``'s
    ``model_name``, ``image_size`` and ``levels`` where given, else MVFA's (``ViT-L-14-336`` at
    240 px, four levels), with no stored thresholds, no memory bank and no fitted images.
    """

    def __init__(self, path: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        given = {key: value for key, value in (expect or {}).items() if value is not None}
        self.path = str(path)
        self.image_size = int(given.get("image_size") or default_image_size(given.get("model_name", MVFA_MODEL_NAME)))
        self.levels = tuple(int(level) for level in given["levels"]) if "levels" in given else default_levels(24)
        self.method = get_method(given.get("method", "mvfa"))
        self.has_memory = False
        self.fitted: list[dict[str, Any]] = []

    def error(self) -> RunError:
        """Why the run cannot start, in one line naming the file."""
        if os.path.exists(self.path):
            return RunError(f"{self.path} appeared after this workflow's configs were resolved without it: "
                            "initialise the workflow again (or rerun the command)")
        return RunError(f"{self.path}: model file not found: train one (configs/train.json), fetch a release's "
                        "weights (python -m monai.bundle download_large_files), or set ckpt_dir to the folder of model.pt")

    def effective_thresholds(self) -> Thresholds:
        """The thresholds of :meth:`medad.MVFADetector.effective_thresholds` for a model without stored ones."""
        return effective_thresholds(Thresholds(), self.map_scale(), self.has_memory)

    def map_scale(self) -> tuple[float, float]:
        """The map range of :meth:`medad.MVFADetector.map_scale` for a model without memory."""
        return self.method.map_scale(len(self.levels), self.has_memory)

    def compile_paths(self, enabled: bool = True, **options: Any) -> MissingModel:
        """Nothing to compile (:meth:`medad.MVFADetector.compile_paths`)."""
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise self.error()


_load_model = _ending_on_input_errors(load_detector)


def model_detector(
    model: str | os.PathLike,
    clip_weights: str | os.PathLike | None = None,
    target: str | None = None,
    precision: str = "fp32",
    expect: Mapping[str, Any] | None = None,
    trust_model_paths: bool = False,
    device: str | torch.device = "cpu",
) -> MVFADetector | MissingModel:
    """The ``network_def`` of evaluation and inference: :func:`medad.load_detector` (same
    arguments; ``device`` also decides ``precision: auto``), ending the run on a bad or unfitting model file, or a :class:`MissingModel`
    while ``model`` does not exist, so that the configs resolve without it and the run ends when
    it starts, naming the file."""
    if not os.path.exists(model):
        return MissingModel(model, expect)
    return _load_model(model, clip_weights, target, precision, device, expect=expect, trust_model_paths=trust_model_paths)


@_ending_on_input_errors
def run_step(step: Callable[[], Any]) -> Any:
    """Call ``step`` (a bound method of a config component, such as inference's
    :meth:`medad.engine.archive.ArchiveRun.start`), ending the run with its whole message, in the
    bundle's one-line ending, on a user-input problem (the data checks' report lists every file)."""
    return step()


#: :func:`medad.io.checks.check_items`, ending the run with the report of every bad item.
checked_items = _ending_on_input_errors(check_items)
#: :func:`medad.io.discovery.list_inputs`, ending the run when no usable input is found.
inputs = _ending_on_input_errors(list_inputs)


class CheckedData(Sequence):
    """A data list that the run checks when it starts (:func:`checked_items`), the ``data`` of a
    config's ``Dataset``: training's sources, evaluation's test split (inference checks its
    inputs case by case in each process: :class:`medad.engine.archive.ArchiveRun`).

    Building it (while the configs resolve) reads and writes nothing. :meth:`check`, a step of
    the run (the configs' ``run`` list calls it before the engine starts; ``monai.bundle.load``
    and MONAI's property checks, which initialise a workflow without running it, do not), checks
    every item and writes ``report_name`` into ``report_dir`` where problems are found (with
    ``on_bad_data`` ``"raise"`` the run then ends, listing them; with ``"skip"`` the bad items
    are left out). Read before :meth:`check`
    (a caller that resolves the configs without running them), it checks the items the same way
    without writing the report.

    Args:
        items: data list items (``image``, optionally ``mask``, ``label``, ...).
        on_bad_data: ``"raise"`` or ``"skip"`` (:func:`medad.io.checks.check_items`' ``on_error``).
        report_dir, report_name: where the report of the problems found is written.
        remedy: what the error message tells the user to do (``check_items``' default if ``None``).

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> data = CheckedData([{"image": os.path.join(folder, "gone.png")}], on_bad_data="raise", report_dir=folder)
    >>> data, os.listdir(folder)  # built: nothing read, nothing written
    (CheckedData(1 items, not checked yet), [])
    >>> try:
    ...     data.check()
    ... except RunError as error:
    ...     print(str(error).splitlines()[-1][:34], os.listdir(folder))
    1 problem(s) in 1 of 1 items, list ['data_problems.csv']
    """

    def __init__(
        self,
        items: Sequence[dict],
        on_bad_data: str = "raise",
        report_dir: str | os.PathLike | None = None,
        report_name: str = "data_problems.csv",
        remedy: str | None = None,
    ) -> None:
        self.items = list(items)
        self.on_bad_data, self.report_dir, self.report_name, self.remedy = on_bad_data, report_dir, report_name, remedy
        self._kept: list[dict] | None = None
        self._reported = False

    def _checked(self, report_dir: str | os.PathLike | None) -> list[dict]:
        remedy = {} if self.remedy is None else {"remedy": self.remedy}
        return checked_items(self.items, on_error=self.on_bad_data, report_dir=report_dir,
                             report_name=self.report_name, **remedy)

    def check(self) -> CheckedData:
        """Check the items now, writing the report where problems are found (once per object)."""
        if not self._reported:
            self._kept = self._checked(self.report_dir)
            self._reported = True
        return self

    @property
    def kept(self) -> list[dict]:
        """The items that passed the checks (all of them with ``on_bad_data`` ``"raise"``)."""
        if self._kept is None:
            self._kept = self._checked(None)
        return self._kept

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index):
        return self.kept[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.kept)

    def __repr__(self) -> str:
        state = "checked" if self._reported else "not checked yet"
        return f"CheckedData({len(self.items)} items, {state})"
#: :func:`medad.engine.resume.check_resumable`, ending the run before it resumes with other settings.
resumable = _ending_on_input_errors(check_resumable)


def error_summary(error: BaseException) -> tuple[str, bool]:
    """The line a failed run ends with, and whether the failure is the user's input (shown
    without a traceback).

    The line comes from the root of the exception chain (``__cause__``, else ``__context__``),
    where the reason is: MONAI's ``Failed to evaluate ...`` and torch's ``unexpected pos`` are
    wrappers around it. A full disk anywhere in the chain is named as such. A :class:`RunError`
    is shown whole (the data checks' report lists every bad file before its summary line).

    >>> try:
    ...     try:
    ...         raise FileNotFoundError("/data/x.png: file not found")
    ...     except OSError as e:
    ...         raise RuntimeError("Failed to evaluate ConfigExpression") from e
    ... except RuntimeError as wrapped:
    ...     error_summary(wrapped)
    ('/data/x.png: file not found', True)
    """
    if isinstance(error, KeyboardInterrupt):
        return (f"interrupted ({error or 'SIGINT'}): earlier results are unchanged, this run's unfinished outputs removed "
                "(inference keeps the cases it finished: rerun the same command to continue)"), True
    chain = exception_chain(error)
    root = disk_full(error) or next((e for e in chain if isinstance(e, RunError)), chain[-1])
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    if isinstance(root, RunError):
        return "\n".join(lines), True
    text = lines[-1] if lines else ""
    if isinstance(root, (OSError, ValueError, MissingWeightsError)):  # a KeyError is more often a bug
        return text or type(root).__name__, True
    return f"the run failed: {type(root).__name__}: {text}", False


def _close_progress_bars() -> None:
    """Close the run's progress bars now: a bar left open redraws itself when the interpreter
    collects it at exit, after the summary, which then is no longer the last line. Ignite's
    ``ProgressBar`` closes its ``tqdm`` bar only when an epoch completes, and neither has a public
    list of open bars; tqdm's own registry of instances is read for that, here only."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def summarise_failure(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    """``sys.excepthook`` of a bundle run: the traceback (to the log only for user-input
    problems) and then :func:`error_summary`'s line as the last line on stderr."""
    text, user = error_summary(error)
    _close_progress_bars()
    if user:
        logger.debug("the run failed", exc_info=(kind, error, trace))
    else:
        traceback.print_exception(kind, error, trace)
    print(f"medad: {text}", file=sys.stderr, flush=True)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def _bundle_command_line() -> list[str] | None:
    """``sys.argv`` when this process is ``python -m monai.bundle`` (also under torchrun), else ``None``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return list(sys.argv) if spec is not None and spec.name in ("monai.bundle.__main__", "monai.bundle") else None


def _install_bundle_entry_point() -> None:
    if _bundle_command_line() is None or sys.excepthook is summarise_failure:
        return
    sys.excepthook = summarise_failure
    try:
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread: leave signals alone
        pass


#: ``python -m monai.bundle run`` arguments that are MONAI's, not config keys.
_MONAI_ARGUMENTS = {
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_type", "workflow_name", "properties_path",
}
#: The key that lists keys to pass on purpose although no config defines them.
EXTRA_KEYS = "extra_keys"
#: Why a run refuses a key that users bring from another run, said instead of the nearest key.
KEY_HINTS = {
    "amp": "amp is a training option (train.json): evaluation and inference run the model in float32, or "
           "with --precision bf16 (or fp16) for the frozen blocks' matrix products; leave --amp out",
}


def _plain_key(key: str) -> str:
    """A command-line key as configs spell it (``+imports`` -> ``imports``, ``a::b`` -> ``a#b``)."""
    return key.lstrip("+").replace("::", "#")


def unknown_keys(config_files: Sequence[str | os.PathLike], overrides: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """One message per override key that no config defines (a misspelt ``--epoch`` would otherwise
    be accepted and do nothing), with the nearest known key, or for a key of :data:`KEY_HINTS`
    (``amp`` at inference) why the run does not take it.

    Args:
        config_files: the run's config files, merged in order as MONAI merges them.
        overrides: the keys given (``epochs``, ``train#trainer#max_epochs``, ``+imports``).
        extra: keys to accept all the same (``--extra_keys "['my_key']"``).
    """
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    parser = ConfigParser(ConfigParser.load_config_files([str(path) for path in config_files]))
    known = set(parser.get()) | set(DEFAULT_MLFLOW_SETTINGS["configs"]) | _MONAI_ARGUMENTS | {EXTRA_KEYS}
    problems = []
    for key in overrides:
        plain = _plain_key(key)
        if plain in known or plain in set(extra) or plain.startswith("_meta_") or plain in parser:
            continue
        if plain in KEY_HINTS:
            problems.append(f"--{key}: {KEY_HINTS[plain]}")
            continue
        nearest = difflib.get_close_matches(plain, sorted(known), n=1)
        hint = f"did you mean --{nearest[0]}?" if nearest else "no config defines it"
        problems.append(f"--{key}: {hint} (to pass a key no config defines on purpose, add --{EXTRA_KEYS} \"['{plain}']\")")
    return problems


def _command_line_pairs(argv: Sequence[str]) -> dict[str, str]:
    """The ``--key value`` pairs of a ``monai.bundle run`` command line (as ``fire`` reads them:
    ``--key value`` or ``--key=value``)."""
    pairs: dict[str, str] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--") and len(token) > 2:
            key, has_value, value = token[2:].partition("=")
            if not has_value and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                index += 1
                value = argv[index]
            pairs[key] = value
        index += 1
    return pairs


def _literal(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_command_line(refused: Sequence[str] = ()) -> None:
    """Refuse ``--key`` overrides that no config of this ``python -m monai.bundle run`` defines,
    naming the nearest known key (every config calls this first), and the ``refused`` keys,
    which a merged config defines for another run (evaluation merges train.json, and refuses its
    ``amp``), with their :data:`KEY_HINTS`. Nothing to check for Python callers, which pass
    their keys as arguments (see :func:`unknown_keys`)."""
    argv = _bundle_command_line()
    if argv is None or "run" not in argv[1:3]:
        return
    pairs = _command_line_pairs(argv[1:])
    if "args_file" in pairs:
        from monai.bundle import ConfigParser

        pairs = {**{k: str(v) for k, v in ConfigParser.load_config_file(pairs["args_file"]).items()}, **pairs}
    files = _literal(pairs.get("config_file", ""))
    files = [files] if isinstance(files, str) else list(files)
    files = [f for name in files for f in str(name).split(",") if f] if len(files) == 1 and not Path(files[0]).is_file() else files
    extra = _literal(pairs.get(EXTRA_KEYS, "[]"))
    extra = [extra] if isinstance(extra, str) else list(extra)
    problems = unknown_keys(files, [key for key in pairs if key not in _MONAI_ARGUMENTS], extra)
    problems += [f"--{key}: {KEY_HINTS.get(_plain_key(key), 'this run does not take it')}"
                 for key in pairs if _plain_key(key) in refused]
    if problems:
        raise RunError("; ".join(problems))


def tracking_store(uri: str) -> str:
    """``uri`` (an MLflow tracking URI) once its store is known to be writable: a local store
    (``sqlite:///``, ``file:``, a plain path) whose folder cannot be created or written ends the
    run at once naming it, where MLflow would retry for minutes without naming it. Remote
    stores (``http(s)://``, ``databricks``) are left to MLflow."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent  # sqlite:////abs/x.db -> /abs, sqlite:///x.db -> .
    elif parsed.scheme in ("", "file"):
        folder = Path(parsed.path or uri)
    else:
        return uri
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RunError(f"MLflow tracking store {uri}: cannot write to {folder} ({error.strerror or error}): choose "
                       "another --tracking_uri or make the folder writable") from error
    return uri


def lock_run(folder: str | os.PathLike, what: str = "run", filename: str = ".medad.lock") -> RunLock:
    """Take ``folder``'s :class:`medad.io.files.RunLock` for this process (one run at a time), ending the
    run at once, naming the other run, when another process holds it."""
    try:
        return RunLock(folder, what, filename).acquire()
    except OSError as error:
        raise RunError(str(error)) from error


def lock_output(output_dir: str | os.PathLike) -> RunLock:
    """:func:`lock_run` for an output folder written as a whole (inference): the lock file lies
    beside it (``.<name>.lock``), since the folder itself is replaced when the run publishes."""
    output = Path(output_dir)
    return lock_run(output.parent, f"inference into {output.name}", f".{output.name}.lock")


_install_bundle_entry_point()


@_ending_on_input_errors
def check_choice(name: str, value: Any, choices: Sequence[Any], hint: str = "") -> Any:
    """``value`` if it is one of ``choices``; otherwise end the run naming the setting (and
    ``hint``, e.g. the overlay file a mode needs)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}" + (f": {hint}" if hint else ""))
    return value


@_ending_on_input_errors
def checked_output_format(output_format: str, inputs: Any) -> str:
    """Inference's ``output_format`` (:data:`medad.io.dicom_results.OUTPUT_FORMATS`: ``nifti``,
    ``dicom`` or ``both``) once it is one of them and, for ``dicom`` and ``both``, every input
    (``inputs``: :func:`inputs`' cases, or their paths) is DICOM (a DICOM file or series folder,
    :func:`medad.io.discovery.is_dicom_input`); otherwise the run ends before anything is
    scored, naming the key and its choices, or the first input that is not DICOM."""
    from medad.io.dicom_results import OUTPUT_FORMATS

    check_choice("output_format", output_format, OUTPUT_FORMATS)
    if output_format != "nifti":
        for path in getattr(inputs, "paths", inputs):
            if not is_dicom_input(path):
                raise ValueError(
                    f"{path}: not a DICOM file or series folder: output_format {output_format!r} writes DICOM results "
                    "for DICOM inputs only; set output_format to 'nifti' or leave this input out"
                )
    return output_format


@_ending_on_input_errors
def map_formats(map_format: str | Sequence[str], output_format: str = "nifti") -> list[str]:
    """The map files :class:`medad.io.outputs.SaveMapd` writes: ``map_format`` (checked against
    :data:`medad.io.outputs.MAP_FORMATS`), none for ``output_format`` ``dicom`` (the map goes into
    a DICOM Parametric Map instead).

    >>> map_formats("nifti"), map_formats(["nifti", "png"], "both"), map_formats("nifti", "dicom")
    (['nifti'], ['nifti', 'png'], [])
    """
    from medad.io.outputs import MAP_FORMATS

    formats = [map_format] if isinstance(map_format, str) else list(map_format)
    if not formats or any(f not in MAP_FORMATS for f in formats):
        raise ValueError(f"map_format must be one of {list(MAP_FORMATS)} or a list of them, got {map_format!r}")
    return [] if output_format == "dicom" else formats


@_ending_on_input_errors
def check_settings(
    model_selection: str, model_selection_modes: Sequence[str], fusion: str, on_bad_data: str, hint: str = ""
) -> None:
    """The ``settings_check`` of training and evaluation: :func:`check_choice` of
    ``model_selection`` (among ``model_selection_modes``, with ``hint`` when it is not), ``fusion``
    and ``on_bad_data``."""
    check_choice("model_selection", model_selection, model_selection_modes, hint)
    check_choice("fusion", fusion, ["set", "calibrated"])
    check_choice("on_bad_data", on_bad_data, ["raise", "skip"])


def default_device(distributed: bool = False) -> torch.device:
    """The ``device`` of the workflows: ``cuda:0`` where CUDA is available (``distributed``: the
    process's ``cuda:<LOCAL_RANK>``, as ``torchrun`` sets it), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda:" + os.environ["LOCAL_RANK"] if distributed else "cuda:0")


def device_ids(device: torch.device) -> list[torch.device] | None:
    """``DistributedDataParallel``'s ``device_ids`` for a network on ``device``: ``[device]`` on a
    GPU, ``None`` on the CPU.

    >>> device_ids(torch.device("cpu")) is None
    True
    """
    return [device] if device.type == "cuda" else None


def init_distributed(device: torch.device, backend: str | None = None) -> None:
    """The multi-GPU overlays' start step: join the ``torch.distributed`` process group (unless
    this process has joined it already) with ``backend`` (``None``: NCCL where CUDA is
    available, else gloo), and make ``device`` the process's CUDA device when it is one."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if device.type == "cuda":
        torch.cuda.set_device(device)


def default_clip_weights(clip_model: str) -> str | None:
    """Training's default ``clip_weights``: none for backbones whose name brings their weights
    (``hf-hub:``, ``local-dir:``), else ``"openai"``."""
    return None if weights_come_with_name(clip_model) else "openai"


def validation_interval(data_loader: Sized) -> int:
    """Training's ``val_interval`` (iterations between validations, with paper_selection.json):
    five validations per epoch, at least one iteration apart.

    >>> validation_interval(range(12)), validation_interval(range(3))
    (2, 1)
    """
    return max(1, len(data_loader) // 5)


def fewshot_seed_file(seed_dir: str | os.PathLike | None, target: str, shot: int) -> str | None:
    """MVFA's seed file of ``target`` at ``shot`` shots under ``seed_dir``
    (``<seed_dir>/<target>/<shot>-shot.txt``), or ``None`` without a ``seed_dir``.

    >>> fewshot_seed_file("seeds", "Brain", 4), fewshot_seed_file(None, "Brain", 4)
    ('seeds/Brain/4-shot.txt', None)
    """
    return None if seed_dir is None else os.path.join(seed_dir, target, str(shot) + "-shot.txt")


def report_settings(dataset_dir: str | os.PathLike, fitted: Sequence[Mapping[str, Any]] = (), **settings: Any) -> dict[str, Any]:
    """The settings an evaluation report lists: ``dataset_dir`` (as text), ``settings`` in their
    order, and the images the model was fitted on (``role: name`` of each ``fitted`` record,
    left out of the evaluation).

    >>> report_settings(Path("data"), [{"role": "support", "name": "a.png"}], target="Brain")
    {'dataset_dir': 'data', 'target': 'Brain', 'fitted on (left out of this evaluation)': ['support: a.png']}
    """
    return {
        "dataset_dir": str(dataset_dir),
        **settings,
        "fitted on (left out of this evaluation)": [record["role"] + ": " + record["name"] for record in fitted],
    }


def inference_threshold(detector: Any, threshold: float | str = "model") -> float:
    """Inference's image threshold: the model's (:meth:`medad.MVFADetector.effective_thresholds`)
    for ``"model"``, else ``threshold`` as given.

    >>> inference_threshold(MissingModel("model.pt"), 0.5)
    0.5
    """
    return detector.effective_thresholds().image if threshold == "model" else threshold


def map_range(detector: Any, overlay_range: Sequence[float] | None = None) -> Sequence[float]:
    """The value range of inference's overlays: ``overlay_range`` where given, else the model's
    map scale (:meth:`medad.MVFADetector.map_scale`).

    >>> map_range(MissingModel("model.pt"), (0.0, 1.0))
    (0.0, 1.0)
    """
    return overlay_range if overlay_range is not None else detector.map_scale()


@_ending_on_input_errors
def placed_network(
    detector: MVFADetector,
    device: Any,
    compile: bool = False,
    runtime: str = "torch",
    export_dir: str | os.PathLike | None = None,
) -> MVFADetector:
    """The ``network`` of every workflow: ``detector`` on ``device``, run through
    ``torch.compile`` when ``compile`` is true (:meth:`medad.MVFADetector.compile_paths`); for
    inference's ``runtime`` ``"onnxruntime"`` or ``"openvino"``, its graph exported into
    ``export_dir`` and run there (:func:`medad.surfaces.deploy.runtime_network`)."""
    check_choice("compile", compile, [False, True])
    check_choice("runtime", runtime, list(RUNTIMES))
    return runtime_network(detector, device, runtime, bool(compile), export_dir)


def run_engine(engine: Any, lock: RunLock | None = None, then: Callable[[], Any] | None = None) -> None:
    """Run a MONAI engine (or anything with ``run()``) holding ``lock``, the run's
    :class:`medad.io.files.RunLock`, which is given back when the run ends; ``then`` is called
    after the engine, still holding the lock (inference's :meth:`medad.engine.archive.ArchiveRun.finish`,
    which must also run where this process had nothing left to score and MONAI skipped the
    engine's run). However it fails (an
    exception in any handler, whatever their order; SIGINT; SIGTERM under the bundle), the staging
    folders of its outputs are removed (:func:`medad.io.files.discard_unfinished`) before the error
    goes on to the caller; under the bundle the run then ends with the one line of
    :func:`summarise_failure`. An engine whose network is a :class:`MissingModel` does not
    start: the run ends naming the missing model file."""
    try:
        network = unwrap(getattr(engine, "network", None))
        if isinstance(network, MissingModel):
            raise network.error()
        engine.run()
        if then is not None:
            then()
    except BaseException:
        discard_unfinished()
        raise
    finally:
        if lock is not None:
            lock.release()


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
