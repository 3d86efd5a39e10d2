"""Reproducing the MVFA paper: BMAD preparation, the experiment grid, and the results table.

A product tool, not part of the installed ``medad`` library: the command-line scripts beside it
import it as a sibling module (``from reproduction import ...``). What it knows of the data
sets (download folder names, masks, the paper's names) comes from :data:`medad.io.data.BMAD`.

Three parts, used by ``scripts/prepare_bmad.py`` and ``scripts/reproduce.py``:

- :func:`prepare_bmad` turns the BMAD release as downloaded into the layout the bundle reads
  (``<Name>_AD/{valid,test}/{good,Ungood}/img`` and ``Ungood/anomaly_mask``), linking files.
- :func:`plan_grid` and :func:`run_grid` run MVFA's experiments (zero-shot leave-one-out, few-shot
  for each k and support pick) through the bundle's own workflows, one folder per cell,
  resumable.
- :func:`collect_results` and :func:`format_report` gather the metrics into ``results.csv``,
  ``results.json`` and a paper-style table beside the published numbers; with several support
  draws per data set, their spread (:func:`draw_summary`, beside :data:`PUBLISHED_DRAWS`), and
  with both model selections, the leak-free and the paper's numbers side by side
  (:func:`selection_gap`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medad.model.augment import FEWSHOT_AUGMENTATIONS
from medad.model.backbone import weights_come_with_name
from medad.model.methods import METHODS, Method
from medad.io.data import (
    BMAD,
    BMAD_DATASETS,
    IMAGE_SUFFIXES,
    MASK_FOLDERS,
    bmad_datalist,
    dataset_has_masks,
    list_datasets,
    read_fewshot_seed,
    seed_file_indices,
    seed_files,
)
from medad.io.files import atomic_write, strict_json
from medad.surfaces.workflow import bundle_command

__all__ = [
    "PAPER_ORDER",
    "PAPER_RESULTS",
    "BMADLayoutError",
    "Cell",
    "CellFailed",
    "DatasetPlan",
    "GridOptions",
    "PrepareResult",
    "PUBLISHED_DRAWS",
    "PUBLISHED_DRAWS_SOURCE",
    "SELECTIONS",
    "collect_results",
    "draw_groups",
    "draw_summary",
    "estimate_runtime",
    "find_bmad_folders",
    "format_report",
    "parse_assignments",
    "plan_grid",
    "prepare_bmad",
    "run_grid",
    "scan_bmad_dataset",
    "selection_gap",
    "write_results",
]

# --------------------------------------------------------------------------------------------
# BMAD as downloaded
# --------------------------------------------------------------------------------------------

# The folder names under which each MVFA data set may lie in the BMAD download are
# ``medad.io.data.BMAD[name].download_folders``, tried in that order (case-insensitive, at most four
# levels below ``--source``; a folder counts only when it holds a ``test`` split). Where a folder
# is named otherwise, pass ``--map NAME=FOLDER``. Which data sets MVFA evaluates at pixel level
# (their abnormal images must all have masks) is ``medad.io.data.BMAD[name].has_masks``.
#: Split and class folder names as BMAD spells them (case-insensitive); the first is ours.
SPLIT_FOLDERS = {"valid": ("valid", "val", "validation"), "test": ("test",)}
CLASS_FOLDERS = {"good": ("good",), "Ungood": ("ungood",)}
_MAX_LISTED = 20
_SEARCH_DEPTH = 4
# Folders that never hold a data set root: skipping them keeps the search out of image folders
# ("train" is searched: BMAD's Liver lies in Liver/Train/hist_DIY).
_LEAF_NAMES = {"valid", "val", "validation", "test", "good", "ungood", "img", "label", "anomaly_mask"}


class BMADLayoutError(ValueError):
    """The download does not have the expected layout; the message lists every problem found."""


@dataclass
class DatasetPlan:
    """What :func:`scan_bmad_dataset` found for one data set.

    ``files[split][cls]`` lists ``(image, mask or None)``; ``layout`` says which folder names
    matched; ``notes`` hold non-fatal findings (ignored files, masks without images, skipped
    images).
    """

    name: str
    root: Path
    files: dict[str, dict[str, list[tuple[Path, Path | None]]]]
    layout: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(mask is not None for split in self.files.values() for pairs in split.values() for _, mask in pairs)


@dataclass
class PrepareResult:
    """What :func:`prepare_bmad` wrote: the plans, the output folder and how files were placed."""

    output: Path
    plans: list[DatasetPlan]
    placed: dict[str, int]
    missing: list[str]
    notes: list[str]

    def summary(self) -> str:
        """Counts per data set, split and class, then how the files were placed."""
        lines = []
        for plan in self.plans:
            lines.append(f"{plan.name}_AD  <-  {plan.root}")
            if plan.layout:
                lines.append(f"  layout: {'; '.join(plan.layout)}")
            for split, classes in plan.files.items():
                good, bad = len(classes["good"]), len(classes["Ungood"])
                masks = sum(mask is not None for _, mask in classes["Ungood"])
                mask_text = f" ({masks} masks)" if plan.has_masks else ""
                lines.append(f"  {split:<5}  good {good:>6}   Ungood {bad:>6}{mask_text}")
            lines += [f"  note: {note}" for note in plan.notes]
        if self.missing:
            lines.append(f"not found in the download (left out): {', '.join(self.missing)}")
        lines += [f"note: {note}" for note in self.notes]
        total = sum(self.placed.values())
        how = ", ".join(f"{count} {mode}" for mode, count in self.placed.items() if count)
        lines.append(f"wrote {total} files into {self.output} ({how or 'none'})")
        return "\n".join(lines)


def _child(parent: Path, names: Iterable[str]) -> Path | None:
    """The sub-folder of ``parent`` whose name is one of ``names`` (case-insensitive)."""
    wanted = {name.lower() for name in names}
    if not parent.is_dir():
        return None
    found = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower() in wanted)
    if len(found) > 1:
        raise BMADLayoutError(f"ambiguous folders in {parent}: {[p.name for p in found]}")
    return found[0] if found else None


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files directly in ``folder`` (sorted) and how many other files were ignored."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    images = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
    return images, len(files) - len(images)


def _is_dataset_root(folder: Path) -> bool:
    return _child(folder, SPLIT_FOLDERS["test"]) is not None


def _candidate_folders(source: Path) -> list[Path]:
    """``source`` and the folders up to ``_SEARCH_DEPTH`` levels below it, breadth first."""
    found, level = [source], [source]
    for _ in range(_SEARCH_DEPTH):
        below = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir())
            except PermissionError:
                continue
            below += [p for p in children if p.name.lower() not in _LEAF_NAMES]
        found += below
        level = below
    return found


def find_bmad_folders(
    source: str | os.PathLike,
    names: Sequence[str] | None = None,
    mapping: Mapping[str, str] | None = None,
) -> tuple[dict[str, Path], list[str]]:
    """Locate each data set's root folder in a BMAD download.

    Args:
        source: the folder the BMAD archives were extracted into.
        names: MVFA data set names to look for; default all six. Names given explicitly must
            be found.
        mapping: ``{name: folder}`` overrides (absolute, or relative to ``source``); also the
            way to add a data set that is not one of the six.

    Returns:
        The roots found and the names (of the six, when ``names`` is None) not found.

    Raises:
        BMADLayoutError: a mapped folder does not exist or has no ``test`` split, a requested
            data set is not found, or a name matches several folders.
    """
    source = Path(source)
    if not source.is_dir():
        raise BMADLayoutError(f"BMAD source folder not found: {source}")
    mapping = dict(mapping or {})
    wanted = list(names) if names else list(BMAD_DATASETS) + [n for n in mapping if n not in BMAD_DATASETS]
    unknown = [n for n in wanted if n not in BMAD and n not in mapping]
    if unknown:
        raise BMADLayoutError(
            f"unknown data set names {unknown}: the known ones are {list(BMAD)}; "
            "others need --map NAME=FOLDER"
        )
    folders = None  # searched lazily: mapped names need no search
    roots: dict[str, Path] = {}
    missing: list[str] = []
    for name in wanted:
        if name in mapping:
            root = Path(mapping[name])
            root = root if root.is_absolute() else source / root
            if not root.is_dir() or not _is_dataset_root(root):
                raise BMADLayoutError(f"--map {name}={mapping[name]}: {root} is not a folder with a 'test' split")
            roots[name] = root
            continue
        folders = _candidate_folders(source) if folders is None else folders
        for alias in BMAD[name].download_folders:
            matches = [p for p in folders if p.name.lower() == alias.lower() and _is_dataset_root(p)]
            if len(matches) > 1:
                raise BMADLayoutError(
                    f"{name}: several folders named {alias!r} with a test split: "
                    f"{[str(p) for p in matches]}; choose one with --map {name}=FOLDER"
                )
            if matches:
                roots[name] = matches[0]
                break
        else:
            if names:
                raise BMADLayoutError(
                    f"{name}: no folder named any of {list(BMAD[name].download_folders)} with a 'test' split "
                    f"within {_SEARCH_DEPTH} levels of {source}; point to it with --map {name}=FOLDER"
                )
            missing.append(name)
    return roots, missing


def _class_images(split_dir: Path, cls: str) -> tuple[Path | None, str]:
    """The folder holding one class's images in a split, and its layout: ``<class>/img``,
    ``img/<class>`` or flat ``<class>/`` (BMAD's image-level data sets)."""
    cls_dir = _child(split_dir, CLASS_FOLDERS[cls])
    img_dir = _child(split_dir, ("img",))
    candidates = []
    if cls_dir is not None:
        candidates.append((_child(cls_dir, ("img",)), f"{cls_dir.name}/img/"))
    if img_dir is not None and (inner := _child(img_dir, CLASS_FOLDERS[cls])) is not None:
        candidates.append((inner, f"img/{inner.name}/"))
    if cls_dir is not None:
        candidates.append((cls_dir, f"{cls_dir.name}/ (flat)"))
    for folder, layout in candidates:
        if folder is not None and _image_files(folder)[0]:
            return folder, layout
    return None, ""


def _mask_folder(split_dir: Path) -> Path | None:
    """The abnormal class's mask folder: ``Ungood/<name>`` or ``<name>/Ungood`` for each name of
    :data:`medad.io.data.MASK_FOLDERS` in turn (MVFA's ``anomaly_mask``, then BMAD's ``label``)."""
    cls_dir = _child(split_dir, CLASS_FOLDERS["Ungood"])
    for name in MASK_FOLDERS:
        if cls_dir is not None and (found := _child(cls_dir, (name,))) is not None:
            return found
        if (outer := _child(split_dir, (name,))) is not None and (found := _child(outer, CLASS_FOLDERS["Ungood"])):
            return found
    return None


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def scan_bmad_dataset(name: str, root: str | os.PathLike, masks: bool | None = None, skip_unpaired: bool = False) -> DatasetPlan:
    """Find the images (and masks) of one data set's ``valid`` and ``test`` splits.

    Args:
        name: MVFA name (``Brain``, ...).
        root: the data set's folder in the download (holding ``train``/``valid``/``test``).
        masks: whether abnormal images must have masks; default: for Brain, Liver and
            Retina_RESC (MVFA's pixel-level data sets), and for other names when a mask folder
            exists. By default masks of BMAD's image-level data sets are not linked, so that the
            bundle treats them as image-level, as MVFA does.
        skip_unpaired: leave out abnormal images without a mask (listed in the notes) instead
            of failing.

    Raises:
        BMADLayoutError: a split or class is missing or empty, or abnormal images lack masks;
            the message names the folders and files.
    """
    root = Path(root)
    problems: list[str] = []
    plan = DatasetPlan(name, root, {})
    layouts: dict[str, list[str]] = {"splits": [], "images": [], "masks": []}
    for split, aliases in SPLIT_FOLDERS.items():
        split_dir = _child(root, aliases)
        if split_dir is None:
            problems.append(f"{name}: no {'/'.join(aliases)} folder in {root}")
            continue
        if split_dir.name != split:
            layouts["splits"].append(f"{split} in {split_dir.name}/")
        plan.files[split] = {}
        for cls in CLASS_FOLDERS:
            folder, layout = _class_images(split_dir, cls)
            if folder is None:
                problems.append(
                    f"{name}: no images for {split}/{cls} in {split_dir} "
                    f"(looked in {cls}/img/, img/{cls}/ and {cls}/, any capitalisation)"
                )
                plan.files[split][cls] = []
                continue
            layouts["images"].append(layout)
            images, ignored = _image_files(folder)
            if ignored:
                plan.notes.append(f"{ignored} non-image files ignored in {folder}")
            pairs: list[tuple[Path, Path | None]] = [(image, None) for image in images]
            mask_dir = _mask_folder(split_dir) if cls == "Ungood" else None
            wants_masks = masks if masks is not None else (BMAD[name].has_masks if name in BMAD else mask_dir is not None)
            if cls == "Ungood" and wants_masks:
                if mask_dir is None:
                    problems.append(
                        f"{name}: no mask folder for {split}/Ungood in {split_dir} "
                        f"(looked for {', '.join(f'Ungood/{m}/, {m}/Ungood/' for m in MASK_FOLDERS)})"
                    )
                else:
                    layouts["masks"].append(f"{mask_dir.relative_to(split_dir)}/")
                    mask_names = {p.name for p in _image_files(mask_dir)[0]}
                    unpaired = [image.name for image in images if image.name not in mask_names]
                    orphans = sorted(mask_names - {image.name for image in images})
                    if orphans:
                        plan.notes.append(f"{len(orphans)} masks without an image in {mask_dir}: {_listed(orphans)}")
                    if unpaired and skip_unpaired:
                        plan.notes.append(f"left out {len(unpaired)} {split}/Ungood images without a mask in {mask_dir}: {_listed(unpaired)}")
                    elif unpaired:
                        problems.append(
                            f"{name}: {len(unpaired)} of {len(images)} {split}/Ungood images in {folder} "
                            f"have no mask of the same name in {mask_dir}: {_listed(unpaired)}"
                        )
                    pairs = [(image, mask_dir / image.name) for image in images if image.name in mask_names]
                    if not pairs and skip_unpaired:
                        problems.append(f"{name}: none of the {split}/Ungood images in {folder} has a mask in {mask_dir}")
            elif cls == "Ungood" and mask_dir is not None and name in BMAD:
                plan.notes.append(f"masks in {mask_dir} not used: MVFA evaluates {name} at image level only")
            plan.files[split][cls] = pairs
    plan.layout = [f"{kind}: {', '.join(dict.fromkeys(found))}" for kind, found in layouts.items() if found]
    if problems:
        raise BMADLayoutError("\n".join(problems))
    return plan


def _place(source: Path, target: Path, mode: str) -> str:
    """Put ``source`` at ``target`` by ``mode`` (symlink, hard or copy); fall back to a copy
    where a link cannot be made (other file system, no symlink permission). Returns the mode
    used."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if mode == "symlink":
            target.symlink_to(source.resolve())
            return "symlinked"
        if mode == "hard":
            os.link(source, target)
            return "hard-linked"
    except OSError:
        pass
    shutil.copy2(source, target)
    return "copied"


def _seed_file_notes(output: Path, seed_dir: Path, names: Iterable[str]) -> list[str]:
    """One note per data set whose MVFA seed files name files that its ``valid`` split lacks."""
    notes = []
    for name in names:
        valid = {(item["label"], Path(item["image"]).name) for item in bmad_datalist(output, name, "valid")}
        absent: dict[str, None] = {}
        for seed_file in sorted([*(seed_dir / name).glob("*-shot.txt"), *(seed_dir / name).glob("shot*_sample*.txt")]):
            for index in seed_file_indices(seed_file):
                for label, picked in zip((1, 0), read_fewshot_seed(seed_file, index)):
                    absent.update(dict.fromkeys(f for f in picked if (label, f) not in valid))
        if absent:
            examples = list(absent)
            notes.append(
                f"{name}: {len(examples)} file{'s' if len(examples) > 1 else ''} named in the seed files of {seed_dir / name} are not in {name}_AD/valid "
                f"(e.g. {', '.join(examples[:5])}); few-shot runs with --seed-dir will fail for {name} "
                "(leave --seed-dir out for random picks)"
            )
    return notes


def prepare_bmad(
    source: str | os.PathLike,
    output: str | os.PathLike,
    datasets: Sequence[str] | None = None,
    mapping: Mapping[str, str] | None = None,
    link: str = "symlink",
    skip_unpaired: bool = False,
    seed_dir: str | os.PathLike | None = None,
) -> PrepareResult:
    """Lay out a BMAD download as the bundle reads it: ``output/<Name>_AD/{valid,test}/...``.

    Everything is checked before anything is written: a problem in any data set stops the run
    with all problems listed. ``train/`` is not used by MVFA and is not linked.

    Args:
        source: folder the BMAD archives were extracted into.
        output: new or empty folder (becomes the bundle's ``dataset_dir``).
        datasets: which data sets (default: all six that are found).
        mapping: ``{name: folder}`` where the automatic search fails (see
            ``medad.io.data.BMAD[name].download_folders``).
        link: ``symlink`` (default), ``hard`` or ``copy``; links fall back to copies where the
            file system refuses them.
        skip_unpaired: leave out abnormal images without masks instead of failing.
        seed_dir: MVFA's ``fewshot_seed`` folder, to check that the files it names exist.

    Raises:
        FileExistsError: ``output`` exists and is not empty.
        BMADLayoutError: the download is not as expected (message lists every problem).
    """
    if link not in ("symlink", "hard", "copy"):
        raise ValueError(f"link must be symlink, hard or copy, got {link!r}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"output folder {output} exists and is not empty: give a new or empty folder")
    roots, missing = find_bmad_folders(source, datasets, mapping)
    if not roots:
        raise BMADLayoutError(
            f"none of the BMAD data sets found in {source} (looked for folders named "
            f"{sorted({a for dataset in BMAD.values() for a in dataset.download_folders})}); use --map NAME=FOLDER"
        )
    plans, problems = [], []
    for name, root in roots.items():
        try:
            plans.append(scan_bmad_dataset(name, root, skip_unpaired=skip_unpaired))
        except BMADLayoutError as err:
            problems.append(str(err))
    if problems:
        raise BMADLayoutError("the BMAD download is not as expected:\n" + "\n".join(problems))

    placed = {"symlinked": 0, "hard-linked": 0, "copied": 0}
    for plan in plans:
        for split, classes in plan.files.items():
            for cls, pairs in classes.items():
                base = output / f"{plan.name}_AD" / split / cls
                for image, mask in pairs:
                    placed[_place(image, base / "img" / image.name, link)] += 1
                    if mask is not None:
                        placed[_place(mask, base / "anomaly_mask" / image.name, link)] += 1
    notes = []
    if link != "copy" and placed["copied"]:
        notes.append(f"{placed['copied']} files were copied because the file system refused a {link} link")
    # Read the result back the way the bundle does, so a layout it cannot read fails here.
    for plan in plans:
        for split, classes in plan.files.items():
            items = bmad_datalist(output, plan.name, split)
            expected = sum(len(pairs) for pairs in classes.values())
            folder = output / f"{plan.name}_AD" / split
            if len(items) != expected:
                raise RuntimeError(f"{folder}: wrote {expected} images but the bundle's reader finds {len(items)}")
            unreadable = [item["mask"] for item in items if "mask" in item and not Path(item["mask"]).is_file()]
            if unreadable:
                raise RuntimeError(f"{folder}: masks written but not readable: {_listed(unreadable)}")
    if seed_dir is not None:
        notes += _seed_file_notes(output, Path(seed_dir), [plan.name for plan in plans])
    return PrepareResult(output, plans, placed, missing, notes)


# --------------------------------------------------------------------------------------------
# The experiment grid
# --------------------------------------------------------------------------------------------

#: Support picks per few-shot cell when neither ``seeds`` nor the seed files say otherwise.
DEFAULT_PICKS = 5
#: Overrides the grid sets itself; ``--extra`` may not change them.
GRID_KEYS = frozenset({"bundle_root", "dataset_dir", "target", "shot", "seed", "seed_dir", "seed_file", "seed_index"})
#: The model selections of a grid: ``last`` (leak-free), ``paper`` (the authors' checkpoint chosen
#: on the target's test set) or ``both``, each cell run once per selection, side by side.
SELECTIONS = ("last", "paper", "both")
#: Overrides that do not change the numbers: a cell run with other values still counts as done.
VOLATILE_KEYS = frozenset({"num_workers", "eval_batch_size", "device"})


class CellFailed(RuntimeError):
    """A bundle workflow of one cell exited with an error; the message has its log's tail."""


@dataclass(frozen=True)
class Cell:
    """One experiment: zero-shot (``shot`` 0) or few-shot on ``target``, with its support pick
    (``pick`` ``seed_index`` for a seed of a seed file, ``random_seed`` for a seeded random
    draw, None for zero-shot), by ``method`` (MVFA, or a baseline: :data:`medad.METHODS`).

    ``file`` is the seed file of a ``seed_index`` pick where the grid lists seed files (SGGP's
    ``shot<k>_sample<i>.txt``, ``--seed-files``); None where the bundle finds MVFA's
    ``<seed_dir>/<target>/<k>-shot.txt`` itself. ``selection`` is the cell's model selection in a
    grid that runs both side by side (``last`` or ``paper``; the paper's cells lie under
    ``paper_selection/``), None where the grid has one (:attr:`GridOptions.model_selection`).
    """

    target: str
    shot: int = 0
    pick: str | None = None
    value: int | None = None
    method: str = "mvfa"
    file: str | None = None
    selection: str | None = None

    @property
    def setting(self) -> str:
        return "zero-shot" if self.shot == 0 else f"k={self.shot}"

    @property
    def draw(self) -> str:
        """The support draw, as folders and tables name it: ``seed_index=1``, ``random_seed=3``,
        ``shot4_sample2:0`` (a seed file's stem and seed index); empty for zero-shot."""
        if not self.pick:
            return ""
        return f"{Path(self.file).stem}:{self.value}" if self.file else f"{self.pick}={self.value}"

    @property
    def relpath(self) -> Path:
        if self.shot == 0:
            path = Path("zero_shot") / self.target
        else:
            pick = f"{Path(self.file).stem}_{self.value}" if self.file else f"{self.pick}_{self.value}"
            path = Path(f"k{self.shot}") / self.target / pick
        path = path if self.method == "mvfa" else Path(self.method) / path
        return Path("paper_selection") / path if self.selection == "paper" else path

    @property
    def label(self) -> str:
        pick = f" {self.draw}" if self.pick else ""
        method = "" if self.method == "mvfa" else f" [{self.method}]"
        selection = f" ({self.selection} selection)" if self.selection else ""
        return f"{self.setting} {self.target}{pick}{method}{selection}"

    def configs(self, run_id: str) -> list[str]:
        """Bundle config files (names without ``.json``) of a workflow of this cell."""
        names = ["train"] + (["fewshot"] if self.shot else [])
        return names + (["evaluate"] if run_id == "evaluating" else [])

    def overrides(self) -> dict[str, object]:
        """The cell's own bundle overrides (the grid's are in :class:`GridOptions`)."""
        values: dict[str, object] = {"target": self.target}
        if self.method != "mvfa":
            values["method"] = self.method
        if self.shot:
            values["shot"] = self.shot
        if self.file is not None:
            values["seed_file"] = self.file
        if self.pick == "seed_index":
            values["seed_index"] = self.value
        elif self.pick == "random_seed":
            values["seed"] = self.value
        return values


def plan_grid(
    dataset_dir: str | os.PathLike,
    targets: Sequence[str] | None = None,
    shots: Sequence[int] = (0, 2, 4, 8, 16),
    seeds: Sequence[int] | None = None,
    seed_dir: str | os.PathLike | None = None,
    methods: Sequence[str] = ("mvfa",),
    draws: int | None = None,
    seed_file_list: Sequence[str | os.PathLike] | None = None,
    selection: str = "last",
) -> list[Cell]:
    """The cells of the grid, zero-shot first, then by k, method, target and pick (each pick a
    support draw, run as a cell of its own).

    Args:
        dataset_dir: the prepared data (``<Name>_AD`` folders).
        targets: target data sets (default: all). Zero-shot always trains on all the *other*
            data sets in ``dataset_dir``, as the paper does.
        shots: 0 for zero-shot, k for k-shot.
        seeds: with ``seed_dir`` holding MVFA's files alone, the seed-file indices to run (default:
            those the file holds, at most five); without seed files, the seeds of random support
            picks (default 0-4).
        seed_dir: seed files, ``<seed_dir>/<target>/<k>-shot.txt`` (MVFA's) and, where they
            exist, SGGP's ``shot<k>_sample<i>.txt`` beside it (:func:`medad.io.data.seed_files`);
            with SGGP's files every seed of every file is a draw.
        draws: how many support draws per few-shot cell: the first ``draws`` seeds of the seed
            files, or random picks with seeds ``0 .. draws-1`` (instead of ``seeds``).
        seed_file_list: seed files to draw from (every seed of each, in order), for one target
            and one k; instead of ``seed_dir``.
        selection: ``last``, ``paper`` (one model selection: :class:`GridOptions` applies it) or
            ``both`` (each cell twice, leak-free and the paper's, side by side).
        methods: registered methods (:data:`medad.METHODS`): ``mvfa`` and the baselines, which
            run the cells :func:`_method_cells` gives them (``clip`` scores with text alone, the
            same with or without support images, so it runs once per target, as a zero-shot
            cell; ``memory`` needs support images and runs the few-shot cells' picks).

    Raises:
        FileNotFoundError: no data sets, or a seed file is missing.
        ValueError: an unknown target or method, zero-shot with a single data set, a seed index
            the file lacks, more draws than the seed files hold, a malformed seed file (naming it
            and the line), or a method that needs support images (``memory``) without shots.
    """
    available = list_datasets(dataset_dir) if Path(dataset_dir).is_dir() else []
    if not available:
        raise FileNotFoundError(f"no data sets (<Name>_AD folders) in {dataset_dir}; prepare them with scripts/prepare_bmad.py")
    targets = list(targets or available)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ValueError(f"data sets {unknown} not in {dataset_dir} (found: {available})")
    if any(k < 0 for k in shots):
        raise ValueError(f"shots must be 0 (zero-shot) or positive, got {list(shots)}")
    if 0 in shots and len(available) < 2:
        raise ValueError(f"zero-shot trains on the other data sets, but {dataset_dir} holds only {available}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {list(METHODS)}, got {list(methods)}")
    needing_support = [m for m in methods if METHODS[m].needs_support]
    if needing_support and not any(shots):
        raise ValueError(f"the {needing_support[0]} baseline is a few-shot memory bank: give shots k > 0")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
    if draws is not None and (draws < 1 or seeds):
        raise ValueError(f"draws must be a positive count and not given with seeds, got draws={draws}, seeds={seeds}")
    if seed_file_list and (seed_dir is not None or len(targets) != 1 or len([k for k in shots if k]) != 1):
        raise ValueError("a list of seed files draws for one target at one k (and without a seed folder)")
    cells = []
    for shot in sorted(set(shots)):
        for target in targets:
            if shot == 0:
                cells.append(Cell(target))
            elif seed_file_list:
                cells += _file_draws(target, shot, [Path(f) for f in seed_file_list], seeds, draws)
            elif seed_dir is None:
                cells += [Cell(target, shot, "random_seed", s) for s in (seeds if seeds else range(draws or DEFAULT_PICKS))]
            else:
                files = seed_files(Path(seed_dir) / target, shot)
                if not files:
                    raise FileNotFoundError(
                        f"no seed file {Path(seed_dir) / target / f'{shot}-shot.txt'} (nor shot{shot}_sample<i>.txt beside it); "
                        "leave out --seed-dir for random support picks"
                    )
                if len(files) == 1:  # MVFA's file alone: the bundle reads it from seed_dir, picks are its indices
                    cells += [dataclasses.replace(cell, file=None) for cell in _file_draws(target, shot, files, seeds, draws, DEFAULT_PICKS)]
                else:
                    cells += _file_draws(target, shot, files, seeds, draws)
    chosen = [cell for name in dict.fromkeys(methods) for cell in _method_cells(METHODS[name], cells, targets, shots)]
    if selection == "both":
        chosen = [dataclasses.replace(cell, selection=side) for cell in chosen for side in ("last", "paper")]
    return sorted(chosen, key=lambda cell: cell.shot)


def _file_draws(target: str, shot: int, files: Sequence[Path], seeds: Sequence[int] | None, draws: int | None,
                default: int | None = None) -> list[Cell]:
    """The draws of seed ``files`` (each seed of each file, in order) as cells: the seed indices
    ``seeds`` (of a single file), else the first ``draws``, else the first ``default`` (None: all)."""
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"no seed file {path}")
    found = [(str(path.resolve()), index) for path in files for index in seed_file_indices(path)]
    if seeds:
        if len(files) > 1:
            raise ValueError(f"seed indices {list(seeds)} pick within one seed file, but {target} at k={shot} has "
                             f"{len(files)} ({', '.join(p.name for p in files)}): give a count of draws instead")
        indices = [index for _, index in found]
        absent = [s for s in seeds if s not in indices]
        if absent:
            raise ValueError(f"{files[0]} has no seed indices {absent} (it has {indices})")
        found = [(found[0][0], s) for s in seeds]
    elif draws is not None:
        if draws > len(found):
            raise ValueError(f"{draws} draws asked, but the seed files of {target} at k={shot} hold {len(found)}: "
                             f"{', '.join(str(p) for p in files)}")
        found = found[:draws]
    elif default is not None:
        found = found[:default]
    return [Cell(target, shot, "seed_index", index, file=file) for file, index in found]


def _method_cells(method: Method, cells: Sequence[Cell], targets: Sequence[str], shots: Sequence[int]) -> list[Cell]:
    """The cells ``method`` runs of MVFA's ``cells``: a trained method all of them; one that
    trains nothing a zero-shot cell per target where it scores with text (always where it has
    no memory, since support images change nothing then) and the few-shot cells where it takes
    a memory."""
    if method.trained:
        return list(cells)
    zero_shot = method.scores_text and (0 in shots or not method.takes_memory)
    few_shot = [dataclasses.replace(cell, method=method.name) for cell in cells if cell.shot] if method.takes_memory else []
    return ([Cell(target, method=method.name) for target in targets] if zero_shot else []) + few_shot


@dataclass
class GridOptions:
    """Settings shared by every cell of a grid.

    Attributes:
        dataset_dir: the prepared data.
        output: one folder per cell goes under it, with ``results.csv|json`` and ``report.md``.
        bundle: the bundle folder (with ``configs/``); default: this repository.
        seed_dir: MVFA's seed files (few-shot picks), or None for random picks.
        epochs: training epochs (None: the bundle's default).
        model_selection: ``last`` (leak-free), ``paper`` (best epoch on the target's test set), or
            ``both`` (the cells of :func:`plan_grid` with ``selection="both"`` say which).
        clip_model, clip_weights: backbone overrides (None: the bundle's defaults).
        tiny: add ``configs/tiny.json`` (the tiny, randomly initialised CLIP: smoke tests only).
        extra: further bundle overrides (``--extra KEY=VALUE``).
    """

    dataset_dir: Path
    output: Path
    bundle: Path = Path(__file__).resolve().parents[1]
    seed_dir: Path | None = None
    epochs: int | None = None
    model_selection: str = "last"
    clip_model: str | None = None
    clip_weights: str | None = None
    tiny: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_selection not in SELECTIONS:
            raise ValueError(f"model_selection must be one of {list(SELECTIONS)}, got {self.model_selection!r}")
        clash = sorted(GRID_KEYS & set(self.extra))
        if clash:
            raise ValueError(f"--extra may not set {clash}: the grid sets them per cell")
        if not (Path(self.bundle) / "configs" / "train.json").is_file():
            raise FileNotFoundError(f"no bundle configs in {Path(self.bundle) / 'configs'}; pass the bundle folder (--bundle)")

    def overrides(self, cell: Cell) -> dict[str, object]:
        """All bundle overrides of a cell, in a stable order."""
        values: dict[str, object] = {"dataset_dir": str(self.dataset_dir)}
        if self.epochs is not None:
            values["epochs"] = self.epochs
        if self.clip_model is not None:
            values["clip_model"] = self.clip_model
        if self.clip_weights is not None:
            values["clip_weights"] = str(self.clip_weights)
        if cell.shot and self.seed_dir is not None:
            values["seed_dir"] = str(self.seed_dir)
        return {**values, **self.extra, **cell.overrides()}

    def selection(self, cell: Cell) -> str:
        """The model selection of a cell: its own in a ``both`` grid, else the grid's."""
        selection = cell.selection or self.model_selection
        if selection not in ("last", "paper"):
            raise ValueError(f"{cell.label}: a grid with model_selection={self.model_selection!r} needs cells planned with it")
        return selection

    def config_files(self, cell: Cell, run_id: str) -> list[str]:
        """The config files of one workflow of a cell, in merge order: the cell's, then
        ``paper_selection`` for training with the paper's selection (evaluating a trained
        model does not depend on how it was selected), then ``tiny``."""
        names = cell.configs(run_id)
        if self.selection(cell) == "paper" and run_id == "training":
            names.append("paper_selection")
        names += ["tiny"] if self.tiny else []
        return [str(Path(self.bundle) / "configs" / f"{name}.json") for name in names]

    def command(self, cell: Cell, run_id: str) -> list[str]:
        """The ``python -m monai.bundle run`` command of one workflow (``training`` or
        ``evaluating``) of a cell."""
        return bundle_command(run_id, self.config_files(cell, run_id), self.output / cell.relpath, self.overrides(cell))

    def bundle_default(self, key: str) -> object:
        """A value of ``configs/train.json`` (for the report, where not overridden)."""
        return json.loads((Path(self.bundle) / "configs" / "train.json").read_text()).get(key)

    def _default_weights(self) -> str:
        """The bundle's default CLIP weights for the grid's backbone (train.json's ``clip_weights``)."""
        model = self.clip_model or str(self.bundle_default("clip_model"))
        return "those of the model (hf-hub:/local-dir:)" if weights_come_with_name(model) else "openai"

    def protocol(self) -> dict[str, object]:
        """What the report states about how the numbers were made."""
        return {
            "model_selection": self.model_selection,
            "epochs": self.epochs if self.epochs is not None else self.bundle_default("epochs"),
            "clip_model": self.clip_model or ("medad-tiny" if self.tiny else self.bundle_default("clip_model")),
            "clip_weights": self.clip_weights or ("random (tiny smoke test)" if self.tiny else self._default_weights()),
            "dataset_dir": str(self.dataset_dir),
            "seed_dir": str(self.seed_dir) if self.seed_dir else None,
            "extra": dict(self.extra),
        }


def _metrics_path(options: GridOptions, cell: Cell) -> Path:
    return options.output / cell.relpath / "eval" / "metrics.json"


def _settings(options: GridOptions, cell: Cell) -> dict:
    return {"configs": [Path(f).name for f in options.config_files(cell, "training")], "overrides": options.overrides(cell)}


def _check_settings(options: GridOptions, cell: Cell) -> None:
    """Refuse a cell folder that holds a run with other settings: its numbers would otherwise
    be skipped as finished, resumed, or reported under settings they were not made with."""
    path = options.output / cell.relpath / "settings.json"
    if not path.is_file():
        return
    before, now = json.loads(path.read_text()), _settings(options, cell)
    old = {k: v for k, v in before["overrides"].items() if k not in VOLATILE_KEYS}
    new = {k: v for k, v in now["overrides"].items() if k not in VOLATILE_KEYS}
    if old != new or before["configs"] != now["configs"]:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(
            f"{path.parent} was run with other settings (changed: {changed or 'config files'}); "
            "use a new --output, or delete that folder to rerun it"
        )


def _run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise CellFailed(f"exit status {result.returncode}; log: {log}\n{tail}")


def _echo(line: str) -> None:
    print(line, flush=True)  # progress of a long grid must show up at once, also in `| tee`


def run_grid(cells: Sequence[Cell], options: GridOptions, dry_run: bool = False, echo: Callable[[str], None] = _echo) -> list[Cell]:
    """Run every cell not finished yet: training (resumed from the bundle's own checkpoints
    when it was interrupted) then evaluation. A cell is finished when its ``eval/metrics.json``
    exists; its training is done when ``train_done.json`` exists.

    Args:
        cells: from :func:`plan_grid`.
        options: the grid's settings.
        dry_run: print the commands instead of running them.
        echo: where progress lines go.

    Returns:
        The cells run (or, with ``dry_run``, that would run).

    Raises:
        CellFailed: a workflow failed (the message names the cell and its log).
        ValueError: a cell folder holds a run with other settings (checked before anything runs).
    """
    for cell in cells:
        _check_settings(options, cell)
    ran = []
    for number, cell in enumerate(cells, start=1):
        prefix = f"[{number}/{len(cells)}] {cell.label}"
        folder = options.output / cell.relpath
        if _metrics_path(options, cell).is_file():
            echo(f"{prefix}: skip (finished: {_metrics_path(options, cell)})")
            continue
        ran.append(cell)
        trained = (folder / "train_done.json").is_file()
        stages = (["evaluating"] if trained else ["training", "evaluating"])
        if dry_run:
            for run_id in stages:
                echo(f"{prefix}: would run {run_id}\n  {shlex.join(options.command(cell, run_id))}")
            continue
        if not (folder / "settings.json").is_file():
            with atomic_write(folder / "settings.json") as handle:
                json.dump(strict_json(_settings(options, cell)), handle, indent=2, allow_nan=False)
        for run_id in stages:
            log = folder / "logs" / f"{run_id}.log"
            resumed = " (resuming)" if run_id == "training" and (folder / "models").is_dir() else ""
            echo(f"{prefix}: {run_id}{resumed} -> {log}")
            start = time.perf_counter()
            try:
                _run(options.command(cell, run_id), log)
            except CellFailed as err:
                raise CellFailed(f"{cell.label}: {run_id} failed, {err}") from None
            if run_id == "training":
                with atomic_write(folder / "train_done.json") as handle:
                    json.dump({"seconds": round(time.perf_counter() - start, 1)}, handle, allow_nan=False)
        echo(f"{prefix}: done")
    return ran


# --------------------------------------------------------------------------------------------
# Results and the report
# --------------------------------------------------------------------------------------------

#: The paper tables' column order (their names for the data sets: ``medad.io.data.BMAD[name].paper_name``).
PAPER_ORDER = ("Histopathology", "Chest", "Retina_OCT2017", "Brain", "Liver", "Retina_RESC")

#: MVFA's published results, AUROC in percent: ``{shot: {data set: (image AUROC, pixel AUROC)}}``
#: (shot 0 = zero-shot; pixel AUROC None where the data set has no masks). Transcribed from
#: Huang et al., "Adapting Visual-Language Models for Generalizable Anomaly Detection in
#: Medical Images", CVPR 2024, Tables 1 (zero-shot) and 2 (few-shot, k=4); the MVFA README
#: repeats them. Check them against the paper before citing. Other k are left out on purpose.
PAPER_RESULTS: dict[int, dict[str, tuple[float, float | None]]] = {
    0: {
        "Histopathology": (77.90, None),
        "Chest": (71.11, None),
        "Retina_OCT2017": (95.40, None),
        "Brain": (78.63, 90.27),
        "Liver": (76.24, 97.85),
        "Retina_RESC": (83.31, 92.05),
    },
    4: {
        "Histopathology": (82.71, None),
        "Chest": (81.95, None),
        "Retina_OCT2017": (99.38, None),
        "Brain": (92.44, 97.30),
        "Liver": (81.18, 99.73),
        "Retina_RESC": (96.18, 98.97),
    },
}
#: MVFA's image AUROC at k=4 over ten support draws, in percent: ``{shot: {data set: (mean, SD)}}``,
#: as published (the source does not say whether its SD is the sample or the population one).
#: Source: :data:`PUBLISHED_DRAWS_SOURCE`.
PUBLISHED_DRAWS: dict[int, dict[str, tuple[float, float]]] = {
    4: {
        "Histopathology": (75.94, 5.93),
        "Chest": (77.66, 7.23),
        "Retina_OCT2017": (98.27, 1.96),
        "Brain": (91.39, 3.04),
        "Liver": (84.57, 2.92),
        "Retina_RESC": (94.96, 2.06),
    },
}
PUBLISHED_DRAWS_SOURCE = (
    "SGGP's supplementary material, Table S.IV: MVFA's 4-shot image AUROC over the ten support sets "
    "SGGP publishes as seed files (4-shot.txt, shot4_sample1..9.txt), mean ± SD"
)
#: The metrics whose spread over the support draws the results give.
SPREAD_METRICS = ("image_auroc", "pixel_auroc")
_FIRST_COLUMNS = ("setting", "method", "selection", "shot", "target", "pick", "has_masks", "folder")


def method_row(method: str) -> str:
    """How the report names a method's rows: MVFA's are ``ours``, the others their label."""
    return "ours" if METHODS[method].trained else METHODS[method].label


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def collect_results(cells: Sequence[Cell], options: GridOptions) -> list[dict]:
    """One row per finished cell: its identity and its metrics (``val_`` prefix dropped, NaN
    as None).

    Raises:
        ValueError: a cell folder holds a run with other settings than ``options``.
    """
    rows = []
    for cell in cells:
        _check_settings(options, cell)
        path = _metrics_path(options, cell)
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        row = {
            "setting": cell.setting,
            "method": cell.method,
            "shot": cell.shot,
            "target": cell.target,
            "selection": options.selection(cell),
            "pick": cell.draw,
            "has_masks": dataset_has_masks(options.dataset_dir, cell.target),
            "folder": str(cell.relpath),
        }
        row.update({key.removeprefix("val_"): _finite(value) for key, value in metrics.items()})
        rows.append(row)
    return rows


def write_results(rows: Sequence[dict], cells: Sequence[Cell], options: GridOptions) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.json`` (with the protocol and unfinished cells) to
    the output folder; return their paths."""
    metric_keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in _FIRST_COLUMNS]
    csv_path, json_path = options.output / "results.csv", options.output / "results.json"
    with atomic_write(csv_path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*_FIRST_COLUMNS, *metric_keys])
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    done = {row["folder"] for row in rows}
    document = {
        "protocol": options.protocol(),
        "results": list(rows),
        "unfinished": [str(cell.relpath) for cell in cells if str(cell.relpath) not in done],
        "draws": draw_summary(rows, cells),
        "clean_versus_paper": selection_gap(rows),
    }
    with atomic_write(json_path) as handle:
        json.dump(strict_json(document), handle, indent=2, allow_nan=False)  # a metric without masks is null
    return csv_path, json_path


def _key(row: Mapping) -> tuple:
    """What the draws of one data set share: setting, method, model selection and target."""
    return row["shot"], row.get("method", "mvfa"), row.get("selection"), row["target"]


def draw_summary(rows: Sequence[Mapping], cells: Sequence[Cell]) -> list[dict]:
    """The spread over the support draws: per few-shot setting, method, model selection, data set
    and metric (:data:`SPREAD_METRICS`, where finished draws have it), the number of draws
    finished (``draws``) and planned, their ``mean``, sample standard deviation (``sd``,
    ``ddof=1``; None for one draw), ``min`` and ``max``, each draw's value (``values``, by
    draw), next to the paper's single number (``paper``) and the published 10-draw mean and
    SD (``published_mean``, ``published_sd``: :data:`PUBLISHED_DRAWS`, image AUROC of MVFA
    only). AUROC as ``metrics.json`` holds it (0 to 1), the published numbers too."""
    summary = []
    for key in dict.fromkeys(_key(row) for row in rows if row["shot"]):
        shot, method, selection, target = key
        group = [row for row in rows if _key(row) == key]
        planned = sum((c.shot, c.method, c.target) == (shot, method, target) and c.selection in (None, selection) for c in cells)
        for metric in SPREAD_METRICS:
            values = {row["pick"]: row[metric] for row in group if row.get(metric) is not None}
            if not values:
                continue
            paper = PAPER_RESULTS.get(shot, {}).get(target) if method == "mvfa" else None
            paper_number = None if paper is None else paper[SPREAD_METRICS.index(metric)]
            published = PUBLISHED_DRAWS.get(shot, {}).get(target) if method == "mvfa" and metric == "image_auroc" else None
            numbers = list(values.values())
            summary.append({
                "setting": f"k={shot}", "method": method, "selection": selection, "target": target, "metric": metric,
                "draws": len(numbers), "planned": planned, "mean": statistics.fmean(numbers),
                "sd": statistics.stdev(numbers) if len(numbers) > 1 else None, "min": min(numbers), "max": max(numbers),
                "values": values,
                "paper": None if paper_number is None else paper_number / 100,
                "published_mean": None if published is None else published[0] / 100,
                "published_sd": None if published is None else published[1] / 100,
            })
    return summary


def draw_groups(cells: Sequence[Cell], options: GridOptions) -> dict[str, list[tuple[str, Path]]]:
    """The few-shot cells of several support draws, by setting, target, method and model
    selection (a heading each), as ``(draw, evaluation folder)``: what
    :func:`medad.io.report.write_draws_report` shows."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for cell in cells:
        if cell.shot:
            method = "" if cell.method == "mvfa" else f" [{method_row(cell.method)}]"
            heading = f"{cell.setting} {cell.target}{method} ({options.selection(cell)} selection)"
            groups.setdefault(heading, []).append((cell.draw, options.output / cell.relpath / "eval"))
    return {heading: draws for heading, draws in groups.items() if len(draws) > 1}


def selection_gap(rows: Sequence[Mapping]) -> list[dict]:
    """Each cell run with both model selections, side by side: per cell and metric
    (:data:`SPREAD_METRICS`) the leak-free value (``last``), the paper protocol's (``paper``)
    and ``difference`` = paper - last (AUROC 0 to 1). Empty unless the grid ran ``both``."""
    clean = {row["folder"]: row for row in rows if row.get("selection") == "last"}
    gap = []
    for row in rows:
        if row.get("selection") != "paper" or not row["folder"].startswith("paper_selection/"):
            continue
        twin = clean.get(row["folder"].removeprefix("paper_selection/"))
        for metric in SPREAD_METRICS if twin else ():
            if row.get(metric) is not None and twin.get(metric) is not None:
                gap.append({"setting": row["setting"], "method": row.get("method", "mvfa"), "target": row["target"],
                            "pick": row["pick"], "metric": metric, "last": twin[metric], "paper": row[metric],
                            "difference": row[metric] - twin[metric]})
    return gap


def _percent(value: float | None, signed: bool = False) -> str:
    return "" if value is None else f"{100 * value:{'+' if signed else ''}.2f}"


def _spread_lines(summary: Sequence[Mapping]) -> list[str]:
    """The markdown table of :func:`draw_summary`, in percent."""
    lines = [
        "| Setting | Method | Selection | Data set | Metric | draws | mean | SD (ddof=1) | min | max | paper (one draw) | published 10-draw mean ± SD |",
        "|" + "---|" * 12,
    ]
    for item in summary:
        name = BMAD[item["target"]].paper_name if item["target"] in BMAD else item["target"]
        count = f"{item['draws']}" + (f"/{item['planned']}" if item["draws"] < item["planned"] else "")
        published = "" if item["published_mean"] is None else f"{_percent(item['published_mean'])} ± {_percent(item['published_sd'])}"
        lines.append("| " + " | ".join([
            item["setting"], method_row(item["method"]), item["selection"] or "", name,
            "AUC" if item["metric"] == "image_auroc" else "pAUC", count, _percent(item["mean"]), _percent(item["sd"]) or "—",
            _percent(item["min"]), _percent(item["max"]), _percent(item["paper"]), published,
        ]) + " |")
    return lines


def _gap_lines(gap: Sequence[Mapping]) -> list[str]:
    """The markdown table of :func:`selection_gap`, in percent."""
    lines = ["| Setting | Method | Data set | Draw | Metric | leak-free (last) | paper selection | Δ (paper − leak-free) |",
             "|" + "---|" * 8]
    for item in gap:
        name = BMAD[item["target"]].paper_name if item["target"] in BMAD else item["target"]
        lines.append("| " + " | ".join([
            item["setting"], method_row(item["method"]), name, item["pick"] or "—",
            "AUC" if item["metric"] == "image_auroc" else "pAUC",
            _percent(item["last"]), _percent(item["paper"]), _percent(item["difference"], signed=True),
        ]) + " |")
    return lines


def _columns(rows: Sequence[dict], cells: Sequence[Cell], options: GridOptions | None) -> list[tuple[str, str]]:
    """(data set, metric) columns: MVFA's order for its data sets, the others after, sorted."""
    names = list(dict.fromkeys(cell.target for cell in cells))
    names = [n for n in PAPER_ORDER if n in names] + sorted(n for n in names if n not in PAPER_ORDER)
    masked = {row["target"] for row in rows if row["has_masks"]}
    if options is not None:
        masked |= {n for n in names if dataset_has_masks(options.dataset_dir, n)}
    columns = []
    for name in names:
        columns.append((name, "image_auroc"))
        if name in masked:
            columns.append((name, "pixel_auroc"))
    return columns


def _summary(values: list[float], planned: int) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    text = f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"
    return text + (f" ({len(values)}/{planned})" if len(values) < planned else "")


def format_report(rows: Sequence[dict], cells: Sequence[Cell], protocol: Mapping[str, object], options: GridOptions | None = None) -> str:
    """The results as a markdown table in the paper's layout: one row per setting (zero-shot,
    each k) with mean ± sample standard deviation over the support picks, and, where the paper
    gives numbers, the paper's row and the difference (ours - paper), in AUROC percent."""
    columns = _columns(rows, cells, options)
    header = ["Setting", ""] + [f"{BMAD[n].paper_name if n in BMAD else n} {'AUC' if m == 'image_auroc' else 'pAUC'}" for n, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shots = sorted({cell.shot for cell in cells})
    picks_text = []
    for shot in shots:
        group = [cell for cell in cells if cell.shot == shot]
        setting = "zero-shot" if shot == 0 else f"k={shot}"
        for method, selection in dict.fromkeys((cell.method, cell.selection) for cell in group):
            ours, paper, delta = [], [], []
            for name, metric in columns:
                planned = sum(cell.target == name and cell.method == method and cell.selection == selection for cell in group)
                values = [
                    row[metric]
                    for row in rows
                    if row["shot"] == shot and row["target"] == name and row.get("method", "mvfa") == method
                    and (selection is None or row.get("selection") == selection) and row.get(metric) is not None
                ]
                ours.append(_summary(values, planned))
                published = PAPER_RESULTS.get(shot, {}).get(name) if method == "mvfa" else None
                number = None if published is None else published[0 if metric == "image_auroc" else 1]
                paper.append("" if number is None else f"{number:.2f}")
                delta.append("" if number is None or not values else f"{100 * statistics.fmean(values) - number:+.2f}")
            side = {"last": " (leak-free)", "paper": " (paper selection)"}.get(selection or "", "")
            lines.append("| " + " | ".join([setting, method_row(method) + side, *ours]) + " |")
            if any(paper):
                lines.append("| " + " | ".join(["", "paper", *paper]) + " |")
                lines.append("| " + " | ".join(["", "Δ", *delta]) + " |")
        if shot:
            kind_names = {"seed_index": "seed-file indices", "random_seed": "random picks with seeds"}
            by_kind: dict[str, list[object]] = {}
            for cell in group:
                kind, value = ("seed files (file:index)", cell.draw) if cell.file else (kind_names[cell.pick], cell.value)
                if value not in by_kind.setdefault(kind, []):
                    by_kind[kind].append(value)
            picks_text.append(f"{setting}: " + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in by_kind.items()))

    selection = protocol.get("model_selection")
    paper_text = ("`paper`, the checkpoint with the best validation score on the target's **test** set, as the "
                  "authors did (uses test labels for model selection, so optimistic)")
    clean_text = "`last`, the adapters after the last epoch (leak-free: no look at the target's test labels)"
    selection_text = {"paper": paper_text, "both": f"both, side by side: {clean_text}; and {paper_text}"}.get(str(selection), clean_text)
    out = [
        "# MVFA reproduction",
        "",
        f"- Model selection {selection_text}.",
        f"- Epochs: {protocol.get('epochs')}; backbone: {protocol.get('clip_model')} (weights: {protocol.get('clip_weights')}).",
        f"- Data: {protocol.get('dataset_dir')}; zero-shot trains on every other data set there (leave one out).",
    ]
    if protocol.get("extra"):
        out.append(f"- Further overrides: {', '.join(f'{k}={v}' for k, v in protocol['extra'].items())}.")
    if picks_text:
        out.append(f"- Few-shot support picks: {' | '.join(picks_text)}.")
    out += [
        "",
        *lines,
        "",
        "AUROC in percent: AUC image level, pAUC pixel level (data sets with masks only). Few-shot: "
        "mean ± sample standard deviation over the support picks; (n/N): only n of N runs finished; "
        "—: none finished.",
    ]
    baselines = [METHODS[name] for name in dict.fromkeys(cell.method for cell in cells) if not METHODS[name].trained]
    if baselines:
        out.append(
            "Baselines on the same backbone, data and metrics, nothing trained: "
            + "; ".join(f"{method.label}: {method.summary}" for method in baselines) + "."
        )
    if any(shot in PAPER_RESULTS for shot in shots):
        out.append(
            "Paper: Huang et al., CVPR 2024, Tables 1 and 2, as transcribed in `scripts/reproduction.py` "
            "(check against the paper); Δ = ours − paper."
        )
    summary = [item for item in draw_summary(rows, cells) if item["planned"] > 1]
    if summary:
        out += [
            "", "## Spread over the support draws", "",
            "Each few-shot support draw is a run of its own; per data set: draws finished (n/N where fewer than "
            "planned), their mean, sample standard deviation (ddof=1; — for one draw), minimum and maximum, "
            "the paper's single-draw number and the published 10-draw mean ± SD. AUROC in percent.", "",
            *_spread_lines(summary),
        ]
        if any(item["published_mean"] is not None for item in summary):
            out += ["", f"10-draw means: {PUBLISHED_DRAWS_SOURCE}."]
    gap = selection_gap(rows)
    if gap:
        out += [
            "", "## Leak-free versus the paper's model selection", "",
            "Each cell run twice: `last` (leak-free) and the paper's checkpoint chosen on the target's test set "
            "(`configs/paper_selection.json`); Δ = paper − leak-free, AUROC in percent.", "",
            *_gap_lines(gap),
        ]
    return "\n".join(out) + "\n"


def estimate_runtime(cells: Sequence[Cell], options: GridOptions, seconds_per_image: float = 0.05) -> str:
    """A rough run time of ``cells``: training images x epochs x ``seconds_per_image`` plus
    evaluation passes (forward only, assumed a third of a training step per image).

    Training images per epoch: zero-shot, the test splits of all other data sets; few-shot,
    ``2 k x 11`` augmented support images. Evaluation: one pass over the target's test split,
    plus, with ``model_selection=paper``, about 5 validations per epoch (zero-shot) or one per
    epoch (few-shot).
    """
    epochs = int(options.epochs if options.epochs is not None else options.bundle_default("epochs"))
    sizes = {name: len(bmad_datalist(options.dataset_dir, name, "test")) for name in list_datasets(options.dataset_dir)}
    train_images = eval_images = 0
    for cell in cells:
        per_epoch = sum(n for name, n in sizes.items() if name != cell.target) if cell.shot == 0 else 2 * cell.shot * FEWSHOT_AUGMENTATIONS
        train_images += per_epoch * epochs if METHODS[cell.method].trained else 0  # baselines train nothing
        validations = 1 + (epochs * (5 if cell.shot == 0 else 1) if options.selection(cell) == "paper" else 0)
        eval_images += validations * sizes[cell.target]
    train_s = train_images * seconds_per_image
    eval_s = eval_images * seconds_per_image / 3
    return (
        f"estimate for {len(cells)} cells: {train_images} training steps (batch 1) x {seconds_per_image} s = {_duration(train_s)}, "
        f"plus {eval_images} evaluated images x {seconds_per_image / 3:.3f} s = {_duration(eval_s)}; "
        f"total about {_duration(train_s + eval_s)} (assumed {seconds_per_image} s per training image: replace with your benchmark)"
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` as a dictionary (for ``--extra`` and ``--map``)."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        result[key.strip()] = value
    return result
