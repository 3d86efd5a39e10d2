"""What a resumable run has finished, on disk: the run manifest and the per-process ledgers.

An archive inference (:class:`medad.engine.archive.ArchiveRun`) writes into its output folder item
by item. Two records there say what the folder holds:

- the **manifest** (:data:`MANIFEST_NAME`, written first, atomically): the model's content hash and
  the settings that change outputs; a rerun into the folder with other ones is refused, naming
  each difference (:func:`manifest_differences`).
- the **ledger** (:data:`LEDGER_DIR`): one append-only JSON-lines file per process
  (``rank<k>.jsonl``), one line per finished item, written after the item's files and forced to
  disk (``fsync``) before the next item is recorded.

Why a per-process append-only file rather than one marker file per item: a kill -9 at any
instant leaves either the whole line (the item counts as finished, its files were renamed into
place before the line was written) or a line without its ending newline, which
:func:`read_ledger` ignores and :class:`Ledger` cuts off before it appends again; the item is
then scored again and its files replaced by identical ones. One file per process needs no lock
between processes (several machines on a shared filesystem included) and stays one open file
however many items an archive holds, where markers would be tens of thousands of small files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medad.io.files import atomic_write, strict_json

__all__ = ["LEDGER_DIR", "MANIFEST_NAME", "Ledger", "manifest_differences", "read_ledger", "read_manifest", "write_manifest"]

#: The run manifest's file name in the output folder.
MANIFEST_NAME = "run_manifest.json"
#: The folder of the per-process ledgers in the output folder.
LEDGER_DIR = ".medad-ledger"


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` as ``folder/run_manifest.json`` (atomically)."""
    with atomic_write(Path(folder) / MANIFEST_NAME) as handle:
        json.dump(strict_json(dict(manifest)), handle, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest in ``folder``, or ``None`` where there is none; a damaged one is named."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable run manifest ({error}): move the folder away or choose another "
                         "output_dir") from error


def manifest_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: recorded -> wanted`` for every entry (nested ones as ``a.b``) that differs.

    >>> manifest_differences({"model_sha256": "ab", "settings": {"map_format": "nifti"}},
    ...                      {"model_sha256": "ab", "settings": {"map_format": "png"}})
    ["settings.map_format: 'nifti' -> 'png'"]
    """
    differences = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += manifest_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return differences


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The complete records of one ledger file (a last line without its newline is left out)."""
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                return  # torn by a kill while it was written: that item was not finished
            try:
                yield json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}: a damaged ledger line ({error}): rerun with overwrite set to true to start "
                                 "this output folder afresh") from error


def read_ledger(folder: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every finished item's record in ``folder``'s ledgers (all processes', in file order)."""
    ledger = Path(folder) / LEDGER_DIR
    if ledger.is_dir():
        for path in sorted(ledger.glob("rank*.jsonl")):
            yield from _lines(path)


class Ledger:
    """This process's append-only ledger file, ``<folder>/.medad-ledger/rank<rank>.jsonl``.

    Opening it cuts off a torn last line that a killed run left (so that the next record starts
    on a line of its own); :meth:`record` appends one JSON line and forces it to disk."""

    def __init__(self, folder: str | os.PathLike, rank: int) -> None:
        self._descriptor: int | None = None
        self.path = Path(folder) / LEDGER_DIR / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        complete = end = os.fstat(self._descriptor).st_size
        while complete and os.pread(self._descriptor, 1, complete - 1) != b"\n":
            complete -= 1  # back to the end of the last whole line (a torn line is short)
        if complete != end:
            os.ftruncate(self._descriptor, complete)
        os.lseek(self._descriptor, 0, os.SEEK_END)

    def record(self, entry: Mapping[str, Any]) -> None:
        """Append ``entry`` as one line and ``fsync`` it: the item is finished from now on."""
        line = json.dumps(strict_json(dict(entry)), allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"
        os.write(self._descriptor, line)
        os.fsync(self._descriptor)

    def close(self) -> None:
        """Close the file (also when this object is dropped)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    __del__ = close
