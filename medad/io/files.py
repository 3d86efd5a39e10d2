"""Safe file output: write to a temporary name beside the target, then rename; publish a run's
output folder as a whole.

Files are created with mode ``0o666`` less the process's umask, as ``open()`` creates them, so
colleagues on a shared filesystem read results as they read any other file of the user's.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fnmatch
import hashlib
import logging
import os
import shutil
import socket
import sys
import math
import re
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, ClassVar

from monai.data import ImageWriter

__all__ = [
    "OUTPUT_MARKER",
    "RunLock",
    "StagedOutput",
    "atomic_image_writer",
    "atomic_write",
    "check_output_folder",
    "content_sha256",
    "discard_unfinished",
    "disk_full",
    "exception_chain",
    "output_stem",
    "register_unfinished",
    "remove_temporaries",
    "strict_json",
    "temporary_name",
]

logger = logging.getLogger(__name__)


def output_stem(path: str | os.PathLike) -> str:
    """The name a case's outputs start with, as MONAI's ``SaveImage`` makes it (one extension, or
    two ending in ``.gz``, removed): ``scan`` for ``scan.nii.gz``, the folder name of a DICOM series."""
    stem, extension = os.path.splitext(Path(path).name)
    return os.path.splitext(stem)[0] if extension == ".gz" else stem


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a folder's (a DICOM series): its files' relative names
    and bytes in sorted order. The content, not the name, identifies an image: a copy of a
    support image under another name is still the support image (the fitted-image records of
    :func:`medad.io.data.fitted_records`), and a model file's content keys its DICOM results'
    UIDs (:func:`medad.io.dicom_results.result_uids`)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def strict_json(value: Any) -> Any:
    """``value`` made fit for strict JSON (``json.dump(..., allow_nan=False)``): non-finite floats
    (NaN, infinities: metrics of a data set without masks or without both classes) become
    ``None`` (``null``), numpy and torch scalars and arrays become Python numbers and lists, tuples
    become lists; dictionaries and lists are converted recursively, anything else is returned as
    it is. Python's ``json`` writes NaN as a bare ``NaN``, which no other JSON parser accepts.

    >>> import numpy as np
    >>> strict_json({"auroc": float("nan"), "scores": (np.float32(0.5), float("inf")), "n": np.int64(3)})
    {'auroc': None, 'scores': [0.5, None], 'n': 3}
    """
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if not isinstance(value, (str, bytes)) and hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return strict_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def temporary_name(path: str | os.PathLike) -> Path:
    """A unique hidden name beside ``path`` that keeps its extensions (``.nii.gz`` stays the
    format MONAI's writers pick from the name)."""
    path = Path(path)
    return path.with_name(f".{uuid.uuid4().hex[:12]}.{path.name}")


_TEMPORARY = re.compile(r"^\.[0-9a-f]{12}\.")


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Remove the temporary files (:func:`temporary_name`) that writers killed mid-write (SIGKILL)
    left anywhere under ``folder``; returns how many. What a resumed run calls before it writes."""
    removed = 0
    for path in Path(folder).rglob(".*"):
        if path.is_file() and _TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _fsync_file(path: Path) -> None:
    """Force ``path``'s bytes to disk (before it is renamed into place and recorded as finished)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` and move it onto ``path`` only when the block
    finishes without error, so that readers never see a half-written file. The file gets the
    permissions ``open()`` would give it (``0o666`` less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        _raise_if_disk_full(error, path)
        raise


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it, outermost first (``__cause__``, else ``__context__``), each once."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def disk_full(error: BaseException) -> OSError | None:
    """The "no space left on device" ``OSError`` in ``error``'s chain, or ``None``."""
    return next((e for e in exception_chain(error) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)


def _raise_if_disk_full(error: BaseException, path: Path) -> None:
    """Re-raise a write failure whose cause is a full disk as the ``OSError`` that says so and
    where (torch and the image writers wrap it in errors of their own, such as ``unexpected pos``)."""
    if disk_full(error) is not None:
        raise OSError(errno.ENOSPC, f"No space left on device while writing {path}") from error


def atomic_image_writer(writer_class: type[ImageWriter]) -> type[ImageWriter]:
    """A subclass of a MONAI image writer (for ``SaveImage(writer=...)``) whose files appear
    only once complete: MONAI's writers write in place, so a killed run would leave a half map.
    """

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs) -> None:
        path = Path(filename)
        temporary = temporary_name(path)
        try:
            writer_class.write(self, temporary, verbose=verbose, **kwargs)
            _fsync_file(temporary)  # on disk before a resumable run's ledger records the item
            os.replace(temporary, path)
        except BaseException as error:
            temporary.unlink(missing_ok=True)
            _raise_if_disk_full(error, path)
            raise

    doc = f"MONAI's {writer_class.__name__}, writing each file to a temporary name and renaming it."
    return type(f"Atomic{writer_class.__name__}", (writer_class,), {"write": write, "__doc__": doc})


#: The file that marks a folder as written by a medad run: ``overwrite`` replaces no other folder.
OUTPUT_MARKER = ".medad-output"

#: Staged outputs prepared and neither published nor discarded yet (see :func:`discard_unfinished`).
_UNFINISHED: dict[int, Any] = {}


def discard_unfinished() -> None:
    """Remove the staging folder of every :class:`StagedOutput` of this process that was prepared
    but not published (and :meth:`discard` every other output registered with
    :func:`register_unfinished`): what a failed or interrupted run calls on its way out (also at exit)."""
    for staged in list(_UNFINISHED.values()):
        staged.discard()


def register_unfinished(output: Any, unfinished: bool = True) -> None:
    """Have :func:`discard_unfinished` call ``output.discard()`` if the run fails (``unfinished``
    false: no longer, the output is complete); for outputs other than :class:`StagedOutput`,
    such as :class:`medad.engine.archive.ArchiveRun`."""
    if unfinished:
        _UNFINISHED[id(output)] = output
    else:
        _UNFINISHED.pop(id(output), None)


atexit.register(discard_unfinished)


#: What inference writes into its output folder (before :data:`OUTPUT_MARKER` existed, too).
_INFERENCE_OUTPUTS = ("scores.csv", "input_problems.csv", "overlays", "slices", "*_anomaly_map.nii.gz")


def _written_by_medad(folder: Path, names: list[str]) -> bool:
    """Whether ``folder`` (holding ``names``) is a medad run's output: it carries
    :data:`OUTPUT_MARKER`, or (written before the marker existed) it holds ``scores.csv`` and
    nothing but what inference writes."""
    if (folder / OUTPUT_MARKER).is_file():
        return True
    return "scores.csv" in names and all(any(fnmatch.fnmatch(name, kind) for kind in _INFERENCE_OUTPUTS) for name in names)


def _is_rank_zero() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` launch (``RANK``), or the only process;
    read from the environment, as it must be before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_output_folder(output_dir: str | os.PathLike, protected: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an ``output_dir`` that a run's outputs or ``overwrite`` could destroy user data in:
    one that is or contains a ``protected`` path (the input data, the bundle, its models), or
    lies inside the input data or the models folder. ``protected`` maps what each path is (named
    in the message) to the path; ``None`` paths are ignored.

    >>> check_output_folder("/data/run1/outputs", {"bundle_root": "/data/run1"})  # inside the bundle: fine
    """
    output = Path(output_dir).expanduser().resolve()
    for name, path in protected.items():
        if path in (None, ""):
            continue
        guarded = Path(path).expanduser().resolve()
        inside = _within(output, guarded) and name != "bundle_root"
        if _within(guarded, output) or inside:
            how = "is" if output == guarded else ("contains" if _within(guarded, output) else "lies inside")
            raise ValueError(
                f"output_dir {output} {how} {name} {guarded}: medad writes (and with overwrite replaces) its output "
                "folder as a whole, which would destroy it: choose an output_dir of its own, e.g. a new folder "
                "beside the inputs"
            )


class StagedOutput:
    """A run's output folder, written in a staging folder beside it and published as a whole.

    The run writes into :attr:`staging` (``.<name>.partial`` beside ``output_dir``); only when it
    completes does :meth:`publish` put the staging folder in place of ``output_dir``, so that a
    failed or killed run leaves the previous results untouched. Whatever way a run fails (an
    exception in any handler, SIGINT, SIGTERM, a failure while the config resolves), its staging
    folder is removed: :func:`discard_unfinished` runs when :func:`medad.surfaces.workflow.run_engine`
    fails and when the process exits; a staging folder left by a killed process (SIGKILL) is
    cleared by the next :meth:`prepare`. Building it touches nothing: the configs resolve the
    staging folder's path (:attr:`staging_dir`) for the writers, and :meth:`prepare` is a step of
    the run (the configs' ``run`` list calls it before the engine starts).

    ``overwrite``: a non-empty ``output_dir`` is refused (the message lists what is there)
    unless it is set; then the previous run's outputs are replaced as a whole, none of them
    stays beside the new ones. Only a folder that a medad run wrote (it holds
    :data:`OUTPUT_MARKER`) is ever replaced, and ``output_dir`` must keep clear of the
    ``protected`` paths (:func:`check_output_folder`).

    ``merge``: publish by moving each entry of the staging folder into ``output_dir``, replacing
    entries of the same name and keeping the others (evaluation results beside training's logs).

    Attach it to an engine (``handlers``) to publish when the engine completes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        protected: Mapping[str, str | os.PathLike | None] | None = None,
        merge: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.staging = self.output_dir.with_name(f".{self.output_dir.name}.partial")
        self.overwrite, self.merge = bool(overwrite), bool(merge)
        self.protected = dict(protected or {})

    @property
    def staging_dir(self) -> str:
        """The staging folder's path (what the run's writers write into), as text; it is created
        by :meth:`prepare`, a step of the run."""
        return str(self.staging)

    def check(self) -> None:
        """Refuse an ``output_dir`` this run may not write (see the class): nothing is written."""
        check_output_folder(self.output_dir, self.protected)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"output_dir {self.output_dir} is a file, not a folder")
        present = sorted(p.name for p in self.output_dir.iterdir()) if self.output_dir.is_dir() else []
        present = [name for name in present if name != OUTPUT_MARKER]
        if present and not self.merge:
            shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
            if not self.overwrite:
                raise FileExistsError(
                    f"output_dir {self.output_dir} is not empty ({shown}): choose another output_dir, or set "
                    "overwrite to true to replace all of it with this run's outputs"
                )
            if not _written_by_medad(self.output_dir, present):
                raise FileExistsError(
                    f"output_dir {self.output_dir} was not written by medad (it holds {shown} but no {OUTPUT_MARKER} "
                    "marker): overwrite replaces only folders of earlier medad runs; choose another output_dir"
                )

    def prepare(self) -> str:
        """:meth:`check` ``output_dir`` and create an empty staging folder; returns the staging
        folder's path. Under ``torch.distributed`` only rank 0 (``RANK``) touches the folders: the
        others write nothing (medad's writers gather their rows to rank 0)."""
        self.check()
        if not _is_rank_zero():
            return str(self.staging)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        if not self.merge:
            (self.staging / OUTPUT_MARKER).write_text("written by a medad run; overwrite may replace this folder\n")
        _UNFINISHED[id(self)] = self
        return str(self.staging)

    def publish(self, *_: object) -> None:
        """Put the staging folder in place of ``output_dir`` (the previous one is removed), or
        with ``merge`` its entries into ``output_dir``."""
        if not _is_rank_zero():
            return
        if self.merge:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for entry in sorted(self.staging.iterdir()):
                target = self.output_dir / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            previous = self.output_dir.with_name(f".{self.output_dir.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            if self.output_dir.exists():
                os.replace(self.output_dir, previous)
            os.replace(self.staging, self.output_dir)
            shutil.rmtree(previous, ignore_errors=True)
        _UNFINISHED.pop(id(self), None)
        logger.info("outputs written to %s", self.output_dir)

    def discard(self, *_: object) -> None:
        """Remove the staging folder (the run failed: ``output_dir`` stays as it was)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        _UNFINISHED.pop(id(self), None)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self.publish)


class BundleBusyError(OSError):
    """Another run holds the folder's :class:`RunLock`; the message names it."""


class RunLock:
    """One run at a time in a folder: an exclusive ``flock`` on ``<folder>/<filename>``.

    Two trainings into one ``bundle_root`` would rotate each other's checkpoints away and race on
    ``model.pt``; the second one is refused at once, naming the first (its process id, host,
    command and start time, which the holder writes into the lock file). The kernel releases the
    lock when its process ends, however it ends, so a killed run leaves nothing stuck behind.
    A process may take the same folder's lock again (re-entrant: :meth:`acquire` returns the
    holder), as a Python caller running several workflows of one bundle does; the lock is given
    back when the object that holds it is dropped, e.g. with the ``ConfigWorkflow`` that took
    it. Under ``torch.distributed`` only rank 0 (``RANK``) takes it. Without ``fcntl`` (Windows) runs are not locked (a warning says so).
    """

    _held: ClassVar[dict[Path, weakref.ref[RunLock]]] = {}  # lock file -> its holder in this process

    def __init__(self, folder: str | os.PathLike, what: str = "run", filename: str = ".medad.lock") -> None:
        self.folder, self.what, self.filename = Path(folder), what, filename
        self._descriptor: int | None = None
        self._key: Path | None = None

    def acquire(self) -> RunLock:
        """Take the lock; raises :class:`BundleBusyError` naming the run that holds it."""
        if not _is_rank_zero():
            return self
        try:
            import fcntl
        except ImportError:
            logger.warning("no fcntl on this platform: runs in %s are not protected from each other", self.folder)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve() / self.filename
        holder = self._held.get(key)
        if holder is not None and holder() is not None:
            return holder()  # this process holds it already
        descriptor = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder_text = os.read(descriptor, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(descriptor)
            raise BundleBusyError(
                f"{self.folder} is in use by another medad run ({holder_text}): wait for it to end, or use another "
                "bundle_root (one run at a time per bundle)",
            ) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        command = " ".join(sys.argv)[:300]
        record = f"{self.what}, pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"
        os.ftruncate(descriptor, 0)
        os.write(descriptor, record.encode("utf-8"))
        self._descriptor, self._key = descriptor, key
        self._held[key] = weakref.ref(self)
        return self

    def release(self) -> None:
        """Give the lock back; it is also given back when this object is dropped (the workflow
        that took it ends) and when the process ends."""
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor releases its flock
            self._held.pop(self._key, None)
            self._descriptor = None

    __del__ = release
