"""Experiment tracking: a run's output files as artifacts of its MLflow run(s)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from pathlib import Path

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from medad.engine.handlers import is_saving_rank

__all__ = ["MLflowArtifacts", "mlflow_runs"]


def mlflow_runs(engine: Engine) -> list[tuple[Any, str]]:
    """``(client, run_id)`` of every active MONAI ``MLFlowHandler`` attached to ``engine``, and of
    MLflow's active fluent run if any."""
    runs = []
    # private: MONAI's MLFlowHandler logs through its own client, not MLflow's active run, and the
    # bundle's tracking settings create and attach it, so medad holds no reference to it; ignite's
    # public has_event_handler(handler) needs that reference and it has no public list of attached
    # handlers: its registry (Engine._event_handlers) is read here, and nowhere else.
    for handlers in engine._event_handlers.values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, MLFlowHandler) and getattr(owner, "cur_run", None) is not None:
                run = (owner.client, owner.cur_run.info.run_id)
                if run[1] not in [known[1] for known in runs]:
                    runs.append(run)
    try:
        import mlflow
    except ImportError:
        return runs
    active = mlflow.active_run()
    if active is not None and active.info.run_id not in [known[1] for known in runs]:
        runs.append((mlflow.MlflowClient(), active.info.run_id))
    return runs


class MLflowArtifacts:
    """Log ``paths`` (files, or folders by name with everything under them) as artifacts of the engine's
    MLflow run(s) when it completes: the runs of the MONAI ``MLFlowHandler`` attached to it
    (``--tracking mlflow``) or MLflow's active run; nothing without one. Attach it before the
    ``MLFlowHandler`` closes its run (bundle handler lists: anywhere, MONAI appends its own last).

    Args:
        paths: what to log; missing paths are skipped.
        artifact_folder: the folder in the run's artifacts.
        save_rank: under ``torch.distributed`` only this rank logs.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], artifact_folder: str | None = None, save_rank: int = 0) -> None:
        self.paths = [Path(path) for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.artifact_folder, self.save_rank = artifact_folder, save_rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_saving_rank(self.save_rank):
            return
        for client, run_id in mlflow_runs(engine):
            for path in self.paths:
                if path.is_dir():  # a folder keeps its name: <artifact_folder>/<folder>/...
                    client.log_artifacts(run_id, str(path), "/".join(filter(None, (self.artifact_folder, path.name))))
                elif path.is_file():
                    client.log_artifact(run_id, str(path), self.artifact_folder)
