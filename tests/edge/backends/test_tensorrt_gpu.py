"""TensorRT on a real GPU: engine build, parity with ONNX Runtime, background build and swap.

Run with ``pytest -m gpu``; skipped (with the reason) where TensorRT, cuda-python or a GPU is
missing. The CPU-side checks of engine keys live in test_engine_manager.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from model_factory import conv_net

from edge.backends.base import BackendOptions
from edge.backends.engine_manager import (
    ENGINE_OPTIONS,
    choose_engine,
    default_profiles,
    probe_device,
    read_engine_key,
)

DEVICE, WHY = probe_device()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason=f"needs a GPU with TensorRT: {WHY}")]


def _build(version: Path, precision: str = "fp32") -> Path:
    from edge.backends.tensorrt_build import BuildSpec, build_engine

    onnx_path = version / "model.onnx"
    spec = BuildSpec(precision, default_profiles(onnx_path, 4), workspace_mb=256,
                     timing_cache=version.parent / "timing.cache")
    build_engine(onnx_path, spec, version / "model.plan", DEVICE)
    return version / "model.plan"


def test_build_writes_engine_and_key(tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    conv_net(version / "model.onnx")
    plan = _build(version)
    key = read_engine_key(plan)
    assert key is not None and key.gpu_name == DEVICE.gpu_name
    assert (tmp_path / "m" / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2)])
def test_engine_matches_onnxruntime(tmp_path: Path, precision: str, atol: float) -> None:
    from edge.backends.onnxruntime_backend import OnnxRuntimeBackend
    from edge.backends.tensorrt_backend import TensorRTBackend

    version = tmp_path / "m" / "1"
    conv_net(version / "model.onnx")
    plan = _build(version, precision)
    x = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    with OnnxRuntimeBackend(version / "model.onnx") as ort, TensorRTBackend(plan) as trt:
        ref = ort.infer({"image": x})["logits"]
        for batch in (1, 3, 4):
            xb = np.concatenate([x, x])[:batch]
            got = trt.infer({"image": xb})["logits"]
            np.testing.assert_allclose(got, np.concatenate([ref, ref])[:batch], atol=atol,
                                       rtol=atol)


def test_background_build_then_swap(tmp_path: Path) -> None:
    from edge.core.config import load_settings
    from edge.scheduler.manager import ModelManager

    repo = tmp_path / "repo"
    conv_net(repo / "cls" / "1" / "model.onnx")
    (repo / "cls" / "config.pbtxt").write_text(
        'name: "cls"\nplatform: "tensorrt_plan"\nmax_batch_size: 4\n'
        'parameters { key: "tensorrt_precision" value: { string_value: "fp32" } }\n')
    settings = load_settings(overrides={"server": {"model_repository": str(repo)},
                                        "repository": {"poll_interval_s": 0}}, environ={})
    manager = ModelManager(settings)
    manager.start()
    try:
        assert "ONNX Runtime fallback" in manager.get("cls").backend_description
        deadline = time.monotonic() + 300
        while "tensorrt" not in manager.get("cls").backend_description:
            assert time.monotonic() < deadline, "engine was not swapped in within 5 minutes"
            time.sleep(1)
        options = BackendOptions(provider_options={ENGINE_OPTIONS: {
            "precision": "fp32", "config_max_batch": "4"}})
        assert choose_engine(repo / "cls" / "1" / "model.onnx", options).plan is not None
    finally:
        manager.close(5)
