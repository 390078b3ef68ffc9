"""Publishing a new model version atomically.

Order of operations, so that a reader never sees half a version:
1. copy the artifacts into ``NAME/.staging-<random>/`` and fsync each file;
2. write config.pbtxt and the sidecar (with the new version's sha256s) atomically;
3. rename the staging folder to ``NAME/<version>/`` and fsync ``NAME/``.
A sidecar entry whose folder does not exist yet is ignored by readers, so step 2 before step 3
is safe; a crash before step 3 leaves only a hidden staging folder that the next publish removes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge.core.durable import fsync_dir, write_atomically
from edge.core.errors import RepositoryError
from edge.repository.model_config import CONFIG_NAME, ModelConfig, format_model_config
from edge.repository.sidecar import (
    Sidecar,
    VersionRecord,
    read_sidecar,
    write_sidecar,
)

STAGING_PREFIX = ".staging-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def existing_versions(model_dir: Path) -> list[int]:
    """The published version numbers under ``model_dir``, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def publish_version(repo: Path, name: str, artifacts: Mapping[str, Path], config: ModelConfig,
                    sidecar: Sidecar, *, precision: str = "fp32",
                    metrics: Mapping[str, float] | None = None,
                    report: Mapping[str, Any] | None = None,
                    version: int | None = None) -> int:
    """Publish ``artifacts`` (file name in the version folder -> source file) as a new version.

    ``sidecar`` carries the model-level fields (task, labels, preprocessing, provenance); its
    ``versions`` are merged with what the repository already records. Returns the version number.

    Raises:
        RepositoryError: the name is not a plain folder name, an artifact is missing, or the
            requested version already exists.
    """
    if not name or "/" in name or name.startswith("."):
        raise RepositoryError(f"model name {name!r} is not a plain folder name")
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in model_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    taken = existing_versions(model_dir)
    number = version if version is not None else (taken[-1] + 1 if taken else 1)
    if number in taken:
        raise RepositoryError(f"{model_dir}/{number}: version already exists")

    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
    try:
        hashes: dict[str, str] = {}
        for rel, source in artifacts.items():
            if not Path(source).is_file():
                raise RepositoryError(f"artifact {rel!r}: {source} does not exist")
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
            hashes[rel] = sha256_file(target)
        fsync_dir(staging)

        previous = read_sidecar(model_dir)
        versions = dict(previous.versions) if previous else {}
        versions[number] = VersionRecord(
            files=hashes, precision=precision, metrics=dict(metrics or {}),
            report=dict(report or {}),
            published_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        config_copy = ModelConfig()
        config_copy.CopyFrom(config)
        config_copy.name = name
        write_atomically(model_dir / CONFIG_NAME, format_model_config(config_copy))
        write_sidecar(model_dir, replace(sidecar, versions=versions))

        os.rename(staging, model_dir / str(number))
        fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return number
