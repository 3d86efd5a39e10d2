"""MONAI Label app serving the medad MVFA bundle: anomaly maps, scores and few-shot adaptation.

Start it (see README.md in this folder)::

    .venv-monailabel/bin/monailabel start_server --app bundle/monailabel --studies <folder> \\
        --conf bundle_path <bundle root holding models/model.pt> --conf clip_weights <CLIP weights>

It offers one model, ``mvfa``: the infer task (:class:`lib.infer.AnomalyInfer`) and the train
task (:class:`lib.adapt.NormalAdaptation`, few-shot adaptation to the studies marked normal).
A second train task, ``mvfa_restore`` (:class:`lib.restore.RestoreVersion`), puts an earlier
``model.pt`` back from ``models/versions/``; it is not listed among the trainers, so that
MONAI Label's "train all" never runs it.

With ``--studies http://.../dicom-web`` the datastore is MONAI Label's own DICOMweb datastore
(credentials from ``MONAI_LABEL_DICOMWEB_USERNAME`` and ``MONAI_LABEL_DICOMWEB_PASSWORD``): a
series is fetched and converted to NIfTI before the infer task sees it, and a saved final label is
converted to DICOM SEG by dcmqi's ``itkimage2segimage`` and stored in the PACS (STOW-RS).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

import medad

from lib.adapt import NormalAdaptation
from lib.infer import LABEL_NAMES, AnomalyInfer
from lib.restore import RestoreVersion
from lib.store import AppSettings, DetectorStore

logger = logging.getLogger(__name__)

#: The model name of both tasks: ``/infer/mvfa`` and ``/train/mvfa``.
MODEL_NAME = "mvfa"
#: The restore task: ``POST /train/mvfa_restore`` (not listed in ``/info/``).
RESTORE_NAME = f"{MODEL_NAME}_restore"
#: dcmqi's converter MONAI Label's DICOMweb datastore writes a saved label's DICOM SEG with.
SEG_TOOL = "itkimage2segimage"


class MVFAApp(MONAILabelApp):
    """The app: settings from ``--conf`` (:class:`lib.store.AppSettings`), one shared detector."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        # Settings first: a missing bundle or a bad value stops the server with its reason.
        self.store = DetectorStore(AppSettings.from_conf(conf))
        metadata = self.store.settings.bundle_path / "configs" / "metadata.json"
        meta = json.loads(metadata.read_text()) if metadata.is_file() else {}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=meta.get("name", "medad MVFA anomaly detection"),
            description=meta.get("task", "MVFA anomaly detection: anomaly maps, image scores, few-shot adaptation"),
            version=meta.get("version", medad.__version__),
            labels=LABEL_NAMES,
        )
        logger.info("medad %s serving %s", medad.__version__, self.store.settings.model_path)

    def _download_dcmqi_tools(self) -> None:
        """Find ``itkimage2segimage`` for a DICOMweb datastore, without downloading it.

        MONAI Label downloads dcmqi from GitHub where the tool is not on ``PATH``, which fails
        offline. dcmqi from PyPI (``scripts/monailabel_env.sh``) installs it next to this
        interpreter, which ``python -m monailabel.main`` does not put on ``PATH``.
        """
        environment_bin = os.path.dirname(sys.executable)
        if shutil.which(SEG_TOOL) is None and shutil.which(SEG_TOOL, path=environment_bin):
            os.environ["PATH"] = environment_bin + os.pathsep + os.environ.get("PATH", "")
        if shutil.which(SEG_TOOL) is None:
            raise RuntimeError(
                f"a DICOMweb datastore stores labels as DICOM SEG with dcmqi's {SEG_TOOL}, which is not on PATH "
                f"nor in {environment_bin}: pip install dcmqi (scripts/monailabel_env.sh does)"
            )

    def init_infers(self) -> dict[str, InferTask]:
        return {MODEL_NAME: AnomalyInfer(self.store)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL_NAME: NormalAdaptation(self.store), RESTORE_NAME: RestoreVersion(self.store)}

    def info(self) -> dict:
        # MONAI Label's "train all" (POST /train/, 3D Slicer's trainer "ALL") runs every trainer
        # /info/ lists, one after the other: listed, the restore would undo each adaptation at once.
        # Unlisted, POST /train/mvfa_restore still runs it; the kept versions are in train_stats.mvfa.
        meta = super().info()
        meta["trainers"].pop(RESTORE_NAME, None)
        meta["train_stats"].pop(RESTORE_NAME, None)
        return meta
