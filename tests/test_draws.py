"""Several support draws as one request (scripts/reproduce.py): seed-file lists in MVFA's and
SGGP's format, one run per draw (resumable), the draws' spread against numbers recomputed from
each run's metrics.json, the clean-versus-paper table and the multi-draw HTML page."""

from __future__ import annotations

import json
import statistics
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import reproduction  # scripts/reproduction.py
from medad.io.data import bmad_datalist, seed_file_indices, seed_files
from medad.io.report import write_draws_report
from reproduction import PUBLISHED_DRAWS, Cell, GridOptions, draw_summary, format_report, plan_grid, selection_gap

from test_reproduce import _run_in_process, load_script, prepare_bmad

ROOT = Path(__file__).resolve().parents[1]
#: MVFA's own 4-shot seed files (copied from ../shared/data/mvfa_fewshot_seed: the tests use no file outside the repository)
MVFA_SEEDS = ROOT / "tests" / "data" / "mvfa_fewshot_seed"


def write_sggp_files(folder: Path, dataset_dir: Path, target: str, shot: int, draws: int) -> list[Path]:
    """SGGP-style seed files of ``target``: ``<shot>-shot.txt`` then ``shot<shot>_sample<i>.txt``,
    one seed (index 0) each, draw ``d`` picking rotating files of the valid split."""
    valid = bmad_datalist(dataset_dir, target, "valid")
    names = {label: [Path(i["image"]).name for i in valid if i["label"] == label] for label in (0, 1)}
    files = []
    for draw in range(draws):
        picks = {label: [names[label][(draw + j) % len(names[label])] for j in range(shot)] for label in (0, 1)}
        path = folder / target / (f"{shot}-shot.txt" if draw == 0 else f"shot{shot}_sample{draw}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"n-0: {' '.join(picks[0])}\na-0: {' '.join(picks[1])}\n")
        files.append(path)
    return files


def test_seed_files_are_listed_in_sggp_order_and_mvfa_files_read(tmp_path):
    for name in ("4-shot.txt", "shot4_sample10.txt", "shot4_sample2.txt", "shot4_sample1.txt", "shot8_sample1.txt", "notes.txt"):
        (tmp_path / name).write_text("a-0: x.png\nn-0: y.png\n")
    assert [p.name for p in seed_files(tmp_path, 4)] == ["4-shot.txt", "shot4_sample1.txt", "shot4_sample2.txt", "shot4_sample10.txt"]
    assert [p.name for p in seed_files(tmp_path, 8)] == ["shot8_sample1.txt"]
    assert seed_files(tmp_path, 2) == [] and seed_files(tmp_path / "absent", 4) == []
    # MVFA's own files (n- line first) hold one seed each
    for name in ("Brain", "Chest", "Histopathology", "Liver", "Retina_OCT2017", "Retina_RESC"):
        assert seed_file_indices(MVFA_SEEDS / name / "4-shot.txt") == [0]


@pytest.fixture()
def prepared(tmp_path) -> Path:
    from test_reproduce import write_bmad_download

    prepare_bmad(write_bmad_download(tmp_path / "download"), tmp_path / "BMAD", datasets=["Brain", "Chest"])
    return tmp_path / "BMAD"


def test_plan_draws_from_seed_file_lists_counts_and_both_selections(prepared, tmp_path):
    seeds = tmp_path / "seeds"
    files = write_sggp_files(seeds, prepared, "Brain", 2, 3)
    cells = plan_grid(prepared, ["Brain"], [2], seed_dir=seeds)
    assert [(c.file, c.value) for c in cells] == [(str(f.resolve()), 0) for f in files]  # every seed of every file
    assert [str(c.relpath) for c in cells] == ["k2/Brain/2-shot_0", "k2/Brain/shot2_sample1_0", "k2/Brain/shot2_sample2_0"]
    assert [c.draw for c in cells] == ["2-shot:0", "shot2_sample1:0", "shot2_sample2:0"]
    options = GridOptions(prepared, tmp_path / "runs", seed_dir=seeds, tiny=True)
    command = options.command(cells[1], "training")
    assert command[command.index("--seed_file") + 1] == str(files[1].resolve()) and command[command.index("--seed_index") + 1] == "0"
    assert plan_grid(prepared, ["Brain"], [2], seed_dir=seeds, draws=2) == cells[:2]
    assert plan_grid(prepared, ["Brain"], [2], seed_file_list=files[::-1]) == cells[::-1]  # a list, in its order
    with pytest.raises(ValueError, match="4 draws asked, but the seed files of Brain at k=2 hold 3"):
        plan_grid(prepared, ["Brain"], [2], seed_dir=seeds, draws=4)
    with pytest.raises(ValueError, match="give a count of draws instead"):
        plan_grid(prepared, ["Brain"], [2], seeds=[0], seed_dir=seeds)
    with pytest.raises(ValueError, match="one target at one k"):
        plan_grid(prepared, ["Brain", "Chest"], [2], seed_file_list=files)
    # a count of seeded random draws
    assert plan_grid(prepared, ["Chest"], [2], draws=3) == [Cell("Chest", 2, "random_seed", s) for s in range(3)]

    both = plan_grid(prepared, ["Chest"], [2], draws=1, selection="both")
    assert [(c.selection, str(c.relpath)) for c in both] == [("last", "k2/Chest/random_seed_0"), ("paper", "paper_selection/k2/Chest/random_seed_0")]
    grid = GridOptions(prepared, tmp_path / "runs", model_selection="both", tiny=True)
    names = {c.selection: [Path(f).name for f in grid.config_files(c, "training")] for c in both}
    assert names == {"last": ["train.json", "fewshot.json", "tiny.json"], "paper": ["train.json", "fewshot.json", "paper_selection.json", "tiny.json"]}
    with pytest.raises(ValueError, match="needs cells planned with it"):
        grid.config_files(Cell("Chest", 2, "random_seed", 0), "training")


def test_a_malformed_seed_file_is_refused_naming_the_file_and_line(prepared, tmp_path):
    files = write_sggp_files(tmp_path / "seeds", prepared, "Brain", 2, 2)
    files[1].write_text("n-0: a.png b.png\nabnormal: c.png d.png\n")
    with pytest.raises(ValueError, match=rf"{files[1].name}:2: expected 'a-<i>: files'"):
        plan_grid(prepared, ["Brain"], [2], seed_dir=tmp_path / "seeds")
    files[1].write_text("n-0: a.png b.png\n")  # no seed with both lines
    with pytest.raises(ValueError, match=rf"{files[1].name}: no seed in the file"):
        plan_grid(prepared, ["Brain"], [2], seed_file_list=files)
    assert load_script("reproduce").main(["--dataset-dir", str(prepared), "--output", str(tmp_path / "r"), "--datasets", "Brain",
                                          "--shots", "2", "--seed-files", *map(str, files), "--dry-run"]) == 2


def test_spread_and_gap_tables_match_numbers_recomputed_independently():
    picks = ["a:0", "b:0", "c:0"]
    image, pixel = [0.81, 0.93, 0.77], [0.95, 0.90, 0.99]
    rows = [{"setting": "k=4", "method": "mvfa", "selection": side, "shot": 4, "target": "Brain", "pick": p, "has_masks": True,
             "folder": ("paper_selection/" if side == "paper" else "") + f"k4/Brain/{p}",
             "image_auroc": i + (0.02 if side == "paper" else 0), "pixel_auroc": x}
            for side in ("last", "paper") for p, i, x in zip(picks, image, pixel)]
    cells = [Cell("Brain", 4, "seed_index", 0, file=f"/s/{p[0]}.txt", selection=side) for side in ("last", "paper") for p in picks]
    summary = {(s["selection"], s["metric"]): s for s in draw_summary(rows, cells)}
    clean = summary["last", "image_auroc"]
    assert (clean["draws"], clean["planned"]) == (3, 3)
    assert clean["mean"] == pytest.approx(np.mean(image)) and clean["sd"] == pytest.approx(np.std(image, ddof=1))
    assert (clean["min"], clean["max"]) == (0.77, 0.93) and clean["values"] == dict(zip(picks, image))
    assert clean["paper"] == pytest.approx(0.9244) and (clean["published_mean"], clean["published_sd"]) == pytest.approx((0.9139, 0.0304))
    assert summary["paper", "pixel_auroc"]["published_mean"] is None  # the 10-draw numbers are image AUROC only
    gap = selection_gap(rows)
    assert len(gap) == 6 and all(g["difference"] == pytest.approx(g["paper"] - g["last"]) for g in gap)
    assert [g["difference"] for g in gap if g["metric"] == "image_auroc"] == pytest.approx([0.02] * 3)

    report = format_report(rows, cells, {"model_selection": "both"})
    assert "| k=4 | ours (leak-free) |" in report and "| k=4 | ours (paper selection) |" in report
    spread = f"| k=4 | ours | last | BrainMRI | AUC | 3 | {100 * np.mean(image):.2f} | {100 * np.std(image, ddof=1):.2f} | 77.00 | 93.00 | 92.44 | 91.39 ± 3.04 |"
    assert spread in report.splitlines()
    assert "| k=4 | ours | BrainMRI | b:0 | AUC | 93.00 | 95.00 | +2.00 |" in report.splitlines()
    assert "Table S.IV" in report and set(PUBLISHED_DRAWS[4]) == {"Histopathology", "Chest", "Retina_OCT2017", "Brain", "Liver", "Retina_RESC"}


class _DrawsPage(HTMLParser):
    """The draws table's header and each gallery card's ``(data-draw, data-image)``."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.cards: list[tuple[str, str]] = []
        self.images = 0
        self._in_th = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self._in_th = tag == "th"
        if tag == "figure":
            self.cards.append((attrs["data-draw"], attrs["data-image"]))
        self.images += tag == "img"

    def handle_data(self, data: str) -> None:
        if self._in_th:
            self.headers.append(data)
            self._in_th = False


def _cards(page: str) -> list[str]:
    """``data-image`` of every gallery card of one draw's own report.html."""
    found: list[str] = []

    class Cards(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag == "figure":
                found.append(dict(attrs)["data-image"])

    Cards().feed(page)
    return found


def test_three_draws_run_resumably_and_their_table_matches_their_metrics(prepared, tmp_path, capsys, monkeypatch):
    """Three SGGP-style draws of Brain at k=2 with the tiny backbone, in-process: the first run is
    interrupted in the second draw's training; the rerun trains the two missing draws only (the
    finished draw's files are untouched); the table's mean, SD, min and max equal those
    recomputed from the three runs' metrics.json; each run trained on its own seed file; the
    draws page shows every draw's galleries, each card marked with its draw."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seeds, runs = tmp_path / "seeds", tmp_path / "runs"
    files = write_sggp_files(seeds, prepared, "Brain", 2, 3)
    commands: list[list[str]] = []

    def interrupted(command: list[str], log: Path) -> None:
        commands.append(command)
        if "training" in command and "shot2_sample1_0" in command[command.index("--bundle_root") + 1]:
            raise reproduction.CellFailed("interrupted")
        _run_in_process(command, log)

    monkeypatch.setattr(reproduction, "_run", interrupted)
    reproduce = load_script("reproduce")
    argv = ["--dataset-dir", str(prepared), "--output", str(runs), "--datasets", "Brain", "--shots", "2", "--seed-dir", str(seeds),
            "--tiny", "--epochs", "1", "--extra", "image_size=56", "--extra", "num_workers=0"]
    assert reproduce.main(argv) == 1
    first = runs / "k2" / "Brain" / "2-shot_0"
    assert (first / "eval" / "metrics.json").is_file() and not (runs / "k2" / "Brain" / "shot2_sample1_0" / "eval").exists()
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    assert "(1 of 3 cells finished)" in capsys.readouterr().out

    commands.clear()
    monkeypatch.setattr(reproduction, "_run", lambda command, log: (commands.append(command), _run_in_process(command, log)))
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    trained = [c[c.index("--bundle_root") + 1] for c in commands if c[c.index("run") + 1] == "training"]
    assert [Path(t).name for t in trained] == ["shot2_sample1_0", "shot2_sample2_0"] and "skip (finished" in out
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamps  # the finished draw is untouched

    folders = [runs / "k2" / "Brain" / f"{f.stem}_0" for f in files]
    metrics = [json.loads((folder / "eval" / "metrics.json").read_text()) for folder in folders]
    for folder, path in zip(folders, files):  # each run trained and was evaluated on its own seed file's support images
        named = set(path.read_text().split()) - {"n-0:", "a-0:"}
        fitted = {line.removeprefix("support: ") for line in (folder / "eval" / "report.html").read_text().split("&quot;") if line.startswith("support: ")}
        assert fitted == named, folder
    results = json.loads((runs / "results.json").read_text())
    assert len(results["results"]) == 3 and results["clean_versus_paper"] == []
    for metric in ("image_auroc", "pixel_auroc"):
        values = [m["val_" + metric] for m in metrics]
        (summary,) = [s for s in results["draws"] if s["metric"] == metric]
        assert summary["draws"] == 3 and summary["mean"] == pytest.approx(statistics.fmean(values))
        assert summary["sd"] == pytest.approx(np.std(values, ddof=1)) and (summary["min"], summary["max"]) == (min(values), max(values))
    image = [m["val_image_auroc"] for m in metrics]
    row = f"| k=2 | ours | last | BrainMRI | AUC | 3 | {100 * np.mean(image):.2f} | {100 * np.std(image, ddof=1):.2f} |"
    assert any(line.startswith(row) for line in (runs / "report.md").read_text().splitlines())

    page = _DrawsPage()
    page.feed((runs / "draws_report.html").read_text())
    draws = ["2-shot:0", "shot2_sample1:0", "shot2_sample2:0"]
    assert page.headers[:4] == ["metric", *draws]
    for draw, folder in zip(draws, folders):
        own = _cards((folder / "eval" / "report.html").read_text())
        assert own and [image for d, image in page.cards if d == draw] == own


def test_the_draws_page_lists_a_draw_not_evaluated_yet(tmp_path):
    evaluated = tmp_path / "a" / "eval"
    evaluated.mkdir(parents=True)
    (evaluated / "metrics.json").write_text(json.dumps({"val_image_auroc": 0.75, "thresholds": {}}))
    path = write_draws_report({"k=2 Alpha (last selection)": [("a", evaluated), ("b", tmp_path / "b" / "eval")]}, tmp_path / "d.html")
    text = path.read_text()
    assert "not evaluated yet: b" in text and "0.7500" in text


def test_both_selections_run_side_by_side_and_their_gap_matches_the_runs(prepared, tmp_path, capsys, monkeypatch):
    """--model-selection both with one random draw of Chest at k=2: the leak-free cell and the
    paper protocol's (trained with configs/paper_selection.json) each run; the gap table equals
    the difference recomputed from their metrics.json."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(reproduction, "_run", _run_in_process)
    runs = tmp_path / "runs"
    argv = ["--dataset-dir", str(prepared), "--output", str(runs), "--datasets", "Chest", "--shots", "2", "--draws", "1",
            "--model-selection", "both", "--tiny", "--epochs", "1", "--extra", "image_size=56", "--extra", "num_workers=0"]
    assert load_script("reproduce").main(argv) == 0
    clean, paper = runs / "k2" / "Chest" / "random_seed_0", runs / "paper_selection" / "k2" / "Chest" / "random_seed_0"
    assert json.loads((paper / "settings.json").read_text())["configs"] == ["train.json", "fewshot.json", "paper_selection.json", "tiny.json"]
    assert "paper_selection.json" not in json.loads((clean / "settings.json").read_text())["configs"]
    assert "--model_selection" not in (paper / "logs" / "training.log").read_text()  # the overlay, not an override
    assert "saved the selected model" in (paper / "logs" / "training.log").read_text()  # chosen on the test set
    assert "saved the selected model" not in (clean / "logs" / "training.log").read_text()
    values = {side: json.loads((folder / "eval" / "metrics.json").read_text())["val_image_auroc"] for side, folder in (("last", clean), ("paper", paper))}
    (gap,) = json.loads((runs / "results.json").read_text())["clean_versus_paper"]
    assert (gap["last"], gap["paper"]) == (values["last"], values["paper"]) and gap["difference"] == pytest.approx(values["paper"] - values["last"])
    line = f"| k=2 | ours | ChestXray | random_seed=0 | AUC | {100 * values['last']:.2f} | {100 * values['paper']:.2f} | {100 * (values['paper'] - values['last']):+.2f} |"
    assert line in (runs / "report.md").read_text().splitlines()
