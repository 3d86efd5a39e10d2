"""Archive-scale inference: resumable, exactly once, over one or several processes.

:class:`ArchiveRun` is the bundle inference's output folder and the data list of this process
(``configs/inference.json``; ``configs/multi_gpu_inference.json`` for ``torchrun``). The run
writes each case's files into the folder as the case is scored, each file atomically, and then
records the case in its process's ledger (:mod:`medad.io.ledger`); :class:`LedgerScoresWriter`
records its ``scores.csv`` row there. A killed run (SIGKILL of any process included) keeps every
recorded case; rerunning the same command scores only the others and ends with the folder an
uninterrupted run writes: ``scores.csv`` (and ``input_problems.csv``) assembled in the input
list's order from the ledger when every case is done.

The folder's ``run_manifest.json``, written before any case, holds the model's content hash and
the settings that change outputs; a rerun with another model or other settings is refused with
each difference named, and a rerun of a finished run reports that it is complete and writes
nothing. ``overwrite`` replaces an earlier run as a whole: the new run is written (and resumed)
in ``.<name>.partial`` beside the folder and takes its place only when complete, so that the
earlier results stay whole until then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from monai.data import partition_dataset

from medad.engine.handlers import ScoresWriter, output_items, write_rows
from medad.io.checks import DataCheckError, check_items
from medad.io.files import (
    OUTPUT_MARKER, StagedOutput, check_output_folder, content_sha256, register_unfinished, remove_temporaries,
    strict_json,
)
from medad.io.ledger import MANIFEST_NAME, Ledger, manifest_differences, read_ledger, read_manifest, write_manifest

__all__ = ["CASE_KEY", "MANIFEST_FORMAT", "ArchiveRun", "LedgerScoresWriter"]

logger = logging.getLogger(__name__)

#: The item key that carries a case's input path through the pipeline to the ledger.
CASE_KEY = "case"
#: Version of the manifest's layout.
MANIFEST_FORMAT = 1
_DEFAULT_REMEDY = "fix them, or set on_bad_data to skip to leave those inputs out"


def _inputs_digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


class ArchiveRun(Sequence):
    """A resumable inference's output folder, and the cases this process scores (see the module).

    Building it reads and writes nothing. :meth:`check` (the run's ``initialize``) refuses an
    ``output_dir`` the run may not write, before anything is scored: one near protected paths
    (:func:`medad.io.files.check_output_folder`), a non-empty folder without a manifest (unless
    ``overwrite`` and medad wrote it), one whose manifest differs from this run's while it holds
    finished cases. :meth:`start` (a step of ``run``) writes the manifest, reads the ledgers,
    splits the cases not done yet between the processes (``ignite.distributed``'s rank and world
    size; MONAI's ``partition_dataset``, interleaved as ``DistributedSampler(shuffle=False,
    even_divisible=False)`` deals them) and checks this process's share: the share is taken before
    the checks so that each process opens only its own inputs (a sampler would split after
    checks that every process ran over the whole list). With ``on_bad_data="skip"`` a bad case
    is recorded with its problems and left out; with ``"raise"`` the run ends listing them.
    :meth:`finish` (when the engine completes, or after it where this process had nothing left)
    assembles ``scores.csv`` and ``input_problems.csv`` in the input order.

    Args:
        output_dir: the run's output folder.
        inputs: the cases' paths in the order of the outputs' tables.
        model_path: the model file (its content hash goes into the manifest).
        settings: the settings that change outputs, as the manifest records them.
        overwrite: replace an earlier run in ``output_dir`` as a whole (see the module).
        protected: paths ``output_dir`` must keep clear of (what each is, to the path).
        on_bad_data: ``"raise"`` or ``"skip"``.
        report_name: the table of the skipped inputs' problems.
        remedy: what the data checks' error tells the user to do.
        volumes: accept volumes (NIfTI, DICOM) in the checks.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        inputs: Sequence[str | os.PathLike],
        model_path: str | os.PathLike,
        settings: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        protected: Mapping[str, str | os.PathLike | None] | None = None,
        on_bad_data: str = "raise",
        report_name: str = "input_problems.csv",
        remedy: str = _DEFAULT_REMEDY,
        volumes: bool = True,
    ) -> None:
        if on_bad_data not in ("raise", "skip"):
            raise ValueError(f"on_bad_data must be one of ['raise', 'skip'], got {on_bad_data!r}")
        self.output_dir = Path(output_dir)
        self.inputs = [str(path) for path in inputs]
        self.model_path = Path(model_path)
        self.settings = dict(settings or {})
        self.overwrite = bool(overwrite)
        self.protected = dict(protected or {})
        self.on_bad_data, self.report_name, self.remedy, self.volumes = on_bad_data, report_name, remedy, bool(volumes)
        self.staged = StagedOutput(self.output_dir, overwrite=True, protected=self.protected)
        self.folder = self.staged.staging if self.overwrite else self.output_dir
        self.complete = False
        self._manifest: dict[str, Any] | None = None
        self._items: list[dict] | None = None
        self._ledger: Ledger | None = None
        self._created = False
        self._started = self._finished = False

    @property
    def run_dir(self) -> str:
        """The folder the run's writers write into: ``output_dir``, or with ``overwrite`` its
        ``.<name>.partial`` beside it, which replaces it when the run completes."""
        return str(self.folder)

    def manifest(self) -> dict[str, Any]:
        """This run's manifest: model hash, settings, and the input list's length and hash."""
        if self._manifest is None:
            settings = {key: str(value) if isinstance(value, os.PathLike) else value for key, value in self.settings.items()}
            manifest = {
                "format": MANIFEST_FORMAT,
                "model_sha256": content_sha256(self.model_path),
                "settings": settings,
                "inputs": {"count": len(self.inputs), "sha256": _inputs_digest(self.inputs)},
            }
            self._manifest = json.loads(json.dumps(strict_json(manifest)))  # as read back: lists, not tuples
        return self._manifest

    def _finished_cases(self, folder: Path) -> bool:
        return any(True for _ in read_ledger(folder))

    def check(self) -> ArchiveRun:
        """Refuse an ``output_dir`` this run may not write, and find out whether the same run
        completed there already (:attr:`complete`); nothing is written."""
        check_output_folder(self.output_dir, self.protected)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"output_dir {self.output_dir} is a file, not a folder")
        if self.overwrite:
            self.staged.check()  # only a folder medad wrote is replaced
            return self
        present = sorted(p.name for p in self.output_dir.iterdir()) if self.output_dir.is_dir() else []
        present = [name for name in present if name != OUTPUT_MARKER]
        if not present or not self.model_path.is_file():  # a missing model ends the run when it starts
            return self
        recorded = read_manifest(self.output_dir)
        if recorded is None:
            shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
            raise FileExistsError(
                f"output_dir {self.output_dir} is not empty ({shown}) and holds no {MANIFEST_NAME} of a resumable "
                "run: choose another output_dir, or set overwrite to true to replace all of it with this run's outputs"
            )
        differences = manifest_differences(recorded, self.manifest())
        if differences and (self._finished_cases(self.output_dir) or (self.output_dir / "scores.csv").exists()):
            raise ValueError(
                f"output_dir {self.output_dir} holds a run with another model or other settings "
                f"({'; '.join(differences)}): rerun with the same ones to continue it, choose another output_dir, "
                "or set overwrite to true to replace it as a whole"
            )
        self.complete = not differences and (self.output_dir / "scores.csv").is_file()
        return self

    # --- the run -------------------------------------------------------------------------------

    def start(self) -> ArchiveRun:
        """Prepare the folder (rank 0), plan and check this process's cases; returns itself."""
        self.check()
        if self.complete:
            logger.info("%s holds this run complete (same model, settings and inputs): nothing to do", self.output_dir)
            self._items, self._started, self._finished = [], True, True
            return self
        if not self.model_path.is_file():
            return self  # run_engine ends the run naming the missing model
        try:
            self._start()
        except BaseException:
            self.discard()  # before the engine: run_engine's clean-up has not begun
            raise
        return self

    def _start(self) -> None:
        rank, world = idist.get_rank(), idist.get_world_size()
        if rank == 0:
            self._prepare_folder()
        idist.barrier()  # the manifest exists for every process
        recorded = read_manifest(self.folder)
        differences = manifest_differences(recorded or {}, self.manifest())
        if differences:
            raise ValueError(f"{self.folder / MANIFEST_NAME}: process {rank} runs with another model or other settings "
                             f"than process 0 ({'; '.join(differences)}): give every process the same ones")
        done = {entry["image"] for entry in read_ledger(self.folder)}
        idist.barrier()  # every process has read the ledgers before any appends to them
        todo = [path for path in self.inputs if path not in done]
        share = partition_dataset(todo, num_partitions=world, even_divisible=False)[rank] if world > 1 else todo
        logger.info("%d of %d cases done already; this process (%d of %d) scores %d", len(done), len(self.inputs),
                    rank, world, len(share))
        self._ledger = Ledger(self.folder, rank)
        self._items = self._checked(share)
        self._started = True

    def _prepare_folder(self) -> None:
        folder, wanted = self.folder, self.manifest()
        recorded = read_manifest(folder) if folder.is_dir() else None
        if recorded is not None and manifest_differences(recorded, wanted):
            if not self.overwrite and self._finished_cases(folder):
                raise ValueError(f"{folder}: holds finished cases of another run")  # check() refuses this first
            shutil.rmtree(folder)  # a run with no finished case, or an unfinished overwrite of another run
            recorded = None
        if recorded is None:
            self._created = not folder.exists() or self.overwrite
            if self.overwrite:
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / OUTPUT_MARKER).write_text("written by a medad run; overwrite may replace this folder\n")
            write_manifest(folder, wanted)
        else:
            removed = remove_temporaries(folder)
            logger.info("resuming the run in %s (%d unfinished files of a killed run removed)", folder, removed)
        register_unfinished(self)

    def _checked(self, paths: Sequence[str]) -> list[dict]:
        """The cases of ``paths`` that pass the input checks; the others are recorded with their
        problems (``skip``) or end the run listing every problem (``raise``)."""
        kept, problems, start = [], [], time.perf_counter()
        for path in paths:
            try:
                check_items([{"image": path}], on_error="raise", volumes=self.volumes)
            except DataCheckError as error:
                lines = str(error).splitlines()[:-1]  # "  <file>: <reason>" lines, then the summary
                reasons = [line.strip().removeprefix(f"{path}: ") for line in lines]
                problems.append((path, reasons))
                continue
            kept.append({"image": path, CASE_KEY: path})
        logger.info("checked %d inputs in %.3f s", len(paths), time.perf_counter() - start)
        if problems and self.on_bad_data == "raise":
            report = "\n".join(f"  {path}: {reason}" for path, reasons in problems for reason in reasons)
            count = sum(len(reasons) for _, reasons in problems)
            raise DataCheckError(f"{report}\n{count} problem(s) in {len(problems)} of {len(paths)} items, listed above: "
                                 f"{self.remedy}")
        for path, reasons in problems:
            self._ledger.record({"image": path, "problems": reasons})
        if problems:
            logger.warning("left out %d of %d inputs with problems (report at completion: %s):\n%s", len(problems),
                           len(paths), self.report_name, "\n".join(f"  {p}: {'; '.join(r)}" for p, r in problems))
        return kept

    def record(self, case: str, row: Mapping[str, Any] | None) -> None:
        """Record ``case`` as finished, with its ``scores.csv`` row (after its files are written)."""
        self._ledger.record({"image": case, "row": None if row is None else dict(row)})

    def finish(self, *_: object) -> None:
        """When every process is done: ``scores.csv`` and the problem report in the input order
        (rank 0). Runs once: when the engine completes (before the handlers after it log the
        outputs), or from :meth:`publish` where this process had nothing left to score."""
        if self._finished or not self._started:
            return
        idist.barrier()  # every process has recorded its last case
        if idist.get_rank() == 0:
            self._assemble()
        self._finished = True

    def publish(self) -> None:
        """:meth:`finish`, then with ``overwrite`` the folder is put in place of ``output_dir``
        (rank 0); the run is complete (the step after the engine, see ``configs/inference.json``)."""
        self.finish()
        if self._ledger is not None:
            self._ledger.close()
        if self.complete or not self._started:
            return
        if idist.get_rank() == 0:
            if self.overwrite:
                self.staged.publish()
            else:
                logger.info("outputs written to %s", self.output_dir)
        register_unfinished(self, False)
        idist.barrier()

    def _assemble(self) -> None:
        rows: dict[str, dict | None] = {}
        problems: dict[str, list[str]] = {}
        for entry in read_ledger(self.folder):
            if "problems" in entry:
                problems[entry["image"]] = entry["problems"]
            else:
                rows[entry["image"]] = entry["row"]
        missing = [path for path in self.inputs if path not in rows and path not in problems]
        if missing:
            raise RuntimeError(f"{len(missing)} cases were neither scored nor skipped (the first: {missing[0]}): "
                               "rerun the same command to score them")
        if problems:
            table = [{"file": path, "reason": reason} for path in self.inputs for reason in problems.get(path, ())]
            write_rows(self.folder / self.report_name, table)
        if not rows:
            raise DataCheckError(f"every input failed its checks (report: {self.folder / self.report_name})")
        write_rows(self.folder / "scores.csv", [rows[path] for path in self.inputs if rows.get(path) is not None])

    def discard(self) -> None:
        """The run failed or was interrupted: the finished cases stay for the rerun; a folder
        this run created holding none is removed (nothing is left that blocks the rerun)."""
        if self._ledger is not None:
            self._ledger.close()
        register_unfinished(self, False)
        if idist.get_rank() == 0 and self._created and not self._finished_cases(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn get a copy of the data list: never the ledger's file
        return {**self.__dict__, "_ledger": None}

    # --- the data list of this process ---------------------------------------------------------

    @property
    def items(self) -> list[dict]:
        """This process's cases to score; planned without writing anything before :meth:`start`
        (a caller that builds the workflow's components without running it)."""
        if self._items is None:
            done = {entry["image"] for entry in read_ledger(self.folder)} if self.folder.is_dir() else set()
            return [{"image": path, CASE_KEY: path} for path in self.inputs if path not in done]
        return self._items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.items)

    def __repr__(self) -> str:
        return f"ArchiveRun({self.output_dir}, {len(self.inputs)} inputs)"


class LedgerScoresWriter(ScoresWriter):
    """:class:`medad.engine.handlers.ScoresWriter` streamed into an :class:`ArchiveRun`'s ledger:
    each case's row, with its decision, is recorded as the case finishes (its files are written
    by the postprocessing before this handler runs), so nothing grows with the number of cases;
    :meth:`ArchiveRun.finish` writes ``scores.csv``. Every process attaches it."""

    def __init__(self, archive: ArchiveRun, threshold: float | str | None = None, columns: Sequence[str] = ()) -> None:
        super().__init__(archive.run_dir, threshold=threshold, columns=columns)
        self.archive = archive

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)

    def collect(self, engine: Engine) -> None:
        batch = engine.state.batch  # decollated by MONAI's workflow before this event, as the output is
        cases = [item[CASE_KEY] for item in batch] if isinstance(batch, list) else batch[CASE_KEY]
        for case, item in zip(cases, output_items(engine), strict=True):
            row = self.row(item, case)
            self.archive.record(case, None if row is None else self.decide(row, self._decision))
