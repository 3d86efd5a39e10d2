#!/usr/bin/env python
"""Build the model-zoo archive of this bundle: ``dist/<name>_v<version>.zip``.

The archive has the layout that ``python -m monai.bundle download`` unpacks and the model-zoo
expects, one top folder named after the bundle::

    <name>/configs/        every configs/*.json and configs/logging.conf; train.json's defaults
                           describe the released model (:func:`release_train_config`)
    <name>/models/model.pt the trained detector (unless --exclude-model)
    <name>/samples/        two demo images that ``run inferring`` reads by default
    <name>/docs/           bundle/docs (model card, data licences, MONAI's metadata schema)
    <name>/LICENSE
    <name>/large_files.yml bundle/large_files.yml with the model's URL and sha256 (with --model-url)

The archive works as unpacked, from its folder (MONAI's ``bundle_root`` ``.``)::

    python -m monai.bundle run inferring --config_file configs/inference.json   # samples/ -> outputs/
    python -m monai.bundle verify_metadata --meta_file configs/metadata.json \
        --filepath docs/meta_schema_20240725.json                               # offline
    python -c "import monai.bundle; print(monai.bundle.load('<name>', bundle_dir='..'))"

``name`` and ``version`` come from ``configs/metadata.json``. Before writing anything the script
checks the metadata against the fields MONAI's bundle schema requires (the copy in
``bundle/docs/meta_schema_20240725.json``) and that every path in the configs is built from
``@bundle_root`` (or is a user input such as ``dataset_dir``), so the unpacked bundle runs
wherever it is put.

Without ``--model-url`` the archive is a local release: the weights are packed and there is no
``large_files.yml`` (nothing to download). Examples::

    python scripts/build_bundle.py                                   # local release
    python scripts/build_bundle.py --model-url https://example.org/releases/v0.1.0/model.pt
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from medad.model.checkpoint import ModelDescription

ROOT = Path(__file__).resolve().parents[1]

#: MONAI's bundle metadata schema, vendored so that ``verify_metadata`` runs offline (see
#: bundle/docs/README.md): metadata.json's ``schema`` names the same file by its URL.
SCHEMA_NAME = "meta_schema_20240725.json"
_SCHEMA = json.loads((ROOT / "bundle" / "docs" / SCHEMA_NAME).read_text())
#: Top-level fields that the schema requires.
REQUIRED_METADATA = tuple(_SCHEMA["required"])
#: Fields every tensor in ``network_data_format`` must have (same schema).
REQUIRED_TENSOR_FIELDS = tuple(_SCHEMA["$defs"]["tensor"]["required"])
#: The release's sample inputs (``samples/``), drawn from scripts/demo_data.py's brain MRI domain.
SAMPLES = ("demo_brain_normal.png", "demo_brain_anomaly.png")
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
    if "required_packages_version" in metadata and not str(metadata.get("schema", "")).endswith(SCHEMA_NAME):
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


def check_model(path: Path) -> ModelDescription:
    """The description of a saved :class:`medad.MVFADetector` state dict (``models/model.pt``);
    other files are refused."""
    from medad.model.checkpoint import read_checkpoint, stored_description  # only here: the rest needs no torch

    try:
        state = read_checkpoint(path)
        description = stored_description(state, source=str(path))
    except (OSError, ValueError) as error:
        raise BundleError(str(error)) from error
    if description is None:
        keys = sorted(map(str, state))[:5]
        raise BundleError(
            f"{path}: not a detector state dict as training writes to models/model.pt (found {keys}); "
            "resume_checkpoint_*.pt files hold optimiser state too and are not released"
        )
    return description


def release_train_config(config: dict[str, Any], description: ModelDescription, model: Path) -> dict[str, Any]:
    """``train.json`` as the release ships it, describing the released model.

    ``monai.bundle.load`` with its defaults builds ``train.json``'s ``network_def`` and copies
    ``models/model.pt`` into it with ``copy_model_state``, which skips every tensor whose shape
    differs (the few-shot memory bank, the model's description): a detector built afresh would
    silently lose them. In a release, ``train.json``'s defaults are therefore the released
    model: its backbone and weights, input size, levels, method and target, and training starts
    from it (``init_checkpoint``; ``--init_checkpoint None`` trains new adapters), so
    ``network_def`` is the released detector itself. What ``network_def`` derives from the data
    (its ``datasets``, ``image_score_from_map``) is read only where ``dataset_dir`` exists, and
    is otherwise the released model's (:func:`_unless_no_data`): ``load`` resolves them with
    ``train.json``'s default ``dataset_dir``, which users do not have. MONAI's ``ConfigParser``
    applies the keys (``a#b`` ids), as ``--key value`` overrides would.
    """
    from monai.bundle import ConfigParser  # only here: the rest needs no torch

    from medad.model.checkpoint import WITH_MODEL_NAME

    weights, backbone = description.clip_weights, description.backbone.model_name
    if weights is None or weights.startswith("file:") or backbone.startswith("local-dir:"):
        raise BundleError(
            f"{model} was made with a CLIP its users cannot get (backbone {backbone!r}, weights {weights!r}): "
            "release a model trained with an open_clip tag (clip_weights 'openai', ...) or an hf-hub: backbone"
        )
    if weights == "random":
        clip = {"clip_weights": None, "clip_random_init": True}
    else:
        clip = {"clip_weights": None if weights == WITH_MODEL_NAME else weights, "clip_random_init": False}
    overrides: dict[str, Any] = {
        "clip_model": backbone,
        **clip,
        "image_size": description.backbone.image_size,
        "levels": list(description.levels),
        "method": description.method,
        "init_checkpoint": "$@ckpt_dir + '/model.pt'",
        "network_def#checkpoint": "@init_checkpoint",
        "network_def#quick_gelu": description.backbone.quick_gelu,
        "run_settings#init_checkpoint": "$None if @init_checkpoint is None else str(@init_checkpoint)",
    }
    if description.target is not None:
        overrides["target"] = description.target
    parser = ConfigParser(copy.deepcopy(config))
    for key, value in overrides.items():
        parser[key] = value
    _unless_no_data(parser, "network_def#datasets", [])
    _unless_no_data(parser, "network_def#image_score_from_map", description.image_score_from_map)
    return parser.get()


def _unless_no_data(parser: Any, config_id: str, fallback: Any) -> None:
    """Make the expression behind ``config_id`` (following ``@`` references to it) evaluate to
    ``fallback`` where ``dataset_dir`` does not exist. The condition sits in the expression
    itself: MONAI resolves every reference of an expression before evaluating it, so a reference
    to an id that reads the data cannot be guarded from outside."""
    value = parser[config_id]
    if isinstance(value, str) and value.startswith("@"):
        _unless_no_data(parser, value[1:], fallback)
    elif isinstance(value, str) and value.startswith("$"):
        parser[config_id] = f"$({value[1:]}) if os.path.exists(@dataset_dir) else {fallback!r}"


def sample_inputs(size: int, seed: int = 0) -> dict[str, bytes]:
    """The PNG files of :data:`SAMPLES`: a normal and an anomalous brain MRI view at ``size``
    pixels, from scripts/demo_data.py (the same seed gives the same bytes)."""
    import numpy as np
    from PIL import Image

    try:
        from demo_data import domain_sampler, synthesize_anomaly  # scripts/demo_data.py, a sibling tool

        sample = domain_sampler("Brain_MRI", size)
        rng = np.random.default_rng(seed)
        normal = sample(rng)[0]
        image, roi = sample(rng)
        anomalous = synthesize_anomaly(image, rng, roi, kind="lesion")[0]
    except ImportError as error:
        raise BundleError(
            f"the release's sample inputs are drawn with scripts/demo_data.py, which needs {error.name}: "
            "pip install 'medad[demo]'"
        ) from error
    files = {}
    for name, image in zip(SAMPLES, (normal, anomalous)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files[name] = buffer.getvalue()
    return files


def large_files_config(template: Path, model: Path, url: str) -> str:
    """``large_files.yml`` for the archive: the template with the model's URL and hash."""
    config = yaml.safe_load(template.read_text())
    entries = [entry for entry in config.get("large_files", []) if entry.get("path") == "models/model.pt"]
    if len(entries) != 1:
        raise BundleError(f"{template}: needs exactly one large_files entry with path 'models/model.pt'")
    entry = entries[0]
    entry["url"] = url
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
        model_url: where ``models/model.pt`` of this version is published (``large_files.yml``);
            ``None``: a local release, weights packed and no ``large_files.yml``.
        output_dir: default ``<root>/dist``.
        include_model: pack the weights; without them (this needs ``model_url``), users fetch
            them with ``download_large_files`` (the hash is still taken from ``model``).

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
        docs / SCHEMA_NAME,
        root / "bundle" / "large_files.yml",
        root / "LICENSE",
    ]
    missing = [str(path) for path in required if not path.is_file()]
    if not model.is_file():
        missing.append(f"{model} (train a model first, or give --model PATH)")
    if missing:
        raise BundleError("cannot build the bundle archive, missing:\n  " + "\n  ".join(missing))
    if not include_model and not model_url:
        raise BundleError("a release without its weights needs --model-url: where users download models/model.pt")

    metadata = json.loads((configs / "metadata.json").read_text())
    problems = [f"configs/metadata.json: {p}" for p in metadata_problems(metadata)]
    description = check_model(model)
    config_files = sorted(configs.glob("*.json"))
    release_configs: dict[str, Path | str] = {}
    for path in config_files:
        config = json.loads(path.read_text())
        if path.name == "train.json":
            config = release_train_config(config, description, model)
            release_configs[path.name] = json.dumps(config, indent=4) + "\n"
        else:
            release_configs[path.name] = path
        if path.name != "metadata.json":
            problems += [f"configs/{path.name}: {p}" for p in config_path_problems(config)]
    if problems:
        raise BundleError("the bundle is not releasable:\n  " + "\n  ".join(problems))

    name, version = metadata["name"], metadata["version"]
    files: list[tuple[str, Path | str | bytes]] = [(f"configs/{n}", source) for n, source in release_configs.items()]
    files += [("configs/logging.conf", configs / "logging.conf")]
    files += [(f"docs/{p.relative_to(docs).as_posix()}", p) for p in sorted(docs.rglob("*")) if p.is_file()]
    files += [("LICENSE", root / "LICENSE")]
    files += [(f"samples/{n}", data) for n, data in sample_inputs(description.backbone.image_size).items()]
    if model_url:
        files += [("large_files.yml", large_files_config(root / "bundle" / "large_files.yml", model, model_url))]
    if include_model:
        files += [("models/model.pt", model)]

    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{name}_v{version}.zip"
    from medad.io.files import atomic_write  # only here: the rest needs no torch

    # Written beside the target and renamed: readers never see a half-written archive.
    with atomic_write(target, "wb") as handle, zipfile.ZipFile(handle, "w") as archive:
        for arcname, source in files:
            info = _zip_info(f"{name}/{arcname}")
            if isinstance(source, (str, bytes)):
                archive.writestr(info, source)
            else:
                with source.open("rb") as src, archive.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="detector weights to release (default: models/model.pt)")
    parser.add_argument(
        "--model-url", help="URL where this version's models/model.pt is published (large_files.yml); none: a local release"
    )
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
