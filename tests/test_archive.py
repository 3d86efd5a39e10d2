"""Archive-scale inference (issue 29): two processes, kills at any point and reruns, input lists,
bad files and changed settings, each against one uninterrupted single-process run of the same
inputs (the module's reference, shared) compared file for file and byte for byte.

Runs that must be real processes (killed, or torchrun's two ranks on gloo) are; the others run
the same bundle command inside the test process (``helpers.run_bundle_here``)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medad.io.discovery import list_inputs, read_input_list
from medad.io.ledger import LEDGER_DIR, MANIFEST_NAME, Ledger, read_ledger
from medad.surfaces.workflow import bundle_command

from helpers import CONFIGS, run_bundle_here, run_bundle_in_process

TORCHRUN = Path(sys.executable).with_name("torchrun")
COUNT = 12
#: A test-only overlay merged last: each iteration sleeps after its cases are recorded, so that a
#: kill lands while the run is under way (the tiny model scores a dozen images in a second).
SLOW = {
    "imports": ["$import medad", "$import medad.surfaces.workflow", "$import time", "$import ignite"],
    "run": [
        "@checked_output_format",
        "@network",
        "@postprocessing",
        "$medad.surfaces.workflow.run_step(@archive.start)",
        "$@evaluator.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, lambda engine: time.sleep(0.4))",
        "$medad.surfaces.workflow.run_engine(@evaluator, @run_lock, @archive.publish)",
    ],
}
SETTINGS = {"num_workers": 0, "batch_size": 2}


def write_images(folder: Path, count: int = COUNT, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"case{index:03d}.png"
        Image.fromarray((rng.random((40 + index, 36 + 2 * index)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def outputs(folder: Path) -> dict[str, str]:
    """Every output file (the ledgers aside) with its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and LEDGER_DIR not in p.parts}


def scores(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def ledger_lines(folder: Path) -> int:
    return sum(len([line for line in p.read_bytes().split(b"\n") if line]) for p in (folder / LEDGER_DIR).glob("*.jsonl")) \
        if (folder / LEDGER_DIR).is_dir() else 0


@pytest.fixture(scope="module")
def archive(tmp_path_factory, random_fewshot_model) -> dict:
    """A bundle root with the few-shot model, a dozen PNGs of several sizes, and the reference:
    one uninterrupted single-process inference of them (read-only)."""
    root = tmp_path_factory.mktemp("archive")
    (root / "models").mkdir()
    shutil.copy(random_fewshot_model, root / "models" / "model.pt")
    images = root / "images"
    write_images(images)
    slow = root / "slow.json"
    slow.write_text(json.dumps(SLOW))
    reference = root / "reference"
    run_bundle_here("inferring", ("inference",), root, dataset_dir=images, output_dir=reference, **SETTINGS)
    return {"root": root, "images": images, "reference": reference, "slow": slow, "files": outputs(reference)}


def command(archive: dict, output: Path, slow: bool = False, **overrides) -> list[str]:
    files = [CONFIGS / "inference.json", *overrides.pop("extra_configs", ()), *([archive["slow"]] if slow else [])]
    return bundle_command("inferring", files, archive["root"],
                          {"dataset_dir": archive["images"], "output_dir": output, **SETTINGS, **overrides})


def torchrun(archive: dict, output: Path, slow: bool = False) -> subprocess.Popen:
    line = command(archive, output, slow, extra_configs=[CONFIGS / "multi_gpu_inference.json"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU
    return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *line[1:]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_ledger(process: subprocess.Popen, output: Path, lines: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while ledger_lines(output) < lines:
        assert process.poll() is None, "the run ended before it was killed: " + (process.stdout.read() if process.stdout else "")
        assert time.monotonic() < deadline, "no progress in the ledger"
        time.sleep(0.05)


def test_the_reference_run_writes_a_manifest_a_ledger_and_scores_in_input_order(archive):
    reference = archive["reference"]
    manifest = json.loads((reference / MANIFEST_NAME).read_text())
    assert manifest["inputs"]["count"] == COUNT and len(manifest["model_sha256"]) == 64
    assert manifest["settings"]["map_format"] == "nifti" and "batch_size" not in manifest["settings"]
    rows = scores(reference / "scores.csv")
    assert [row["image"] for row in rows] == [str(p) for p in sorted(archive["images"].glob("*.png"))]
    recorded = {entry["image"]: entry["row"] for entry in read_ledger(reference)}
    assert len(recorded) == COUNT
    for row in rows:  # scores.csv is the ledger's rows, in the input order
        assert float(row["score"]) == recorded[row["image"]]["score"]
    assert len([name for name in archive["files"] if name.endswith("_anomaly_map.nii.gz")]) == COUNT


def test_two_processes_equal_one(archive, tmp_path):
    output = tmp_path / "ddp"
    process = torchrun(archive, output)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-6000:]
    assert outputs(output) == archive["files"]
    shards = [{entry["image"] for entry in read_ledger_file(path)} for path in sorted((output / LEDGER_DIR).glob("*.jsonl"))]
    assert len(shards) == 2 and not shards[0] & shards[1], "a case was scored twice"
    assert len(shards[0] | shards[1]) == COUNT and {len(shard) for shard in shards} == {COUNT // 2}


def read_ledger_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line]


def test_a_run_killed_at_any_point_and_rerun_ends_equal(archive, tmp_path):
    output = tmp_path / "killed"
    process = subprocess.Popen(command(archive, output, slow=True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    wait_for_ledger(process, output, 4)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done = ledger_lines(output)
    assert 4 <= done < COUNT and not (output / "scores.csv").exists()
    # What a kill in the middle of a write leaves: a torn ledger line and a half-written file.
    with open(output / LEDGER_DIR / "rank0.jsonl", "ab") as handle:
        handle.write(b'{"image": "' + str(archive["images"] / "case011.png").encode())
    (output / ".0123456789ab.case011_anomaly_map.nii.gz").write_bytes(b"half a map")
    assert len(list(read_ledger(output))) == done  # the torn line is not a finished case

    status, lines = run_bundle_in_process("inferring", ("inference",), archive["root"], dataset_dir=archive["images"],
                                          output_dir=output, **SETTINGS)
    assert status == 0, lines[-30:]
    assert outputs(output) == archive["files"]
    entries = list(read_ledger(output))
    assert len(entries) == COUNT == len({entry["image"] for entry in entries}), "a finished case was scored again"


def test_killing_one_of_two_processes_and_rerunning_ends_equal(archive, tmp_path):
    output = tmp_path / "one_killed"
    process = torchrun(archive, output, slow=True)
    try:
        wait_for_ledger(process, output, 4)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 2, children
        os.kill(int(children[1]), signal.SIGKILL)
        process.communicate(timeout=120)  # torchrun stops the other rank
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and not (output / "scores.csv").exists()
    assert ledger_lines(output) < COUNT
    # The rerun may have another number of processes: here one (in this process).
    status, lines = run_bundle_in_process("inferring", ("inference",), archive["root"], dataset_dir=archive["images"],
                                          output_dir=output, **SETTINGS)
    assert status == 0, lines[-30:]
    assert outputs(output) == archive["files"]
    assert len(list(read_ledger(output))) == COUNT


def test_csv_json_and_datalist_inputs_keep_their_order(archive, tmp_path):
    reference = {row["image"]: row for row in scores(archive["reference"] / "scores.csv")}
    chosen = [archive["images"] / f"case{index:03d}.png" for index in (7, 2, 10)]
    relative = [os.path.relpath(path, tmp_path) for path in chosen]
    lists = tmp_path
    (lists / "list.csv").write_text("patient,image\n" + "".join(f"p{n},{path}\n" for n, path in enumerate(relative)))
    (lists / "list.json").write_text(json.dumps([str(path) for path in chosen]))
    (lists / "datalist.json").write_text(json.dumps({"name": "site A", "test": relative}))
    for name in ("list.csv", "list.json", "datalist.json"):
        assert read_input_list(lists / name) == [os.path.normpath(path) for path in chosen], name
        assert list_inputs(lists / name).paths == [str(path) for path in chosen]
        output = tmp_path / f"out_{name.replace('.', '_')}"
        run_bundle_here("inferring", ("inference",), archive["root"], dataset_dir=lists / name, output_dir=output,
                        **SETTINGS)
        rows = scores(output / "scores.csv")
        assert [row["image"] for row in rows] == [str(path) for path in chosen], name
        for row in rows:
            assert row == reference[row["image"]], name
        for path in chosen:
            stem = f"{path.stem}_anomaly_map.nii.gz"
            assert (output / stem).read_bytes() == (archive["reference"] / stem).read_bytes()
    (lists / "bad.json").write_text(json.dumps({"site_a": [], "site_b": []}))
    with pytest.raises(ValueError, match=r"bad.json: a datalist with the lists \['site_a', 'site_b'\]"):
        read_input_list(lists / "bad.json")
    (lists / "bad.csv").write_text("path\na.png\n")
    with pytest.raises(ValueError, match="bad.csv: not a CSV table with an 'image' column"):
        read_input_list(lists / "bad.csv")


def test_a_mixed_folder_with_bad_files_finishes_with_a_problem_report(archive, tmp_path):
    inputs = tmp_path / "mixed"
    good = write_images(inputs / "site_a", 2, seed=1) + write_images(inputs / "site_b" / "day1", 1, seed=2)
    good[2] = good[2].rename(good[2].with_name("late.png"))
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "site_b" / "notes.png").write_text("not an image")
    (inputs / "readme.txt").write_text("ignored: not an input")
    output = tmp_path / "out"
    log = run_bundle_here("inferring", ("inference",), archive["root"], dataset_dir=inputs, output_dir=output,
                          on_bad_data="skip", **SETTINGS)
    rows = scores(output / "scores.csv")
    assert [row["image"] for row in rows] == [str(path) for path in sorted(good)]  # depth first, sorted
    report = scores(output / "input_problems.csv")
    assert [(Path(row["file"]).name, row["reason"].split(" (")[0]) for row in report] == [
        ("empty.png", "empty file"), ("notes.png", "unreadable image")]
    assert "left out 2 of 5 inputs with problems" in log
    # the progress bar: images (counted in batches of 2) per second and the time left
    assert re.search(r"\[4/4\] 100%.*\[\d\d:\d\d<\d\d:\d\d, +[\d.]+images/s\]", log), log[-2000:]
    # A rerun of the finished run scores nothing and changes nothing.
    before = outputs(output)
    log = run_bundle_here("inferring", ("inference",), archive["root"], dataset_dir=inputs, output_dir=output,
                          on_bad_data="skip", **SETTINGS)
    assert "holds this run complete" in log and outputs(output) == before


def test_a_rerun_with_other_settings_or_another_model_is_refused_naming_them(archive, tmp_path, random_fewshot_model):
    output = tmp_path / "out"
    shutil.copytree(archive["reference"], output)
    before = outputs(output)
    status, lines = run_bundle_in_process("inferring", ("inference",), archive["root"], dataset_dir=archive["images"],
                                          output_dir=output, map_format="png", top_slices=5, **SETTINGS)
    assert status == 1
    assert lines[-1].startswith(f"medad: output_dir {output} holds a run with another model or other settings "
                                "(settings.map_format: 'nifti' -> 'png'; settings.top_slices: 3 -> 5): "), lines[-1]
    assert "set overwrite to true to replace it as a whole" in lines[-1]
    other = tmp_path / "other_root"
    (other / "models").mkdir(parents=True)
    (other / "models" / "model.pt").write_bytes(random_fewshot_model.read_bytes() + b"\0")  # other content
    status, lines = run_bundle_in_process("inferring", ("inference",), other, dataset_dir=archive["images"],
                                          output_dir=output, **SETTINGS)
    assert status == 1 and "(model_sha256: '" in lines[-1], lines[-1]
    assert outputs(output) == before
    # overwrite replaces the finished run as a whole (written beside it, then put in its place).
    run_bundle_here("inferring", ("inference",), archive["root"], dataset_dir=archive["images"], output_dir=output,
                    map_format="png", overwrite=True, **SETTINGS)
    assert not list(output.glob("*.nii.gz")) and len(list(output.glob("*_anomaly_map.png"))) == COUNT
    assert json.loads((output / MANIFEST_NAME).read_text())["settings"]["map_format"] == "png"
    assert not (tmp_path / ".out.partial").exists()


def test_the_ledger_survives_a_torn_last_line(tmp_path):
    ledger = Ledger(tmp_path, 0)
    ledger.record({"image": "a.png", "row": {"score": 0.5}})
    ledger.close()
    with open(tmp_path / LEDGER_DIR / "rank0.jsonl", "ab") as handle:
        handle.write(b'{"image": "b.p')  # a kill in the middle of a line
    assert [entry["image"] for entry in read_ledger(tmp_path)] == ["a.png"]
    again = Ledger(tmp_path, 0)  # cuts the torn line off before it appends
    again.record({"image": "b.png", "row": {"score": float("nan")}})
    again.close()
    assert list(read_ledger(tmp_path)) == [{"image": "a.png", "row": {"score": 0.5}}, {"image": "b.png", "row": {"score": None}}]


def test_an_interrupted_overwrite_keeps_the_earlier_run_and_continues_beside_it(archive, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(archive["reference"], output)
    process = subprocess.Popen(command(archive, output, slow=True, map_format="png", overwrite=True),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".out.partial"
    wait_for_ledger(process, partial, 2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert outputs(output) == archive["files"]  # the earlier run stays whole until the new one is complete
    finished = list(read_ledger(partial))
    assert 2 <= len(finished) < COUNT
    status, lines = run_bundle_in_process("inferring", ("inference",), archive["root"], dataset_dir=archive["images"],
                                          output_dir=output, map_format="png", overwrite=True, **SETTINGS)
    assert status == 0, lines[-30:]
    assert not partial.exists() and not list(output.glob("*.nii.gz"))
    assert len(list(output.glob("*_anomaly_map.png"))) == COUNT and len(list(read_ledger(output))) == COUNT
    assert list(read_ledger(output))[:len(finished)] == finished  # continued, not started afresh
    assert scores(output / "scores.csv") == scores(archive["reference"] / "scores.csv")


def test_the_archive_benchmarks_ratios_are_its_runs_rates_and_memory():
    """``scripts/benchmark_archive.py``'s targets (issue 29) as ratios of one invocation's runs,
    against hand-computed values."""
    import benchmark_archive

    runs = [
        {"images": 200, "processes": 1, "images_per_s": 40.0, "images_per_s_per_process": 40.0, "peak_rss_mib": 500.0},
        {"images": 200, "processes": 2, "images_per_s": 72.0, "images_per_s_per_process": 36.0, "peak_rss_mib": 1000.0},
        {"images": 2000, "processes": 1, "images_per_s": 42.0, "images_per_s_per_process": 42.0, "peak_rss_mib": 520.0},
        {"images": 2000, "processes": 2, "images_per_s": 80.0, "images_per_s_per_process": 40.0, "peak_rss_mib": 990.0},
    ]
    assert benchmark_archive.summary(runs) == {
        "parallel_efficiency": {"200": {"2": 0.9}, "2000": {"2": pytest.approx(40 / 42)}},
        "peak_rss_ratio": {"1": 1.04, "2": 0.99},
    }
    assert benchmark_archive.summary(runs[:1]) == {"parallel_efficiency": {}, "peak_rss_ratio": {}}


def test_precision_auto_is_recorded_as_resolved_so_a_machine_resolving_it_otherwise_is_refused(archive, tmp_path, monkeypatch):
    """The manifest holds the precision ``auto`` became on this machine, not ``auto``: a rerun (or
    another process of the run) where it resolves to another precision would change the maps, and
    is refused naming it."""
    from medad.model import backbone

    output = tmp_path / "out"
    shutil.copytree(archive["reference"], output)  # the reference ran in fp32
    before = outputs(output)
    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # no native bf16: fp32
    log = run_bundle_here("inferring", ("inference",), archive["root"], dataset_dir=archive["images"],
                          output_dir=output, precision="auto", **SETTINGS)
    assert "holds this run complete" in log and outputs(output) == before
    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # native bf16
    status, lines = run_bundle_in_process("inferring", ("inference",), archive["root"], dataset_dir=archive["images"],
                                          output_dir=output, precision="auto", **SETTINGS)
    assert status == 1 and "(settings.precision: 'fp32' -> 'bf16')" in lines[-1], lines[-1]
    assert outputs(output) == before
