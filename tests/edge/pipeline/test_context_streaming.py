"""A 2.5D classifier (``context_slices: 1``) on the DICOM path: a synthetic CT series sent over
a real association, out of order, to an in-process server; every slice's stored output equals
the model run offline on that slice stacked with its neighbours along the normal (ends
replicated), computed here from the files with the shared preprocessing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pydicom
import pytest
from onnx import TensorProto, helper, numpy_helper
from pynetdicom import AE

from edge.api.server import EdgeServer
from edge.cli import main as cli
from edge.core.config import load_settings
from edge.core.types import ModelId, Task
from edge.jobs import queries
from edge.jobs.ledger import RunState, SeriesState
from edge.preprocess.context import stack_context
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import PreprocessSpec, preprocess_image
from edge.preprocess.volume import frame_geometries, slice_order
from edge.repository.model_config import parse_model_config
from edge.repository.publish import publish_version
from edge.repository.sidecar import Sidecar

SIZE = 32
SPEC = PreprocessSpec(height=SIZE, width=SIZE, window_center=-600.0, window_width=1500.0,
                      context_slices=1)
#: two neighbours each side, at 2.3 mm steps along the normal: interpolated between slices
SPEC_MM = replace(SPEC, context_slices=2, context_spacing_mm=2.3)
MODEL = ModelId("ctx_cls", 1)
CONFIG = """
name: "ctx_cls"
platform: "onnxruntime_onnx"
max_batch_size: 8
input {{ name: "image" data_type: TYPE_FP32 dims: [{channels}, {SIZE}, {SIZE}] }}
output {{ name: "logits" data_type: TYPE_FP32 dims: [2] }}
output {{ name: "cam" data_type: TYPE_FP32 dims: [1, {SIZE}, {SIZE}] }}
instance_group {{ count: 1 kind: KIND_CPU }}
"""


def context_model(path: Path, channels: int) -> Path:
    """logits = (per-channel mean) @ W + b, W different per channel: a wrong neighbour or
    channel order changes the output; the bias makes every slice positive, so the series
    gets a CAM (here the centre channel: any stacked input gives one)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, SIZE, SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    weights = np.array([[1.0, -2.0], [3.0, 0.5], [-5.0, 7.0], [2.0, 4.0], [-1.0, -3.0]],
                       np.float32)[:channels]
    inits = [numpy_helper.from_array(weights, "w"),
             numpy_helper.from_array(np.array([-20.0, 20.0], np.float32), "b"),
             numpy_helper.from_array(np.array([channels // 2], np.int64), "mid"),
             numpy_helper.from_array(np.array([channels // 2 + 1], np.int64), "end"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["m"]),
             helper.make_node("Flatten", ["m"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"]),
             helper.make_node("Slice", ["image", "mid", "end", "one"], ["centre"]),
             helper.make_node("Sigmoid", ["centre"], ["cam"])]
    model = helper.make_model(helper.make_graph(nodes, "ctx_cls", [x], [y, cam], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("spec", [SPEC, SPEC_MM], ids=["k1-slices", "k2-2.3mm"])
def test_context_model_streams_and_matches_offline_stacking(spec: PreprocessSpec,
                                                             tmp_path: Path) -> None:
    assert cli(["synth", "--out", str(tmp_path / "data"), "--studies", "1", "--seed", "3",
                "--size", "64", "--slices-min", "9", "--slices-max", "9",
                "--compressed-fraction", "0", "--quiet"]) == 0
    ct = json.loads((tmp_path / "data" / "manifest.json").read_text())["studies"][0]["ct"]
    files = [tmp_path / "data" / ct["dir"] / f for f in ct["files"]]
    onnx_path = context_model(tmp_path / "ctx.onnx", spec.channels)
    config = CONFIG.format(channels=spec.channels, SIZE=SIZE)
    publish_version(tmp_path / "repo", MODEL.name, {"model.onnx": onnx_path},
                    parse_model_config(config), Sidecar(
                        task=Task.CLASSIFY, labels=("no_nodule", "nodule"), preprocess=spec,
                        thresholds={"nodule": 0.5},
                        postprocess={"activation": "softmax", "output": "logits",
                                     "cam": "cam"}))
    settings = load_settings(None, {
        "server": {"model_repository": str(tmp_path / "repo"), "data_dir": str(tmp_path / "srv"),
                   "bind": "127.0.0.1", "grpc_port": 0, "http_port": 0},
        "dicom": {"port": 0}, "spool": {"min_free_bytes": 0},
        # no CAM here: the ledger's results table does not accept CAM objects yet
        "pipeline": {"quiet_period_s": 0.2, "workers": 2, "cam_output": "none"}}, environ={})
    datasets = [pydicom.dcmread(f) for f in files]
    series = str(datasets[0].SeriesInstanceUID)
    with EdgeServer(settings, dicom=True) as server:
        assert server.ports is not None
        ae = AE(ae_title="CT1")
        for ds in datasets[:1]:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", server.ports.dicom, ae_title="MEDEDGE")
        assert assoc.is_established
        for i in (4, 0, 8, 2, 3, 7, 1, 6, 5):  # out of order: neighbours arrive late
            status = assoc.send_c_store(datasets[i])
            assert status.Status == 0x0000, f"C-STORE of slice {i}: {status}"
        assoc.release()
        assert server.orchestrator.wait_idle(60), "series not finished in time"
        store = server.orchestrator.store
        stored = {str(ds.SOPInstanceUID): store.load(series, MODEL, str(ds.SOPInstanceUID), 1)
                  for ds in datasets}
        srs = list((tmp_path / "srv" / "results" / series).glob("*/sr-ctx_cls-v1.dcm"))
        state = queries.series(server.ledger, series).state
        failed = [r for r in queries.series_runs(server.ledger, series)
                  if r.state is RunState.FAILED]
    # offline: preprocess every file, order along the normal, stack, run the same ONNX file
    frames = [frame_geometries(ds)[0] for ds in datasets]
    order, _, distances = slice_order(frames)
    slices = []
    for i in order:
        decoded = decode(datasets[i], str(datasets[i].SOPInstanceUID))
        slices.append(preprocess_image(decoded.frames[0], decoded.meta, spec))
    stacked = stack_context(slices, spec.context_slices, distances=distances,
                            spacing_mm=spec.context_spacing_mm)
    expected = ort.InferenceSession(str(onnx_path)).run(["logits"], {"image": stacked})[0]
    for row, i in enumerate(order):
        uid = str(datasets[i].SOPInstanceUID)
        assert stored[uid] is not None, f"slice {row} ({uid}) has no output"
        np.testing.assert_allclose(stored[uid], expected[row], rtol=1e-5, atol=1e-5,
                                   err_msg=f"slice {row} of the volume")
    single = ort.InferenceSession(str(onnx_path)).run(
        ["logits"], {"image": np.repeat(np.stack(slices), spec.channels, axis=1)})[0]
    assert not np.allclose(single, expected, atol=1e-3)  # the test would see a wrong stack
    assert len(srs) == 1, "the classifier's SR was not written"
    assert state is SeriesState.DONE and failed == [], f"series {state}: {failed}"
