"""Reading one model out of a Triton-layout repository, ready for a backend to open.

``REPO/NAME/config.pbtxt`` is required; ``REPO/NAME/mededge.yaml`` is optional (a repository
written for Triton alone has none). Hidden folders (publishing's staging folders) are ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from edge.core.errors import RepositoryError
from edge.core.types import ModelId
from edge.repository.model_config import (
    CONFIG_NAME,
    ModelConfig,
    parse_model_config_any,
    read_model_config,
)
from edge.repository.publish import existing_versions, sha256_file
from edge.repository.sidecar import SIDECAR_NAME, Sidecar, read_sidecar
from edge.repository.versions import select_versions

#: config ``platform``/``backend`` -> the file Triton looks for in a version folder.
DEFAULT_FILENAMES = {"onnxruntime_onnx": "model.onnx", "onnxruntime": "model.onnx",
                     "tensorrt_plan": "model.plan", "tensorrt": "model.plan"}


@dataclass(frozen=True)
class VersionSource:
    """One version folder: where its model file is and a fingerprint of its files."""

    model_id: ModelId
    directory: Path
    model_path: Path
    fingerprint: str


@dataclass(frozen=True)
class ModelSource:
    """A model's configuration and the versions its version policy selects.

    ``config`` is a protobuf message; treat it as read-only. ``missing`` lists versions the
    policy names that are not on disk.
    """

    name: str
    directory: Path
    config: ModelConfig
    platform: str
    sidecar: Sidecar | None
    versions: tuple[VersionSource, ...]
    missing: tuple[int, ...]
    config_fingerprint: str


def list_models(repo: Path) -> list[str]:
    """The model folders in ``repo`` (any non-hidden folder), sorted.

    Raises:
        RepositoryError: ``repo`` is not a readable folder.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"{repo}: model repository is not a folder")
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def _fingerprint_dir(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.relative_to(directory)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "-"


def model_fingerprint(repo: Path, name: str) -> str:
    """A cheap digest (config and sidecar bytes, version files' names, sizes, mtimes) that
    changes when anything a load reads changes; polling compares it."""
    model_dir = Path(repo) / name
    parts = [_file_digest(model_dir / CONFIG_NAME), _file_digest(model_dir / SIDECAR_NAME)]
    parts += [f"{v}={_fingerprint_dir(model_dir / str(v))}" for v in existing_versions(model_dir)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _platform(config: ModelConfig, model_dir: Path, versions: list[int]) -> str:
    if config.backend:
        return config.backend
    if config.platform:
        return config.platform
    for version in reversed(versions):
        for filename, platform in (("model.onnx", "onnxruntime"), ("model.plan", "tensorrt")):
            if (model_dir / str(version) / filename).exists():
                return platform
    raise RepositoryError(f"{model_dir / CONFIG_NAME}: platform/backend: not set and no "
                          "model.onnx or model.plan to infer it from")


def read_model(repo: Path, name: str, config_text: str | None = None) -> ModelSource:
    """Read ``repo/name``'s configuration and sidecar and select its versions.

    ``config_text`` (protobuf text or JSON) replaces config.pbtxt, as Triton's load API allows.

    Raises:
        RepositoryError: the folder, config or sidecar is missing or malformed; the message
            names the file and the field.
    """
    model_dir = Path(repo) / name
    if not model_dir.is_dir():
        raise RepositoryError(f"{model_dir}: no such model folder")
    config_path = model_dir / CONFIG_NAME
    if config_text is not None:
        config = parse_model_config_any(config_text, f"{config_path} (override)")
    else:
        config = read_model_config(model_dir)
    if config.name and config.name != name:
        raise RepositoryError(f"{config_path}: name: {config.name!r} does not match the folder "
                              f"name {name!r}")
    config.name = name
    if config.max_batch_size < 0:
        raise RepositoryError(f"{config_path}: max_batch_size: must be >= 0")
    for index, group in enumerate(config.instance_group):
        if group.count < 0:
            raise RepositoryError(f"{config_path}: instance_group[{index}].count: must be >= 0")
    sidecar = read_sidecar(model_dir)
    available = existing_versions(model_dir)
    platform = _platform(config, model_dir, available)
    filename = config.default_model_filename or DEFAULT_FILENAMES.get(platform, "model.onnx")
    selection = select_versions(config, available)
    versions = tuple(
        VersionSource(ModelId(name, v), model_dir / str(v), model_dir / str(v) / filename,
                      _fingerprint_dir(model_dir / str(v)))
        for v in selection.serve)
    return ModelSource(name=name, directory=model_dir, config=config, platform=platform,
                       sidecar=sidecar, versions=versions, missing=selection.missing,
                       config_fingerprint=hashlib.sha256(
                           config.SerializeToString(deterministic=True)).hexdigest())


def verify_version(version: VersionSource, sidecar: Sidecar | None) -> None:
    """Check the version's files against the sha256s publishing recorded in the sidecar.

    Nothing to check when there is no sidecar or it records nothing for this version.

    Raises:
        RepositoryError: a recorded file is missing or its sha256 differs; names the file.
    """
    if sidecar is None:
        return
    record = sidecar.versions.get(version.model_id.version)
    if record is None:
        return
    for rel, expected in sorted(record.files.items()):
        path = version.directory / rel
        if not path.is_file():
            raise RepositoryError(f"{path}: recorded in {SIDECAR_NAME} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise RepositoryError(f"{path}: sha256 {actual} does not match {expected} recorded "
                                  f"in {SIDECAR_NAME}; refusing to load a modified file")
