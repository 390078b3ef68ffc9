"""The sidecar ``REPO/NAME/mededge.yaml``: what Triton's config does not say about a model.

Keys: ``task``, ``labels``, ``preprocess`` (a :class:`PreprocessSpec`), ``applicability``
(which DICOM series it applies to), ``thresholds``, ``postprocess``, ``provenance`` and
``versions`` (per version: file sha256s, precision, metrics by name, accuracy report).
A repository written for Triton alone has no sidecar; every reader must cope with that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge.core.durable import write_atomically
from edge.core.errors import RepositoryError
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec

SIDECAR_NAME = "mededge.yaml"


@dataclass(frozen=True)
class Applicability:
    """Which series a model applies to; an empty tuple means any."""

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    sop_class_uid: tuple[str, ...] = ()


@dataclass(frozen=True)
class VersionRecord:
    """What was recorded when a version was published."""

    files: Mapping[str, str]  # relative file name -> sha256 hex
    precision: str = "fp32"
    metrics: Mapping[str, float] = field(default_factory=dict)
    report: Mapping[str, Any] = field(default_factory=dict)
    published_at: str = ""


@dataclass(frozen=True)
class Sidecar:
    """A parsed ``mededge.yaml``."""

    task: Task
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    applicability: Applicability = Applicability()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    postprocess: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[int, VersionRecord] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.value,
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_dict(),
            "applicability": {k: list(v) for k, v in vars(self.applicability).items()},
            "thresholds": dict(self.thresholds),
            "postprocess": dict(self.postprocess),
            "provenance": dict(self.provenance),
            "versions": {
                int(v): {"files": dict(r.files), "precision": r.precision,
                         "metrics": dict(r.metrics), "report": dict(r.report),
                         "published_at": r.published_at}
                for v, r in sorted(self.versions.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = SIDECAR_NAME) -> Sidecar:
        """Validate a mapping read from YAML.

        Raises:
            RepositoryError: a key is missing or has the wrong type; the message names it.
        """
        try:
            versions = {
                int(v): VersionRecord(
                    files=dict(r.get("files", {})), precision=str(r.get("precision", "fp32")),
                    metrics={k: float(x) for k, x in (r.get("metrics") or {}).items()},
                    report=dict(r.get("report") or {}), published_at=str(r.get("published_at", "")))
                for v, r in (data.get("versions") or {}).items()
            }
            app = data.get("applicability") or {}
            return cls(
                task=Task(data["task"]),
                labels=tuple(str(x) for x in data.get("labels", ())),
                preprocess=PreprocessSpec.from_dict(data["preprocess"]),
                applicability=Applicability(**{k: tuple(v) for k, v in app.items()}),
                thresholds={k: float(x) for k, x in (data.get("thresholds") or {}).items()},
                postprocess=dict(data.get("postprocess") or {}),
                provenance=dict(data.get("provenance") or {}),
                versions=versions,
            )
        except KeyError as exc:
            raise RepositoryError(f"{source}: missing key {exc.args[0]!r}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise RepositoryError(f"{source}: {exc}") from exc


def read_sidecar(model_dir: Path) -> Sidecar | None:
    """Read ``model_dir/mededge.yaml``; None when the model has no sidecar (a Triton-only repo).

    Raises:
        RepositoryError: the file exists but is not valid YAML or not a valid sidecar.
    """
    path = model_dir / SIDECAR_NAME
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RepositoryError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}: top level must be a mapping")
    return Sidecar.from_dict(data, str(path))


def write_sidecar(model_dir: Path, sidecar: Sidecar) -> None:
    """Write ``model_dir/mededge.yaml`` atomically."""
    write_atomically(model_dir / SIDECAR_NAME, yaml.safe_dump(sidecar.to_dict(), sort_keys=False))
