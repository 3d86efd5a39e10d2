"""Safe file output: write to a temporary name beside the target, then rename; publish a run's
output folder as a whole.

Files are created with mode ``0o666`` less the process's umask, as ``open()`` creates them, so
colleagues on a shared filesystem read results as they read any other file of the user's.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from monai.data import ImageWriter

__all__ = ["StagedOutput", "atomic_image_writer", "atomic_write", "output_stem", "temporary_name"]

logger = logging.getLogger(__name__)


def output_stem(path: str | os.PathLike) -> str:
    """The name a case's outputs start with, as MONAI's ``SaveImage`` makes it (one extension, or
    two ending in ``.gz``, removed): ``scan`` for ``scan.nii.gz``, the folder name of a DICOM series."""
    stem, extension = os.path.splitext(Path(path).name)
    return os.path.splitext(stem)[0] if extension == ".gz" else stem


def temporary_name(path: str | os.PathLike) -> Path:
    """A unique hidden name beside ``path`` that keeps its extensions (``.nii.gz`` stays the
    format MONAI's writers pick from the name)."""
    path = Path(path)
    return path.with_name(f".{uuid.uuid4().hex[:12]}.{path.name}")


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
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_image_writer(writer_class: type[ImageWriter]) -> type[ImageWriter]:
    """A subclass of a MONAI image writer (for ``SaveImage(writer=...)``) whose files appear
    only once complete: MONAI's writers write in place, so a killed run would leave a half map.
    """

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs) -> None:
        path = Path(filename)
        temporary = temporary_name(path)
        try:
            writer_class.write(self, temporary, verbose=verbose, **kwargs)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    doc = f"MONAI's {writer_class.__name__}, writing each file to a temporary name and renaming it."
    return type(f"Atomic{writer_class.__name__}", (writer_class,), {"write": write, "__doc__": doc})


class StagedOutput:
    """A run's output folder, written in a staging folder beside it and published as a whole.

    The run writes into :attr:`staging` (``.<name>.partial`` beside ``output_dir``); only when it
    completes does :meth:`publish` put the staging folder in place of ``output_dir``, so that a
    failed or killed run leaves the previous results untouched and nothing that blocks a rerun
    (a staging folder left by a killed run is cleared by the next :meth:`prepare`).

    ``overwrite``: a non-empty ``output_dir`` is refused (the message lists what is there)
    unless it is set; then the previous run's outputs are replaced as a whole, none of them
    stays beside the new ones.

    Attach it to an engine (``handlers``) to publish when the engine completes and clear the
    staging folder when it fails.
    """

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.staging = self.output_dir.with_name(f".{self.output_dir.name}.partial")
        self.overwrite = bool(overwrite)

    def prepare(self) -> str:
        """Check ``output_dir`` and create an empty staging folder; returns the staging folder's path."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"output_dir {self.output_dir} is a file, not a folder")
        present = sorted(p.name for p in self.output_dir.iterdir()) if self.output_dir.is_dir() else []
        if present and not self.overwrite:
            shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
            raise FileExistsError(
                f"output_dir {self.output_dir} is not empty ({shown}): choose another output_dir, or set "
                "overwrite to true to replace all of it with this run's outputs"
            )
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return str(self.staging)

    def publish(self, *_: object) -> None:
        """Put the staging folder in place of ``output_dir`` (the previous one is removed)."""
        previous = self.output_dir.with_name(f".{self.output_dir.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        if self.output_dir.exists():
            os.replace(self.output_dir, previous)
        os.replace(self.staging, self.output_dir)
        shutil.rmtree(previous, ignore_errors=True)
        logger.info("outputs written to %s", self.output_dir)

    def discard(self, *_: object) -> None:
        """Remove the staging folder (the run failed: ``output_dir`` stays as it was)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self.publish)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _failed(self, engine, error: BaseException) -> None:
        self.discard()
        raise error
