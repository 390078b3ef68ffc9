"""``mededge convert`` end to end: publish with manifest and gate report, refuse a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.cli import main
from edge.repository.loader import read_model, verify_version
from edge.repository.publish import existing_versions, sha256_file
from edge.repository.sidecar import read_sidecar
from edge.tools.models_command import describe_repository


def _convert(repo: Path, *extra: str) -> int:
    return main(["convert", "--repo", str(repo), *extra])


def test_int8_is_published_with_manifest_and_gate(repo: Path, trained: dict[str, Path]) -> None:
    rc = _convert(repo, "--model", "segmenter", "--to", "int8", "--data",
                  str(trained["heldout"]), "--calibration-data", str(trained["calibration"]),
                  "--samples", "48")
    assert rc == 0
    model_dir = repo / "segmenter"
    assert existing_versions(model_dir) == [1, 2]
    record = read_sidecar(model_dir).versions[2]
    assert record.precision == "int8"
    conversion, gate = record.report["conversion"], record.report["gate"]
    assert conversion["source_version"] == 1
    assert conversion["source_onnx_sha256"] == sha256_file(model_dir / "1" / "model.onnx")
    assert conversion["calibration_data_fingerprint"].startswith("sha256:")
    assert conversion["details"]["calibration_samples"] == 48
    assert gate["passed"] and gate["metric"] == "dice_mean" and gate["drop"] <= 0.01
    assert record.metrics["dice_mean"] == pytest.approx(gate["candidate"])
    source = read_model(repo, "segmenter")
    verify_version(source.versions[-1], source.sidecar)  # sha256 recorded and correct
    lines = describe_repository(repo)
    assert any(line.strip().startswith("gate passed (from v1): dice_mean") for line in lines)


def test_failed_gate_exits_1_and_publishes_nothing(repo: Path, trained: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = _convert(repo, "--model", "classifier", "--to", "int8", "--data",
                  str(trained["heldout"]), "--calibration-data", str(trained["constant"]))
    assert rc == 1
    err = capsys.readouterr().err
    assert "accuracy gate FAILED" in err and "drop +0." in err and "nothing was published" in err
    assert existing_versions(repo / "classifier") == [1]
    assert set(read_sidecar(repo / "classifier").versions) == {1}


def test_chained_conversion_is_gated_against_the_fp32_ancestor(
        repo: Path, trained: dict[str, Path]) -> None:
    assert _convert(repo, "--model", "classifier", "--to", "fp16",
                    "--data", str(trained["heldout"])) == 0
    assert _convert(repo, "--model", "classifier", "--to", "onnx-opt", "--version", "2",
                    "--data", str(trained["heldout"])) == 0
    sidecar = read_sidecar(repo / "classifier")
    assert sidecar.versions[3].report["conversion"]["source_version"] == 2
    assert sidecar.versions[3].report["gate"]["reference"] == pytest.approx(
        sidecar.versions[2].report["gate"]["reference"]), "reference must stay the FP32 v1"


def test_tensorrt_without_gpu_says_why(repo: Path, trained: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from edge.backends.engine_manager import probe_device

    device, _ = probe_device()
    if device is not None:
        pytest.skip("this machine has TensorRT and a GPU; see test_tensorrt_gpu.py")
    rc = _convert(repo, "--model", "classifier", "--to", "tensorrt",
                  "--data", str(trained["heldout"]))
    assert rc == 2
    assert "cannot build a TensorRT engine on this machine" in capsys.readouterr().err
    assert existing_versions(repo / "classifier") == [1]
