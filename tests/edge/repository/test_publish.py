"""Atomic publishing of model versions and the sidecar that records them."""

import os
from pathlib import Path

import pytest

from edge.core.errors import RepositoryError
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec
from edge.repository.model_config import ModelConfig, read_model_config
from edge.repository.publish import existing_versions, publish_version, sha256_file
from edge.repository.sidecar import Sidecar, read_sidecar


def _sidecar() -> Sidecar:
    return Sidecar(task=Task.CLASSIFY, labels=("absent", "present"),
                   preprocess=PreprocessSpec(height=8, width=8, window_center=-600,
                                             window_width=1500),
                   provenance={"git_commit": "abc"})


def _config() -> ModelConfig:
    cfg = ModelConfig(platform="onnxruntime_onnx", max_batch_size=4)
    cfg.input.add(name="image", data_type=11, dims=[1, 8, 8])
    return cfg


def test_versions_are_numbered_and_recorded(tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"first")
    v1 = publish_version(tmp_path / "repo", "cls", {"model.onnx": artifact}, _config(),
                         _sidecar(), metrics={"auc": 0.97})
    artifact.write_bytes(b"second")
    v2 = publish_version(tmp_path / "repo", "cls", {"model.onnx": artifact}, _config(),
                         _sidecar(), precision="int8")
    model_dir = tmp_path / "repo" / "cls"
    assert (v1, v2) == (1, 2)
    assert existing_versions(model_dir) == [1, 2]
    sidecar = read_sidecar(model_dir)
    assert sidecar is not None and sidecar.versions[1].metrics == {"auc": 0.97}
    assert sidecar.versions[2].precision == "int8"
    assert sidecar.versions[2].files["model.onnx"] == sha256_file(model_dir / "2" / "model.onnx")
    assert sidecar.preprocess.window_center == -600
    config = read_model_config(model_dir)
    assert config.name == "cls" and config.max_batch_size == 4


def test_failed_publish_leaves_nothing_visible(tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"x")
    # the first artifact is staged, the second is missing: the publish fails half-way
    with pytest.raises(RepositoryError, match="does not exist"):
        publish_version(tmp_path / "repo", "cls",
                        {"model.onnx": artifact, "extra.bin": tmp_path / "missing.bin"},
                        _config(), _sidecar())
    model_dir = tmp_path / "repo" / "cls"
    assert existing_versions(model_dir) == []
    assert read_sidecar(model_dir) is None
    assert not [p for p in os.listdir(model_dir) if p.startswith(".staging-")]


def test_bad_names_and_missing_artifacts(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="plain folder name"):
        publish_version(tmp_path, "../evil", {}, _config(), _sidecar())
    with pytest.raises(RepositoryError, match="does not exist"):
        publish_version(tmp_path, "cls", {"model.onnx": tmp_path / "nope"}, _config(), _sidecar())


def test_existing_version_is_refused(tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"x")
    publish_version(tmp_path, "cls", {"model.onnx": artifact}, _config(), _sidecar())
    with pytest.raises(RepositoryError, match="already exists"):
        publish_version(tmp_path, "cls", {"model.onnx": artifact}, _config(), _sidecar(),
                        version=1)


def test_malformed_sidecar_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "mededge.yaml").write_text("labels: [a]\n")
    with pytest.raises(RepositoryError, match="missing key 'task'"):
        read_sidecar(tmp_path)
