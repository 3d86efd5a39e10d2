"""Going back from the server: put an earlier ``models/model.pt`` back.

Each adaptation (and each restore) keeps the model it replaces in ``models/versions/``
(``model-<UTC time of the replacement>.pt``, listed oldest first as ``versions`` in the
adaptation task's ``train_stats``). This task puts one back with
:func:`medad.model.checkpoint.restore_model_version`: the one named by the option ``version`` (a file
name), by default the newest, i.e. the model the last adaptation or restore replaced. The model
it replaces is kept as a version in turn, so a restore is undone by restoring again; to go back
further, name the version.

It is a MONAI Label train task (``POST /train/mvfa_restore``, ``?run_sync=true`` for the answer
at once) that the app does not list among its trainers: MONAI Label's "train all" (``POST
/train/``, 3D Slicer's default trainer ``ALL``) runs every listed trainer one after the other,
which would undo each adaptation as soon as it is made.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.store import DetectorStore

logger = logging.getLogger(__name__)


class RestoreVersion(TrainTask):
    """MONAI Label "train" task that restores a kept version of ``model.pt`` (module docstring).
    Option: ``version``, a file name from ``models/versions/`` (default: the newest)."""

    def __init__(self, store: DetectorStore) -> None:
        super().__init__(
            "Go back: put a kept version of models/model.pt back (option version: a file name from "
            "models/versions/, default the newest); the current model is kept as a version in turn"
        )
        self.store = store

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        version = request.get("version") or None
        if version is not None and not isinstance(version, str):
            raise HTTPException(status_code=400, detail=f"version must be a file name from models/versions/, got {version!r}")
        try:
            record = self.store.restore(version)
        except (ValueError, FileNotFoundError) as error:  # no such version, or a broken file (CheckpointError)
            raise HTTPException(status_code=400, detail=str(error)) from error
        logger.info("restore done: %s", record)
        return {**record, "versions": self.store.versions()}
