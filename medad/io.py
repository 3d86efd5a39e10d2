"""Safe file output: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from monai.data import ImageWriter

__all__ = ["atomic_image_writer", "atomic_write", "prepare_output_dir"]


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` and move it onto ``path`` only when the block
    finishes without error, so that readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_image_writer(writer_class: type[ImageWriter]) -> type[ImageWriter]:
    """A subclass of a MONAI image writer (for ``SaveImage(writer=...)``) whose files appear
    only once complete: MONAI's writers write in place, so a killed run would leave a half map.

    The temporary name keeps the target's extension, which is what selects the format
    (``.nii.gz`` compressed) in the writer's backend.
    """

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs) -> None:
        path = Path(filename)
        temporary = path.with_name(f".{uuid.uuid4().hex}.{path.name}")
        try:
            writer_class.write(self, temporary, verbose=verbose, **kwargs)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    doc = f"MONAI's {writer_class.__name__}, writing each file to a temporary name and renaming it."
    return type(f"Atomic{writer_class.__name__}", (writer_class,), {"write": write, "__doc__": doc})


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create an output folder, refusing to mix new results into a non-empty one unless
    ``overwrite`` (then files are replaced one by one, each atomically)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {path} is not empty: choose another one or set overwrite=True")
    path.mkdir(parents=True, exist_ok=True)
    return path
