"""Nothing lost, nothing left behind, every error one line: what a run does to the files around it
when it is misconfigured, fails, is interrupted or meets another run (issue 25).

The bundle runs here are ``python -m monai.bundle run`` on the tiny backbone. Where the process
itself is tested (a signal, a lock held by another process, the line a real process ends with)
they are real processes; the refusals and set-up errors run the same command inside the test's
process (``helpers.run_bundle_in_process``: its imports are paid already), which one test pins to
end as the real process does. The failures inside a run are raised in-process through MONAI's
``ConfigWorkflow`` (the same configs), where a step can be made to fail."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

import medad
from medad.model.checkpoint import CheckpointError, description_tensor, save_model
from medad.io.files import OUTPUT_MARKER, RunLock, StagedOutput, check_output_folder
from medad.surfaces.workflow import RunError, error_summary, unknown_keys

from helpers import CONFIGS, bundle_command, common, copy_bundle, run_bundle_in_process


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content's hash: what must survive a failed run."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def model_file(random_fewshot_model) -> Path:
    return random_fewshot_model


def bundle_with_inputs(root: Path, model_file: Path, count: int = 3) -> Path:
    """``root/models/model.pt`` and ``root/images/`` with ``count`` PNG images; returns the images."""
    (root / "models").mkdir(parents=True)
    shutil.copy(model_file, root / "models" / "model.pt")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray((rng.random((48, 40)) * 255).astype(np.uint8)).save(images / f"case{index:03d}.png")
    return images


def failing_process(run_id: str, configs: tuple[str, ...], root: Path, **overrides) -> list[str]:
    """The stderr lines of a ``python -m monai.bundle run`` process that must fail."""
    result = subprocess.run(
        bundle_command(run_id, configs, root, **overrides), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr.strip().splitlines()


def failing_run(run_id: str, configs: tuple[str, ...], root: Path, **overrides) -> list[str]:
    """The stderr lines of the same run inside this process (``helpers.run_bundle_in_process``),
    which must fail as the process would; :func:`test_a_bundle_process_ends_as_the_run_in_process_does`
    pins the two together."""
    status, lines = run_bundle_in_process(run_id, configs, root, **overrides)
    assert status != 0, lines[-40:]
    return lines


# --- --overwrite never touches inputs or models -------------------------------------------------


@pytest.mark.parametrize("where", ["the input folder", "the input folder's parent", "the bundle root"])
def test_overwrite_never_deletes_inputs_or_the_model(model_file, tmp_path, where):
    root = tmp_path / "bundle"
    images = bundle_with_inputs(root, model_file)
    output = {"the input folder": images, "the input folder's parent": root, "the bundle root": root}[where]
    before = digest(root)
    lines = failing_run("inferring", ("inference",), root, dataset_dir=images, output_dir=output, overwrite=True,
                        num_workers=0)
    assert lines[-1].startswith(f"medad: output_dir {output.resolve()} ")
    assert "would destroy it: choose an output_dir of its own" in lines[-1]
    assert digest(root) == before  # every image and the model, byte for byte
    assert not any(path.name.endswith(".partial") for path in tmp_path.rglob("*"))


def test_output_folder_checks_name_what_they_protect(tmp_path):
    data, models = tmp_path / "data", tmp_path / "bundle" / "models"
    protected = {"dataset_dir": data, "bundle_root": tmp_path / "bundle", "models folder": models}
    check_output_folder(tmp_path / "bundle" / "outputs", protected)  # the default: inside the bundle, fine
    check_output_folder(tmp_path / "elsewhere", protected)
    for output, how in ((data / "sub", "lies inside dataset_dir"), (models, "is models folder"),
                        (models / "x", "lies inside models folder"), (tmp_path, "contains dataset_dir")):
        with pytest.raises(ValueError, match=how):
            check_output_folder(output, protected)


def test_overwrite_replaces_only_a_folder_medad_wrote(tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("years of work")
    with pytest.raises(FileExistsError, match=f"not written by medad .*no {OUTPUT_MARKER} marker"):
        StagedOutput(foreign, overwrite=True).prepare()
    assert (foreign / "thesis.docx").read_text() == "years of work"
    assert not (tmp_path / ".results.partial").exists()


# --- failed and interrupted runs leave the previous results and no temporary files ----------------


def _workflow(run_id: str, configs: tuple[str, ...], root: Path, kind: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f"{name}.json") for name in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id=run_id, workflow_type=kind, bundle_root=str(root),
        **{key: str(value) if isinstance(value, Path) else value for key, value in overrides.items()},
    )
    workflow.initialize()
    return workflow


class StepFailed(RuntimeError):
    pass


def raises_step_failed(run) -> None:
    """``run()`` fails with :class:`StepFailed` somewhere in its chain (MONAI wraps it)."""
    with pytest.raises(Exception) as raised:
        run()
    error, chain = raised.value, []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, StepFailed) for e in chain), chain


def test_a_failed_inference_keeps_the_previous_outputs_and_leaves_no_staging(model_file, tmp_path, monkeypatch):
    root = tmp_path / "bundle"
    images = bundle_with_inputs(root, model_file)
    status, lines = run_bundle_in_process("inferring", ("inference",), root, dataset_dir=images, num_workers=0)
    assert status == 0, lines[-40:]
    before = digest(root / "outputs")

    def fail(*args, **kwargs):
        raise StepFailed("a map could not be written")

    # MONAI's StatsHandler comes before the staging handler and re-raises first: the run's own
    # cleanup must not depend on that order.
    monkeypatch.setattr("medad.io.outputs.SaveOverlayd.__call__", fail)
    workflow = _workflow("inferring", ("inference",), root, "infer", dataset_dir=images, num_workers=0, overwrite=True)
    raises_step_failed(workflow.run)
    assert digest(root / "outputs") == before
    assert sorted(path.name for path in root.iterdir() if path.name.endswith(".partial")) == []


def test_sigterm_during_inference_leaves_nothing_half_written(model_file, tmp_path):
    # Inference keeps what it finished (issue 29: a rerun continues, tests/test_archive.py): after
    # SIGTERM every case its ledger records has all its files, and no file is half-written.
    from medad.io.ledger import MANIFEST_NAME, read_ledger

    root = tmp_path / "bundle"
    images = bundle_with_inputs(root, model_file, count=400)
    process = subprocess.Popen(
        bundle_command("inferring", ("inference",), root, dataset_dir=images, num_workers=0, batch_size=1),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    outputs = root / "outputs"
    deadline = time.monotonic() + 120
    # a case is finished once its ledger records it (its files are published just before: waiting
    # for a file alone could signal the run between the two, with nothing recorded yet)
    while not any(True for _ in read_ledger(outputs)):
        assert process.poll() is None and time.monotonic() < deadline, "inference ended before it was signalled"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert stderr.strip().splitlines()[-1].startswith("medad: interrupted (stopped by signal SIGTERM)"), stderr[-3000:]
    finished = [Path(entry["image"]).stem for entry in read_ledger(outputs)]
    assert finished and (outputs / MANIFEST_NAME).is_file() and not (outputs / "scores.csv").exists()
    maps = sorted(path.name for path in outputs.glob("*_anomaly_map.nii.gz"))
    overlays = sorted(path.name for path in (outputs / "overlays").iterdir())
    assert set(maps) >= {f"{stem}_anomaly_map.nii.gz" for stem in finished}
    assert set(overlays) >= {f"{stem}_overlay.png" for stem in finished}
    hidden = [path.name for path in root.rglob(".*") if path.name not in (".outputs.lock", ".medad-output", ".medad-ledger")]
    assert hidden == [], "temporary files left"
    assert not (root / ".outputs.partial").exists()


def _zero_shot_training(root: Path, synthetic_bmad: Path, bundle_backbone: dict, **overrides) -> ConfigWorkflow:
    settings = {**common(synthetic_bmad, bundle_backbone), "levels": [1, 2, 3, 4], "epochs": 2, **overrides}
    return _workflow("training", ("train",), root, "train", **settings)


@pytest.mark.parametrize("saver_first", [False, True], ids=["saver last", "saver first"])
def test_an_exception_inside_a_training_step_writes_no_model(synthetic_bmad, bundle_backbone, tmp_path, monkeypatch, saver_first):
    from medad.engine.engines import MVFATrainer

    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes(b"the previous model")
    calls = {"n": 0}
    step = MVFATrainer._iteration

    def failing_step(self, engine, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise StepFailed("out of memory in step 3")
        return step(self, engine, batch)

    monkeypatch.setattr(MVFATrainer, "_iteration", failing_step)
    workflow = _zero_shot_training(root, synthetic_bmad, bundle_backbone)
    if saver_first:  # whatever the handler order
        handlers = workflow.parser["train"]["handlers"]
        workflow.parser["train"]["handlers"] = [handlers[3], *handlers[:3]]
        workflow.initialize()
    raises_step_failed(workflow.run)
    assert (root / "models" / "model.pt").read_bytes() == b"the previous model"
    assert calls["n"] == 3


def test_a_second_training_in_one_bundle_is_refused_at_once_naming_the_first(synthetic_bmad, bundle_backbone, tmp_path):
    root = tmp_path / "bundle"
    settings = common(synthetic_bmad, bundle_backbone)
    first = subprocess.Popen(
        bundle_command("training", ("train",), root, epochs=50, **settings), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = root / ".medad.lock"
        deadline = time.monotonic() + 120
        while not lock.is_file() or not lock.read_text():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        start = time.monotonic()
        lines = failing_run("training", ("train",), root, epochs=1, **settings)
        assert time.monotonic() - start < 60  # refused while it starts, not after a training
        assert lines[-1].startswith(f"medad: {root} is in use by another medad run (training, pid {first.pid} ")
        assert "wait for it to end, or use another bundle_root" in lines[-1]
    finally:
        first.kill()
        first.wait()
    # A killed run leaves no stuck lock: the kernel released it with the process.
    assert RunLock(root).acquire() is not None


def test_disk_full_during_training_ends_in_one_line_naming_it(synthetic_bmad, bundle_backbone, tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        lines = failing_run("training", ("train",), small / "bundle", epochs=1, **common(synthetic_bmad, bundle_backbone))
        assert "No space left on device" in lines[-1] and lines[-1].startswith("medad: ")
        assert str(small / "bundle") in lines[-1], "\n".join(lines[-40:])  # and where
        assert not (small / "bundle" / "models" / "model.pt").exists()
        assert not [path for path in (small / "bundle").rglob(".*.pt")]  # no temporary checkpoint left
    finally:
        unmounted = subprocess.run(["umount", str(small)], capture_output=True)
    # The run ended inside this process: it must have let go of every file on the tmpfs.
    assert unmounted.returncode == 0, unmounted.stderr.decode()


# --- every error one line; misspelt keys refused ----------------------------------------------------


def test_a_bundle_process_ends_as_the_run_in_process_does(synthetic_bmad, bundle_backbone, tmp_path):
    # The refusals of this file run inside the test's process; a real process installs the
    # summary as its excepthook, reads its own command line, and ends with a failure status and
    # the same line, last, without a traceback.
    settings = common(synthetic_bmad, bundle_backbone)
    process = failing_process("training", ("train",), tmp_path, epoch=3, **settings)
    assert process[-1].startswith("medad: --epoch: did you mean --epochs?"), process[-20:]
    assert not any("Failed to evaluate" in line or line.startswith("Traceback") for line in process), process[-20:]
    assert failing_run("training", ("train",), tmp_path, epoch=3, **settings)[-1] == process[-1]
    assert not (tmp_path / "models").exists()


def test_a_misspelt_key_is_refused_with_the_nearest_one(synthetic_bmad, bundle_backbone, tmp_path):
    settings = common(synthetic_bmad, bundle_backbone)
    lines = failing_run("training", ("train",), tmp_path, epoch=3, **settings)
    assert lines[-1].startswith("medad: --epoch: did you mean --epochs?")
    assert not (tmp_path / "models").exists()
    lines = failing_run("training", ("train", "fewshot"), tmp_path, shots=4, **settings)
    assert lines[-1].startswith("medad: --shots: did you mean --shot?")
    # On purpose: an extra key is accepted when it is named.
    assert unknown_keys([CONFIGS / "inference.json"], ["treshold"]) == [
        "--treshold: did you mean --threshold? (to pass a key no config defines on purpose, add --extra_keys \"['treshold']\")"
    ]
    assert unknown_keys([CONFIGS / "inference.json"], ["treshold", "train#trainer#max_epochs"], extra=["treshold"]) == [
        "--train#trainer#max_epochs: no config defines it (to pass a key no config defines on purpose, add --extra_keys "
        "\"['train#trainer#max_epochs']\")"
    ]
    assert unknown_keys([CONFIGS / "train.json"], ["train#trainer#max_epochs", "+imports", "tracking_uri"]) == []


@pytest.mark.parametrize("overrides, expected", [
    ({"threshold": "abc"}, "threshold must be a number, 'model' or None, got 'abc'"),
    ({"output_dir": "/proc/medad-cannot-write-here"}, "medad-cannot-write-here"),
])
def test_inference_errors_end_in_one_line(model_file, tmp_path, overrides, expected):
    root = tmp_path / "bundle"
    images = bundle_with_inputs(root, model_file)
    lines = failing_run("inferring", ("inference",), root, dataset_dir=images, num_workers=0, **overrides)
    assert lines[-1].startswith("medad: ") and expected in lines[-1]
    assert "Failed to evaluate" not in lines[-1] and "Traceback" not in "\n".join(lines[-3:])


def test_library_errors_are_ordinary_exceptions_and_summarised_from_their_root():
    assert issubclass(RunError, Exception) and not issubclass(RunError, SystemExit)
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")  # noqa: B904 (torch's way)
    except RuntimeError as error:
        assert error_summary(error) == ("[Errno 28] No space left on device", True)
    try:
        raise KeyError("a bug")
    except KeyError as error:
        assert error_summary(error) == ("the run failed: KeyError: 'a bug'", False)


# --- model files cannot make medad open paths of their choosing -------------------------------------


def test_a_model_file_naming_a_local_weights_path_is_not_followed(model_file, tmp_path):
    state = torch.load(model_file, weights_only=True)
    description = medad.describe(state).replace(clip_weights=str(tmp_path / "weights.pt"))
    state["description"] = description_tensor(description)
    path = tmp_path / "crafted.pt"
    save_model(state, path)
    with pytest.raises(CheckpointError, match="records a local path as its CLIP weights"):
        medad.load_detector(path)
    with pytest.raises(medad.MissingWeightsError, match="weights.pt"):  # trusted: followed (and not there)
        medad.load_detector(path, trust_model_paths=True)


def test_a_truncated_resume_checkpoint_says_how_to_recover(tmp_path):
    from medad.engine.resume import check_resumable

    (tmp_path / "resume_checkpoint_epoch=3.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"not a complete PyTorch checkpoint .*: the run cannot resume from it; "
                                              r"delete .*resume_checkpoint_epoch=3.pt \(the run then starts afresh\)"):
        check_resumable(tmp_path, {"seed": 1})
    check_resumable(tmp_path, {"seed": 1}, resume=False)  # or resume set to false


@pytest.mark.parametrize("configs, overrides, expected", [
    (("train",), {"clip_model": "ViT-Nonexistent-1"}, "Unknown CLIP architecture 'ViT-Nonexistent-1'"),
    (("train", "fewshot"), {"seed_dir": "/nonexistent/seeds"}, "/nonexistent/seeds"),
    (("train", "fewshot"), {"abnormal_shots": 0, "init_checkpoint": "/nonexistent/model.pt"}, "/nonexistent/model.pt"),
    (("train",), {"sources": "['Nonexistent']"}, "Nonexistent"),
], ids=["backbone name", "seed folder", "init_checkpoint", "source data set"])
def test_set_up_errors_of_training_end_in_one_line(synthetic_bmad, bundle_backbone, tmp_path, configs, overrides, expected):
    settings = {**common(synthetic_bmad, bundle_backbone), **overrides}
    lines = failing_run("training", configs, tmp_path, **settings)
    assert lines[-1].startswith("medad: ") and expected in lines[-1], lines[-10:]
    assert not any("Failed to evaluate" in line or line.startswith("Traceback") for line in lines), lines[-20:]


def test_a_failed_evaluation_keeps_the_previous_results_whole(fewshot_evaluation, synthetic_bmad, bundle_backbone, tmp_path,
                                                             monkeypatch):
    settings = {**common(synthetic_bmad, bundle_backbone), "shot": 2}
    # A bundle with a model and the results of a finished evaluation: a copy of the session's
    # shared few-shot model evaluated through the bundle (conftest.py).
    root = copy_bundle(fewshot_evaluation, tmp_path / "bundle")
    results = ("metrics.json", "metrics.csv", "scores.csv", "report.html")
    for name in results:  # the previous results, told apart from anything this run could write
        (root / "eval" / name).write_text(f"the previous {name}")
    before = {name: (root / "eval" / name).read_bytes() for name in results}

    def fail(*args, **kwargs):
        raise StepFailed("the report could not be drawn")

    # The report is written last: metrics and scores of the failed run must not replace the old ones.
    monkeypatch.setattr("medad.io.report.EvaluationReport.__call__", fail)
    workflow = _workflow("evaluating", ("train", "fewshot", "evaluate"), root, "eval",
                         **{**settings, "levels": [1, 2, 3, 4]})
    raises_step_failed(workflow.run)
    assert {name: (root / "eval" / name).read_bytes() for name in results} == before
    assert not (root / ".eval.partial").exists()


def test_an_unwritable_mlflow_store_is_named_at_once(tmp_path):
    from medad.surfaces.workflow import tracking_store

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder would be")
    uri = f"sqlite:///{blocker}/eval/mlruns.db"
    with pytest.raises(RunError, match=f"MLflow tracking store {uri}: cannot write to {blocker}/eval"):
        tracking_store(uri)
    assert tracking_store(f"sqlite:///{tmp_path}/eval/mlruns.db").endswith("mlruns.db")
    assert tracking_store("https://mlflow.example.org") == "https://mlflow.example.org"  # remote: MLflow's to judge


def test_an_output_folder_of_an_older_medad_is_still_replaced(tmp_path):
    older = tmp_path / "outputs"  # written before the marker existed
    (older / "overlays").mkdir(parents=True)
    (older / "scores.csv").write_text("image,score\n")
    (older / "case_anomaly_map.nii.gz").write_bytes(b"map")
    staged = StagedOutput(older, overwrite=True)
    (Path(staged.prepare()) / "scores.csv").write_text("image,score\nnew,1\n")
    staged.publish()
    assert sorted(p.name for p in older.iterdir()) == [OUTPUT_MARKER, "scores.csv"]
    (older / "notes.txt").write_text("a user's file beside the outputs")
    (older / OUTPUT_MARKER).unlink()
    with pytest.raises(FileExistsError, match="not written by medad"):
        StagedOutput(older, overwrite=True).prepare()
