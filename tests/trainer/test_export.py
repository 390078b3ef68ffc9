"""ONNX export, the parity check and its failure, external data, and the Triton config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge.core.errors import ExportError
from edge.repository.model_config import format_model_config, parse_model_config
from trainer.export import (
    EXTERNAL_DATA_FILE,
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    check_parity,
    export_onnx,
    triton_config,
)
from trainer.models import ModelSpec, build_model


class DiffersInExport(torch.nn.Module):
    """Adds 0.5 to its output only while being traced for ONNX: a broken export on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        if torch.onnx.is_in_onnx_export():
            y = y + 0.5
        return y


def _samples(n: int = 4, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, size, size), dtype=np.float32)


@pytest.mark.parametrize("task,classes", [("classify", 2), ("segment", 3)])
def test_export_has_named_io_dynamic_batch_and_parity(tmp_path: Path, task: str,
                                                      classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(task, classes, widths=(8, 16, 32, 64))).eval()
    files = export_onnx(model, _samples(), tmp_path)
    sess = ort.InferenceSession(str(files[ONNX_FILE]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 32, 32]
    report = check_parity(files[ONNX_FILE], model, _samples(5))
    assert report.max_abs_diff < 1e-4 and report.samples == 5
    import onnx

    assert onnx.load(str(files[ONNX_FILE])).opset_import[0].version >= 17


def test_parity_failure_raises_export_error(tmp_path: Path) -> None:
    model = DiffersInExport().eval()
    files = export_onnx(model, _samples(), tmp_path)
    with pytest.raises(ExportError, match="disagree"):
        check_parity(files[ONNX_FILE], model, _samples())


def test_zero_tolerance_catches_rounding_differences(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(ModelSpec("segment", 3, widths=(8, 16, 32, 64))).eval()
    files = export_onnx(model, _samples(), tmp_path)
    report = check_parity(files[ONNX_FILE], model, _samples())
    if report.max_abs_diff == 0.0:
        pytest.skip("ONNX Runtime happened to match torch bit for bit")
    with pytest.raises(ExportError):
        check_parity(files[ONNX_FILE], model, _samples(), atol=0.0, rtol=0.0)


def test_external_data_above_threshold(tmp_path: Path) -> None:
    model = build_model(ModelSpec("classify", 2, widths=(8, 16, 32, 64))).eval()
    files = export_onnx(model, _samples(), tmp_path, external_data_threshold=0)
    assert set(files) == {ONNX_FILE, EXTERNAL_DATA_FILE}
    assert files[EXTERNAL_DATA_FILE].stat().st_size > files[ONNX_FILE].stat().st_size
    check_parity(files[ONNX_FILE], model, _samples())  # ORT finds the data beside the graph


def test_opset_below_17_is_refused(tmp_path: Path) -> None:
    model = build_model(ModelSpec("classify", 2, widths=(8, 16, 32, 64)))
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, _samples(), tmp_path, opset=13)


def test_triton_config_round_trips() -> None:
    cfg = triton_config("lung_seg", (1, 96, 96), (3, 96, 96), max_batch_size=8)
    parsed = parse_model_config(format_model_config(cfg))
    assert parsed.platform == "onnxruntime_onnx" and parsed.max_batch_size == 8
    assert list(parsed.input[0].dims) == [1, 96, 96] and parsed.input[0].name == INPUT_NAME
    assert list(parsed.output[0].dims) == [3, 96, 96]
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]
    assert 0 < parsed.dynamic_batching.max_queue_delay_microseconds <= 1000
    assert parsed.instance_group[0].count == 1
