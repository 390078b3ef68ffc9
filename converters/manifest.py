"""Every converter output becomes a new version, published atomically with a manifest.

The manifest goes into the version record's ``report`` (``report.conversion``) beside the gate's
verdict (``report.gate``): source version and source ONNX sha256, precision, the step's own
details, the calibration data fingerprint, tool versions, and for engines the TensorRT
version, GPU, compute capability, SM count and profiles.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.core.errors import RepositoryError
from edge.repository.model_config import ModelConfig, read_model_config
from edge.repository.publish import existing_versions, publish_version, sha256_file
from edge.repository.sidecar import Sidecar, read_sidecar

ONNX_FILE, PLAN_FILE = "model.onnx", "model.plan"


@dataclass(frozen=True)
class SourceVersion:
    """The published version a conversion starts from."""

    repo: Path
    name: str
    version: int
    onnx_path: Path
    onnx_sha256: str
    precision: str
    config: ModelConfig
    sidecar: Sidecar


def resolve_source(repo: Path, name: str, version: int | None = None) -> SourceVersion:
    """The ``version`` (default: the newest) of ``name`` that has a ``model.onnx``.

    Raises:
        RepositoryError: no such model or version, no model.onnx, or no sidecar (the task and
            preprocessing the gate needs are recorded there).
    """
    model_dir = Path(repo) / name
    config = read_model_config(model_dir)
    sidecar = read_sidecar(model_dir)
    if sidecar is None:
        raise RepositoryError(f"{model_dir}: no mededge.yaml; the task and preprocessing needed "
                              "for calibration and the accuracy gate are unknown")
    versions = existing_versions(model_dir)
    if version is None:
        with_onnx = [v for v in versions if (model_dir / str(v) / ONNX_FILE).is_file()]
        if not with_onnx:
            raise RepositoryError(f"{model_dir}: no version has a {ONNX_FILE}")
        version = with_onnx[-1]
    onnx_path = model_dir / str(version) / ONNX_FILE
    if version not in versions or not onnx_path.is_file():
        raise RepositoryError(f"{onnx_path}: no such published ONNX model")
    record = sidecar.versions.get(version)
    digest = sha256_file(onnx_path)
    if record is not None and record.files.get(ONNX_FILE, digest) != digest:
        raise RepositoryError(f"{onnx_path}: sha256 differs from mededge.yaml; refusing to "
                              "convert a modified file")
    return SourceVersion(Path(repo), name, version, onnx_path, digest,
                         record.precision if record else "fp32", config, sidecar)


def conversion_manifest(source: SourceVersion, *, target: str, precision: str,
                        details: Mapping[str, Any] | None = None,
                        calibration_fingerprint: str | None = None,
                        engine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of one conversion step (plain data, for the sidecar's YAML)."""
    import onnx
    import onnxruntime

    out: dict[str, Any] = {
        "target": target, "source_version": source.version,
        "source_onnx_sha256": source.onnx_sha256, "source_precision": source.precision,
        "precision": precision, "details": dict(details or {}),
        "tools": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                  "python": platform.python_version()},
        "converted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if calibration_fingerprint is not None:
        out["calibration_data_fingerprint"] = calibration_fingerprint
    if engine is not None:
        out["engine"] = dict(engine)
    return out


def publish_converted(source: SourceVersion, files: Mapping[str, Path], *, precision: str,
                      metrics: Mapping[str, float], report: Mapping[str, Any],
                      platform_name: str | None = None) -> int:
    """Publish ``files`` as the next version of the source model; returns its number.

    ``platform_name`` (``tensorrt_plan`` for engines) replaces the config's platform and its
    default file name; ONNX outputs keep the source's config.

    Raises:
        RepositoryError: publishing failed.
    """
    config = ModelConfig()
    config.CopyFrom(source.config)
    if platform_name is not None:
        config.platform = platform_name
        config.ClearField("backend")
        config.default_model_filename = PLAN_FILE if platform_name == "tensorrt_plan" \
            else ONNX_FILE
    return publish_version(source.repo, source.name, files, config, source.sidecar,
                           precision=precision, metrics=metrics, report=report)
