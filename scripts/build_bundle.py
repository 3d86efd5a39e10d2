#!/usr/bin/env python
"""Build the model-zoo archive of this bundle: ``dist/<name>_v<version>.zip``.

The archive has the layout that ``python -m monai.bundle download`` unpacks and the model-zoo
expects, one top folder named after the bundle::

    <name>/configs/        every configs/*.json and configs/logging.conf
    <name>/models/model.pt the trained detector (unless --exclude-model)
    <name>/docs/           bundle/docs (model card, data licences)
    <name>/LICENSE
    <name>/large_files.yml bundle/large_files.yml with the model's URL and sha256

``name`` and ``version`` come from ``configs/metadata.json``. Before writing anything the script
checks the metadata against the fields of MONAI's bundle schema (``meta_schema_20240725``) and
that every path in the configs is built from ``@bundle_root`` (or is a user input such as
``dataset_dir``), so the unpacked bundle runs wherever it is put.

Example::

    python scripts/build_bundle.py --model-url https://example.org/releases/v0.1.0/model.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Top-level fields that MONAI's bundle schema (meta_schema_20240725.json) requires.
REQUIRED_METADATA = (
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
#: Fields every tensor in ``network_data_format`` must have (same schema).
REQUIRED_TENSOR_FIELDS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")
#: Config keys whose values are the user's own data, not part of the bundle: they may be absolute.
USER_INPUT_KEYS = frozenset({"dataset_dir", "seed_dir"})
#: Folders of a bundle: a literal path starting with one of them is relative to the working
#: directory, not to ``bundle_root``.
BUNDLE_FOLDERS = ("configs", "models", "docs", "eval", "outputs", "samples", "logs")
#: Keys that name a location: their value must be a reference or an expression built on one.
PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "_root")
HASH_TYPE = "sha256"
# Fixed entry times make the archive depend on the files' contents only.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class BundleError(RuntimeError):
    """The bundle cannot be packed as it is; the message says what to fix."""


def metadata_problems(metadata: dict[str, Any]) -> list[str]:
    """What ``metadata`` lacks for MONAI's schema and the model-zoo CI (empty when fine)."""
    problems = [f"missing field {key!r}" for key in REQUIRED_METADATA if key not in metadata]
    for key in [k for k in REQUIRED_METADATA if k not in ("required_packages_version", "network_data_format")]:
        if key in metadata and not (isinstance(metadata[key], str) and metadata[key].strip()):
            problems.append(f"{key!r} must be a non-empty string")
    if "required_packages_version" in metadata and not isinstance(metadata["required_packages_version"], dict):
        problems.append("'required_packages_version' must be an object")
    if "required_packages_version" in metadata and not str(metadata.get("schema", "")).endswith("meta_schema_20240725.json"):
        # Older schemas require 'optional_packages_version' instead and would reject this file.
        problems.append("'required_packages_version' needs the schema meta_schema_20240725.json")
    changelog = metadata.get("changelog")
    if not isinstance(changelog, dict) or metadata.get("version") not in changelog:
        problems.append(f"version {metadata.get('version')!r} is missing from 'changelog' (the model-zoo CI requires it)")
    if not re.fullmatch(r"[A-Za-z0-9_]+", str(metadata.get("name", ""))):
        problems.append("'name' must be the bundle's folder name (letters, digits, underscores)")
    io = metadata.get("network_data_format", {})
    for section, tensor_name in (("inputs", "image"), ("outputs", "pred")):
        # MONAI's verify_net_in_out and ckpt_export read inputs#image and outputs#pred.
        if tensor_name not in io.get(section, {}):
            problems.append(f"network_data_format#{section}#{tensor_name} is missing")
    for section in ("inputs", "outputs"):
        for tensor_name, tensor in io.get(section, {}).items():
            where = f"network_data_format#{section}#{tensor_name}"
            problems += [f"{where} lacks {field!r}" for field in REQUIRED_TENSOR_FIELDS if field not in tensor]
            if "num_channels" in tensor and not isinstance(tensor["num_channels"], int):
                problems.append(f"{where}#num_channels must be an integer")
            shape = tensor.get("spatial_shape", [])
            if not isinstance(shape, list) or not all(isinstance(v, (int, str)) for v in shape):
                problems.append(f"{where}#spatial_shape must be a list of integers or strings")
            value_range = tensor.get("value_range", [])
            if not isinstance(value_range, list) or not all(isinstance(v, (int, float)) for v in value_range):
                problems.append(f"{where}#value_range must be a list of numbers ([] if unbounded)")
            if "is_patch_data" in tensor and not isinstance(tensor["is_patch_data"], bool):
                problems.append(f"{where}#is_patch_data must be a boolean")
    return problems


def _strings(config: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a config with its MONAI id (``a#b#0``)."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield from _strings(value, f"{path}#{key}" if path else str(key))
    elif isinstance(config, list):
        for index, value in enumerate(config):
            yield from _strings(value, f"{path}#{index}")
    elif isinstance(config, str):
        yield path, config


def _is_cwd_relative(path: str) -> bool:
    return path.startswith(("./", "../")) or (path.split("/")[0] in BUNDLE_FOLDERS and "/" in path)


def config_path_problems(config: dict[str, Any]) -> list[str]:
    """Paths in a bundle config that do not derive from ``@bundle_root`` (empty when fine).

    ``bundle_root`` itself must be relative (``.``, overridden with ``--bundle_root``); a path
    literal must be joined onto a config reference (``$@bundle_root + '/models'``,
    ``$@ckpt_dir + '/model.pt'``); absolute paths are allowed only for the user's data
    (:data:`USER_INPUT_KEYS`).
    """
    problems = []
    root = config.get("bundle_root")
    if isinstance(root, str) and os.path.isabs(root):
        problems.append(f"bundle_root is absolute ({root!r}): use '.' and --bundle_root")
    for config_id, value in _strings(config):
        key = config_id.split("#")[-1]
        if key in ("_target_", "bundle_root") or key in USER_INPUT_KEYS or value.startswith("@"):
            continue
        if value.startswith("$"):
            literals = [a or b for a, b in re.findall(r"'([^']*)'|\"([^\"]*)\"", value)]
            bad = [lit for lit in literals if (os.path.isabs(lit) and "@" not in value) or _is_cwd_relative(lit)]
        elif key.endswith(PATH_KEY_SUFFIXES):
            bad = [value]  # a literal location: relative to the working directory or fixed
        else:
            bad = [value] if os.path.isabs(value) or _is_cwd_relative(value) else []
        problems += [f"{config_id}: path {lit!r} does not derive from @bundle_root" for lit in bad]
    return problems


def file_hash(path: Path, hash_type: str = HASH_TYPE) -> str:
    """Hex digest of a file, read in chunks (weights can be large)."""
    digest = hashlib.new(hash_type)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model(path: Path) -> None:
    """Refuse files that are not a saved :class:`medad.MVFADetector` state dict (``models/model.pt``)."""
    from medad.checkpoint import read_checkpoint, stored_description  # only here: the rest needs no torch

    try:
        state = read_checkpoint(path)
        described = stored_description(state, source=str(path)) is not None
    except (OSError, ValueError) as error:
        raise BundleError(str(error)) from error
    if not described:
        keys = sorted(map(str, state))[:5]
        raise BundleError(
            f"{path}: not a detector state dict as training writes to models/model.pt (found {keys}); "
            "resume_checkpoint_*.pt files hold optimiser state too and are not released"
        )


def large_files_config(template: Path, model: Path, url: str | None) -> str:
    """``large_files.yml`` for the archive: the template with the model's URL and hash."""
    config = yaml.safe_load(template.read_text())
    entries = [entry for entry in config.get("large_files", []) if entry.get("path") == "models/model.pt"]
    if len(entries) != 1:
        raise BundleError(f"{template}: needs exactly one large_files entry with path 'models/model.pt'")
    entry = entries[0]
    entry["url"] = url or entry.get("url") or ""
    if not entry["url"]:
        raise BundleError(
            f"no download URL for models/model.pt: give --model-url (where this version's weights are "
            f"published) or set it in {template}"
        )
    entry["hash_type"] = HASH_TYPE
    entry["hash_val"] = file_hash(model)
    header = "# Written by scripts/build_bundle.py: fetch with `python -m monai.bundle download_large_files`.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def _zip_info(arcname: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def build(
    root: Path = ROOT,
    model: Path | None = None,
    model_url: str | None = None,
    output_dir: Path | None = None,
    include_model: bool = True,
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` and return its path.

    Args:
        root: the repository (bundle) root.
        model: the detector to release; default ``<root>/models/model.pt``.
        model_url: where ``models/model.pt`` of this version is published (``large_files.yml``).
        output_dir: default ``<root>/dist``.
        include_model: pack the weights; without them, users fetch them with
            ``download_large_files`` (the hash is still taken from ``model``).

    Raises:
        BundleError: a required file is missing or the metadata/configs are not releasable.
    """
    root = Path(root)
    model = Path(model) if model is not None else root / "models" / "model.pt"
    output_dir = Path(output_dir) if output_dir is not None else root / "dist"
    configs, docs = root / "configs", root / "bundle" / "docs"
    required = [
        configs / "metadata.json",
        configs / "inference.json",
        configs / "logging.conf",
        docs / "README.md",
        root / "bundle" / "large_files.yml",
        root / "LICENSE",
    ]
    missing = [str(path) for path in required if not path.is_file()]
    if not model.is_file():
        missing.append(f"{model} (train a model first, or give --model PATH)")
    if missing:
        raise BundleError("cannot build the bundle archive, missing:\n  " + "\n  ".join(missing))

    metadata = json.loads((configs / "metadata.json").read_text())
    problems = [f"configs/metadata.json: {p}" for p in metadata_problems(metadata)]
    config_files = sorted(configs.glob("*.json"))
    for path in config_files:
        if path.name != "metadata.json":
            problems += [f"configs/{path.name}: {p}" for p in config_path_problems(json.loads(path.read_text()))]
    if problems:
        raise BundleError("the bundle is not releasable:\n  " + "\n  ".join(problems))
    check_model(model)

    name, version = metadata["name"], metadata["version"]
    files: list[tuple[str, Path | str]] = [(f"configs/{p.name}", p) for p in [*config_files, configs / "logging.conf"]]
    files += [(f"docs/{p.relative_to(docs).as_posix()}", p) for p in sorted(docs.rglob("*")) if p.is_file()]
    files += [("LICENSE", root / "LICENSE")]
    files += [("large_files.yml", large_files_config(root / "bundle" / "large_files.yml", model, model_url))]
    if include_model:
        files += [("models/model.pt", model)]

    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{name}_v{version}.zip"
    from medad.io import atomic_write  # only here: the rest needs no torch

    # Written beside the target and renamed: readers never see a half-written archive.
    with atomic_write(target, "wb") as handle, zipfile.ZipFile(handle, "w") as archive:
        for arcname, source in files:
            info = _zip_info(f"{name}/{arcname}")
            if isinstance(source, str):
                archive.writestr(info, source)
            else:
                with source.open("rb") as src, archive.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="detector weights to release (default: models/model.pt)")
    parser.add_argument("--model-url", help="URL where this version's models/model.pt is published (large_files.yml)")
    parser.add_argument("--output-dir", type=Path, help="where the archive goes (default: dist/)")
    parser.add_argument("--root", type=Path, default=ROOT, help="bundle (repository) root (default: this repository)")
    parser.add_argument(
        "--exclude-model", action="store_true", help="leave the weights out; users fetch them with download_large_files"
    )
    args = parser.parse_args(argv)
    try:
        path = build(args.root, args.model, args.model_url, args.output_dir, include_model=not args.exclude_model)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
