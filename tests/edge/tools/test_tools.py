"""``mededge infer``, ``mededge models`` and ``mededge config check`` end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge.cli import main

SEG_CONFIG = """name: "seg"
platform: "onnxruntime_onnx"
max_batch_size: 4
input { name: "image" data_type: TYPE_FP32 dims: [1, 8, 8] }
output { name: "mask" data_type: TYPE_FP32 dims: [1, 8, 8] }
"""
SEG_SIDECAR = """task: segment
labels: [background, lung]
preprocess: {height: 8, width: 8, window_center: 0.0, window_width: 200.0}
versions:
  1: {files: {}, precision: fp32, metrics: {dice: 0.91}}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 1, 8, 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["mask"])], "seg",
                              [image], [mask])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "seg" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "seg" / "1" / "model.onnx"))
    (root / "seg" / "config.pbtxt").write_text(SEG_CONFIG)
    (root / "seg" / "mededge.yaml").write_text(SEG_SIDECAR)
    return root


@pytest.fixture(scope="module")
def url(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from edge.api.server import EdgeServer
    from edge.core.config import load_settings

    settings = load_settings(None, {
        "server": {"bind": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                   "model_repository": str(repo),
                   "data_dir": str(tmp_path_factory.mktemp("data"))},
        "backend": {"providers": ["CPUExecutionProvider"]}}, environ={})
    server = EdgeServer(settings)
    server.start()
    yield f"127.0.0.1:{server.ports.grpc}"
    server.stop(5.0)


def test_infer_npy_prints_mask_stats(url: str, tmp_path: Path, capsys) -> None:
    array = np.full((1, 8, 8), -1.0, np.float32)
    array[0, :2, :] = 1.0  # 16 of 64 pixels above threshold after the sigmoid
    np.save(tmp_path / "x.npy", array)
    assert main(["infer", "--url", url, "--model", "seg", str(tmp_path / "x.npy")]) == 0
    out = capsys.readouterr().out
    assert "lung: 16 px (25.0%)" in out
    assert "background: 48 px" in out


def test_infer_dicom_uses_the_served_sidecar(url: str, tmp_path: Path, capsys) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    pixels = np.full((8, 8), 0, np.uint16)  # -1024 HU: air, below the window
    pixels[:4] = 2048  # +1024 HU: above the window
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert main(["infer", "--url", url, "--model", "seg", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lung: 32 px (50.0%)" in out


def test_infer_unknown_model_fails_with_the_code(url: str, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), np.float32))
    assert main(["infer", "--url", url, "--model", "nope", str(tmp_path / "x.npy")]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_models_lists_versions_and_metrics(repo: Path, capsys) -> None:
    assert main(["models", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "seg:1  onnxruntime_onnx  segment  fp32  dice=0.91" in out


def test_config_check_prints_effective_settings(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("server:\n  grpc_port: 9001\n")
    assert main(["config", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "grpc_port: 9001" in out and "http_port: 8002" in out


def test_config_check_names_the_bad_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpc:\n  max_message_bytes: 10\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "grpc.max_message_bytes" in capsys.readouterr().err


def test_infer_reads_only_the_answer_output_as_the_task() -> None:
    """A classifier's CAM output is summarised, not read as 65,536 class probabilities."""
    from edge.tools.infer_command import describe

    sidecar = {"task": "classify", "labels": ["no_nodule", "nodule"],
               "postprocess": {"output": "logits", "cam": "cam"}}
    answer = describe(np.array([[0.0, 2.0]], np.float32), sidecar, "logits")
    assert "nodule: 0.8808" in answer
    cam = describe(np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 1, 8, 8), sidecar, "cam")
    assert cam.strip().startswith("shape [1, 1, 8, 8]") and "class" not in cam
