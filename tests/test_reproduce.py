"""BMAD preparation, the experiment grid and the report (scripts/prepare_bmad.py, scripts/reproduce.py)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reproduction  # scripts/reproduction.py
from medad.io.data import bmad_datalist, dataset_has_masks, list_datasets
from reproduction import (
    BMADLayoutError,
    Cell,
    CellFailed,
    GridOptions,
    estimate_runtime,
    format_report,
    plan_grid,
    prepare_bmad,
)

from helpers import run_command_logged_in_process

ROOT = Path(__file__).resolve().parents[1]

#: Each MVFA data set as the BMAD release lays it out, with the release's inconsistencies:
#: (path in the download, validation folder, abnormal folder, nesting, masks).
DOWNLOAD = {
    "Brain": ("Brain_AD/BraTS2021_slice", "valid", "Ungood", "class/img", True),
    "Liver": ("Liver/Train/hist_DIY", "valid", "Ungood", "img/class", True),
    "Retina_RESC": ("Retina_RESC_AD/RESC", "val", "ungood", "class/img", True),
    "Retina_OCT2017": ("Retina_OCT2017_AD/OCT2017", "val", "Ungood", "class/img", False),
    "Chest": ("Chest_AD/Chest-RSNA", "val", "Ungood", "class/img", False),
    "Histopathology": ("camelyon16_256", "valid", "Ungood", "flat", False),
}
PER_CLASS = 3


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def write_bmad_download(root: Path, size: int = 48) -> Path:
    """Six small data sets (gray textures; abnormal ones with a bright square) in BMAD's download
    layout, ``train/good`` included; masks for Brain, Liver and Retina_RESC."""
    rng = np.random.default_rng(0)
    for name, (path, valid, bad, nesting, masks) in DOWNLOAD.items():
        base = root / path
        _save(base / "train" / "good" / "train_000.png", rng.uniform(0.2, 0.5, (size, size)))
        for split in (valid, "test"):
            for cls in ("good", bad):
                for i in range(PER_CLASS):
                    image = rng.uniform(0.2, 0.5, (size, size))
                    lesion = np.zeros((size, size), bool)
                    if cls != "good":
                        y, x = rng.integers(4, size - 16, 2)
                        lesion[y : y + 12, x : x + 12] = True
                        image[lesion] = 0.95
                    folder = {"class/img": base / split / cls / "img", "img/class": base / split / "img" / cls,
                              "flat": base / split / cls}[nesting]
                    file = f"{split}_{cls}_{i:03d}.png"
                    _save(folder / file, image)
                    if masks and cls != "good":
                        mask_dir = base / split / cls / "label" if nesting != "img/class" else base / split / "label" / cls
                        _save(mask_dir / file, lesion.astype(float))
    return root


def load_script(name: str):
    """A script of scripts/ as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def download(tmp_path) -> Path:
    return write_bmad_download(tmp_path / "download")


# ---------------------------------------------------------------------------------------------
# prepare_bmad
# ---------------------------------------------------------------------------------------------


def test_prepare_links_every_data_set_into_mvfa_layout(download, tmp_path, capsys):
    output = tmp_path / "BMAD"
    assert load_script("prepare_bmad").main(["--source", str(download), "--output", str(output)]) == 0
    summary = capsys.readouterr().out

    assert list_datasets(output) == sorted(DOWNLOAD)
    for name, (*_, masks) in DOWNLOAD.items():
        assert dataset_has_masks(output, name) is masks
        for split in ("valid", "test"):
            items = bmad_datalist(output, name, split)
            assert [item["label"] for item in items] == [0] * PER_CLASS + [1] * PER_CLASS
            assert all(Path(item["image"]).is_symlink() for item in items)  # linked, not copied
            if masks:
                assert all(Path(item["mask"]).is_file() for item in items if item["label"] == 1)
        assert not (output / f"{name}_AD" / "train").exists()
    assert (output / "Liver_AD" / "valid" / "Ungood" / "anomaly_mask" / "valid_Ungood_000.png").resolve() == (
        download / "Liver" / "Train" / "hist_DIY" / "valid" / "label" / "Ungood" / "valid_Ungood_000.png"
    ).resolve()
    assert "Retina_RESC_AD" in summary and f"good {PER_CLASS:>6}   Ungood {PER_CLASS:>6} ({PER_CLASS} masks)" in summary
    assert "wrote 90 files" in summary and "90 symlinked" in summary  # 72 images and 18 masks


def test_prepare_hard_links_or_copies_on_request(download, tmp_path):
    hard = prepare_bmad(download, tmp_path / "hard", datasets=["Chest"], link="hard")
    image = Path(bmad_datalist(tmp_path / "hard", "Chest", "test")[0]["image"])
    assert not image.is_symlink() and image.stat().st_nlink == 2 and hard.placed["hard-linked"] == 4 * PER_CLASS

    prepare_bmad(download, tmp_path / "copy", datasets=["Chest"], link="copy")
    image = Path(bmad_datalist(tmp_path / "copy", "Chest", "test")[0]["image"])
    assert not image.is_symlink() and image.stat().st_nlink == 1


def test_prepare_refuses_a_non_empty_output(download, tmp_path, capsys):
    output = tmp_path / "BMAD"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert load_script("prepare_bmad").main(["--source", str(download), "--output", str(output)]) == 2
    assert f"output folder {output} exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_prepare_names_abnormal_images_without_mask(download, tmp_path):
    (download / "Retina_RESC_AD/RESC/test/ungood/label/test_ungood_001.png").unlink()
    with pytest.raises(BMADLayoutError, match=r"Retina_RESC: 1 of 3 test/Ungood images .* test_ungood_001\.png"):
        prepare_bmad(download, tmp_path / "BMAD")
    assert not (tmp_path / "BMAD").exists()  # checked before anything is written

    result = prepare_bmad(download, tmp_path / "BMAD", skip_unpaired=True)
    assert any("left out 1 test/Ungood images" in note and "test_ungood_001.png" in note for plan in result.plans for note in plan.notes)
    assert len(bmad_datalist(tmp_path / "BMAD", "Retina_RESC", "test")) == 2 * PER_CLASS - 1


def test_prepare_map_overrides_the_folder_search(download, tmp_path):
    (download / "Chest_AD" / "Chest-RSNA").rename(download / "Chest_AD" / "my_xrays")
    result = prepare_bmad(download, tmp_path / "a")
    assert result.missing == ["Chest"] and "not found in the download (left out): Chest" in result.summary()
    with pytest.raises(BMADLayoutError, match="Chest: no folder named any of"):
        prepare_bmad(download, tmp_path / "b", datasets=["Chest"])
    prepare_bmad(download, tmp_path / "c", datasets=["Chest"], mapping={"Chest": "Chest_AD/my_xrays"})
    assert list_datasets(tmp_path / "c") == ["Chest"]


def test_prepare_checks_the_seed_files_against_the_valid_split(download, tmp_path):
    seed_dir = tmp_path / "seeds"
    (seed_dir / "Chest").mkdir(parents=True)
    (seed_dir / "Chest" / "2-shot.txt").write_text("a-0: val_Ungood_000.png lost.png\nn-0: val_good_000.png val_good_001.png\n")
    result = prepare_bmad(download, tmp_path / "BMAD", datasets=["Chest"], seed_dir=seed_dir)
    assert len(result.notes) == 1 and "Chest: 1 file named in" in result.notes[0] and "(e.g. lost.png)" in result.notes[0]
    # SGGP's further draws beside MVFA's file are checked too
    (seed_dir / "Chest" / "shot2_sample1.txt").write_text("a-0: val_Ungood_000.png gone.png\nn-0: val_good_000.png val_good_001.png\n")
    result = prepare_bmad(download, tmp_path / "BMAD2", datasets=["Chest"], seed_dir=seed_dir)
    assert len(result.notes) == 1 and "Chest: 2 files named in" in result.notes[0] and "(e.g. lost.png, gone.png)" in result.notes[0]


# ---------------------------------------------------------------------------------------------
# The grid and the report
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def prepared(download, tmp_path) -> Path:
    prepare_bmad(download, tmp_path / "BMAD")
    return tmp_path / "BMAD"


def write_seed_files(seed_dir: Path, dataset_dir: Path, target: str, shot: int, indices: range) -> None:
    """MVFA-style seed file for ``target`` picking rotating files of its valid split."""
    valid = bmad_datalist(dataset_dir, target, "valid")
    names = {label: [Path(i["image"]).name for i in valid if i["label"] == label] for label in (0, 1)}
    lines = []
    for index in indices:
        for tag, label in (("a", 1), ("n", 0)):
            chosen = [names[label][(index + j) % len(names[label])] for j in range(shot)]
            lines.append(f"{tag}-{index}: {' '.join(chosen)}")
    (seed_dir / target).mkdir(parents=True, exist_ok=True)
    (seed_dir / target / f"{shot}-shot.txt").write_text("\n".join(lines) + "\n")


def test_plan_uses_seed_file_indices_else_random_picks(prepared, tmp_path):
    seed_dir = tmp_path / "seeds"
    write_seed_files(seed_dir, prepared, "Brain", 2, range(7))
    cells = plan_grid(prepared, ["Brain"], [0, 2], seed_dir=seed_dir)
    assert cells == [Cell("Brain")] + [Cell("Brain", 2, "seed_index", i) for i in range(5)]  # at most five
    assert plan_grid(prepared, ["Brain"], [2], seeds=[6], seed_dir=seed_dir) == [Cell("Brain", 2, "seed_index", 6)]
    with pytest.raises(ValueError, match="has no seed indices \\[9\\]"):
        plan_grid(prepared, ["Brain"], [2], seeds=[9], seed_dir=seed_dir)
    with pytest.raises(FileNotFoundError, match="4-shot.txt"):
        plan_grid(prepared, ["Brain"], [4], seed_dir=seed_dir)
    assert plan_grid(prepared, ["Liver"], [4]) == [Cell("Liver", 4, "random_seed", s) for s in range(5)]
    with pytest.raises(ValueError, match="not in"):
        plan_grid(prepared, ["Lung"], [0])

    options = GridOptions(prepared, tmp_path / "runs", seed_dir=seed_dir, epochs=3, tiny=True, extra={"image_size": "56"})
    command = options.command(Cell("Brain", 2, "seed_index", 1), "evaluating")
    assert command[1:5] == ["-m", "monai.bundle", "run", "evaluating"]
    assert [Path(p).name for p in ast.literal_eval(command[command.index("--config_file") + 1])] == ["train.json", "fewshot.json", "evaluate.json", "tiny.json"]
    flags = dict(zip(command[7::2], command[8::2]))
    assert flags["--bundle_root"] == str(tmp_path / "runs" / "k2" / "Brain" / "seed_index_1")
    assert (flags["--shot"], flags["--seed_index"], flags["--seed_dir"], flags["--epochs"], flags["--image_size"]) == ("2", "1", str(seed_dir), "3", "56")
    random_pick = options.command(Cell("Chest", 4, "random_seed", 3), "training")
    assert random_pick[random_pick.index("--seed") + 1] == "3" and "--seed_index" not in random_pick
    # The paper's model selection is an overlay config for training, not an override.
    paper = GridOptions(prepared, tmp_path / "runs", seed_dir=seed_dir, model_selection="paper", tiny=True)
    for run_id, names in (("training", ["train.json", "fewshot.json", "paper_selection.json", "tiny.json"]),
                          ("evaluating", ["train.json", "fewshot.json", "evaluate.json", "tiny.json"])):
        command = paper.command(Cell("Brain", 2, "seed_index", 1), run_id)
        assert [Path(p).name for p in ast.literal_eval(command[command.index("--config_file") + 1])] == names
        assert "--model_selection" not in command
    assert paper.protocol()["model_selection"] == "paper"
    assert paper.bundle == ROOT  # default: the repository holding scripts/
    with pytest.raises(ValueError, match="may not set \\['target'\\]"):
        GridOptions(prepared, tmp_path / "runs", extra={"target": "Brain"})


def _row(target: str, shot: int, image: float, pixel: float | None, pick: str = "") -> dict:
    return {"setting": "", "shot": shot, "target": target, "pick": pick, "has_masks": pixel is not None,
            "folder": f"{shot}/{target}/{pick}", "image_auroc": image, "pixel_auroc": pixel}


def test_report_has_the_paper_layout_with_paper_numbers_and_differences():
    cells = [Cell("Brain"), Cell("Chest")] + [Cell(t, 4, "random_seed", s) for t in ("Brain", "Chest") for s in (0, 1)]
    rows = [_row("Brain", 0, 0.80, 0.90), _row("Chest", 0, 0.70, None),
            _row("Brain", 4, 0.90, 0.97, "0"), _row("Brain", 4, 0.94, 0.99, "1"), _row("Chest", 4, 0.82, None, "0")]
    report = format_report(rows, cells, {"model_selection": "paper", "epochs": 50})
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert table[0] == "| Setting |  | ChestXray AUC | BrainMRI AUC | BrainMRI pAUC |"  # MVFA's column order
    assert table[2] == "| zero-shot | ours | 70.00 | 80.00 | 90.00 |"
    assert table[3] == "|  | paper | 71.11 | 78.63 | 90.27 |"
    assert table[4] == "|  | Δ | -1.11 | +1.37 | -0.27 |"
    assert table[5] == "| k=4 | ours | 82.00 (1/2) | 92.00 ± 2.83 | 98.00 ± 1.41 |"
    assert table[6] == "|  | paper | 81.95 | 92.44 | 97.30 |"
    assert "best validation score on the target's **test** set" in report and "random picks with seeds 0, 1" in report


def test_report_lists_generic_data_sets_without_paper_rows():
    cells = [Cell("Alpha", 2, "random_seed", 0), Cell("Beta", 2, "random_seed", 0)]
    report = format_report([_row("Beta", 2, 0.5, 0.6, "0")], cells, {"model_selection": "last"})
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert table == ["| Setting |  | Alpha AUC | Beta AUC | Beta pAUC |", "|---|---|---|---|---|", "| k=2 | ours | — | 50.00 | 60.00 |"]
    assert "leak-free" in report and "Paper:" not in report


def _run_in_process(command: list[str], log: Path) -> None:
    """``reproduction._run`` with the bundle command run inside this process
    (``helpers.run_command_logged_in_process``; each ``python -m monai.bundle`` pays ~12 CPU-s of
    imports): the same command line written to the cell's log, then the run's output; a failure
    raises ``CellFailed`` with the log's tail, as ``_run`` does."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(command)}\n")
        status, stdout, stderr = run_command_logged_in_process(command)
        handle.write(stdout + "".join(f"{line}\n" for line in stderr))
    if status != 0:
        raise CellFailed(f"exit status {status}; log: {log}\n{log.read_text(encoding='utf-8', errors='replace')[-4000:]}")


def test_prepare_then_reproduce_the_grid_resumably(download, tmp_path, capsys, monkeypatch):
    """prepare_bmad.py then reproduce.py --tiny on a reduced grid (Brain: zero-shot and 2-shot;
    five bundle runs in all): the report has every cell, a rerun skips finished cells, and a cell
    that lost its metrics is run again alone. The first four runs are the grid's bundle commands
    run inside this process (:func:`_run_in_process`); the resumed one is a real
    ``python -m monai.bundle`` subprocess, as ``reproduction._run`` starts it."""
    # One thread: on small CPUs torch's thread hand-offs cost far more than these tiny models.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    subprocess_run = reproduction._run
    monkeypatch.setattr(reproduction, "_run", _run_in_process)
    data, runs, seeds = tmp_path / "BMAD", tmp_path / "runs", tmp_path / "seeds"
    assert load_script("prepare_bmad").main(["--source", str(download), "--output", str(data)]) == 0
    write_seed_files(seeds, data, "Brain", 2, range(1))
    reproduce = load_script("reproduce")
    argv = ["--dataset-dir", str(data), "--output", str(runs), "--datasets", "Brain", "--shots", "0", "2",
            "--seed-dir", str(seeds), "--tiny", "--epochs", "1", "--extra", "image_size=56", "--extra", "num_workers=0"]
    capsys.readouterr()

    assert reproduce.main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("would run training") == 2 and "--seed_index 0" in dry and "estimate for 2 cells" in dry
    assert not runs.exists()

    assert reproduce.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(": training -> ") == 2 and first.count(": evaluating -> ") == 2
    table = [line for line in (runs / "report.md").read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| Setting |  | BrainMRI AUC | BrainMRI pAUC |"
    ours = [line for line in table if "| ours |" in line]
    assert len(ours) == 2 and all(re.fullmatch(r"\| \S+ \| ours( \| \d+\.\d\d){2} \|", line) for line in ours), table
    assert "|  | paper | 78.63 | 90.27 |" in table
    results = json.loads((runs / "results.json").read_text())
    assert len(results["results"]) == 2 and results["unfinished"] == [] and results["protocol"]["model_selection"] == "last"
    assert (runs / "results.csv").read_text().count("\n") == 3

    assert reproduce.main([*argv, "--extra", "num_workers=1"]) == 0  # a setting that does not change the numbers
    again = capsys.readouterr().out
    assert again.count(": skip (finished") == 2 and ": training" not in again and ": evaluating" not in again

    # A cell interrupted after training (no metrics yet) is resumed alone, without training again,
    # by a real bundle process.
    (runs / "k2" / "Brain" / "seed_index_0" / "eval" / "metrics.json").unlink()
    monkeypatch.setattr(reproduction, "_run", subprocess_run)
    assert reproduce.main(argv) == 0
    resumed = capsys.readouterr().out
    assert resumed.count(": skip (finished") == 1 and ": training" not in resumed
    assert resumed.count(": evaluating -> ") == 1 and "k=2 Brain seed_index=0: evaluating" in resumed
    assert "(2 of 2 cells finished)" in resumed
    assert (runs / "k2" / "Brain" / "seed_index_0" / "eval" / "metrics.json").is_file()
    # every run wrote its command line and then its output to the cell's log
    for cell, run_id in ((Cell("Brain"), "training"), (Cell("Brain"), "evaluating"), (Cell("Brain", 2, "seed_index", 0), "evaluating")):
        text = (runs / cell.relpath / "logs" / f"{run_id}.log").read_text()
        assert text.startswith("\n$ ") and f" run {run_id} " in text.splitlines()[1] and len(text.splitlines()) > 2, (cell, run_id)

    # Finished cells run with other settings are neither reused nor mixed into a report.
    for extra in (["--epochs", "2"], ["--epochs", "2", "--report-only"]):
        assert reproduce.main([*argv, *extra]) == 2
        assert "was run with other settings (changed: ['epochs'])" in capsys.readouterr().err


def test_baselines_join_the_grid_and_the_table(synthetic_bmad, tmp_path):
    cells = plan_grid(synthetic_bmad, ["Alpha"], [0, 2], seeds=[0, 1], methods=["mvfa", "clip", "memory"])
    assert [(c.shot, c.method, c.value) for c in cells] == [
        (0, "mvfa", None), (0, "clip", None), (2, "mvfa", 0), (2, "mvfa", 1), (2, "memory", 0), (2, "memory", 1)]
    # WinCLIP has text and memory: a zero-shot cell per target where the grid has zero-shot, and MVFA's picks
    winclip = plan_grid(synthetic_bmad, ["Alpha"], [0, 2], seeds=[0, 1], methods=["winclip"])
    assert [(c.shot, c.method, c.value) for c in winclip] == [(0, "winclip", None), (2, "winclip", 0), (2, "winclip", 1)]
    assert [c.shot for c in plan_grid(synthetic_bmad, ["Alpha"], [2], seeds=[0], methods=["winclip", "clip"])] == [0, 2]
    options = GridOptions(synthetic_bmad, tmp_path / "runs")
    memory = cells[4]
    assert memory.relpath == Path("memory") / "k2" / "Alpha" / "random_seed_0"  # MVFA's cells keep their folders
    assert options.overrides(memory)["method"] == "memory" and "method" not in options.overrides(cells[2])
    assert "estimate for 6 cells: 120 training steps" in estimate_runtime(cells, GridOptions(synthetic_bmad, tmp_path, epochs=1))
    rows = [{**_row("Alpha", 0, 0.70, 0.80), "method": "mvfa"}, {**_row("Alpha", 0, 0.60, 0.65), "method": "clip"},
            {**_row("Alpha", 2, 0.90, 0.95, "0"), "method": "mvfa"}, {**_row("Alpha", 2, 0.80, 0.85, "0"), "method": "memory"},
            {**_row("Alpha", 2, 0.70, 0.75, "1"), "method": "memory"}]
    main_table = format_report(rows, cells, {}).split("## Spread over the support draws")[0]
    table = [line for line in main_table.splitlines() if line.startswith("|")]
    assert table[2:] == [
        "| zero-shot | ours | 70.00 | 80.00 |",
        "| zero-shot | CLIP (no adapters) | 60.00 | 65.00 |",
        "| k=2 | ours | 90.00 (1/2) | 95.00 (1/2) |",
        "| k=2 | memory bank (no adapters) | 75.00 ± 7.07 | 80.00 ± 7.07 |",
    ]
    with pytest.raises(ValueError, match="methods must be some of"):
        plan_grid(synthetic_bmad, ["Alpha"], [0], methods=["patchcore"])
    with pytest.raises(ValueError, match="memory baseline is a few-shot memory bank"):
        plan_grid(synthetic_bmad, ["Alpha"], [0], methods=["memory"])
