"""The ONNX Runtime backend on real models, and how its options come from config.pbtxt."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from model_factory import add_scale, conv_net

from edge.backends.base import BackendOptions
from edge.backends.onnxruntime_backend import OnnxRuntimeBackend, choose_providers
from edge.backends.registry import backend_options, open_backend
from edge.core.config import BackendSettings
from edge.core.errors import BackendError, InvalidInputError, RepositoryError
from edge.core.types import TensorSpec
from edge.repository.model_config import parse_model_config

CPU_ONLY = BackendOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)


def test_specs_exclude_the_batch_axis(tmp_path: Path) -> None:
    with OnnxRuntimeBackend(conv_net(tmp_path / "m.onnx"), CPU_ONLY) as backend:
        assert backend.inputs == (TensorSpec("image", "FP32", (1, 16, 16)),)
        assert backend.outputs == (TensorSpec("logits", "FP32", (3,)),)
        assert "CPUExecutionProvider" in backend.description
    unbatched = BackendOptions(providers=("CPUExecutionProvider",), batched=False)
    with OnnxRuntimeBackend(tmp_path / "m.onnx", unbatched) as backend:
        assert backend.inputs[0].shape == (-1, 1, 16, 16)


def test_infer_equals_a_direct_session_run(tmp_path: Path) -> None:
    path = conv_net(tmp_path / "m.onnx")
    x = np.random.default_rng(1).random((3, 1, 16, 16), dtype=np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]
    with OnnxRuntimeBackend(path, CPU_ONLY) as backend:
        got = backend.infer({"image": x})["logits"]
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        # A non-contiguous view is accepted (made contiguous once).
        wide = np.random.default_rng(2).random((3, 1, 16, 32), dtype=np.float32)[..., ::2]
        assert backend.infer({"image": wide})["logits"].shape == (3, 3)


def _thread_cpu_s(tids: set[str]) -> float:
    """CPU seconds (user + system) these threads of this process have used so far."""
    ticks = 0
    for tid in tids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def test_pool_threads_stop_spinning_when_a_run_returns(tmp_path: Path) -> None:
    """The intra-op pool may spin during a run, never after it: with ONNX Runtime's default
    its thread goes on spinning after each run (about 50 ms of CPU in the 200 ms below)."""
    two_threads = BackendOptions(providers=("CPUExecutionProvider",), intra_op_threads=2)
    x = np.random.default_rng(3).random((64, 1, 16, 16), dtype=np.float32)
    before_session = set(os.listdir("/proc/self/task"))
    with OnnxRuntimeBackend(conv_net(tmp_path / "m.onnx"), two_threads) as backend:
        pool = set(os.listdir("/proc/self/task")) - before_session
        assert pool, "a two-thread session starts a pool thread"
        for _ in range(5):
            backend.infer({"image": x})
        before = _thread_cpu_s(pool)
        time.sleep(0.2)
        idle_cpu = _thread_cpu_s(pool) - before
    assert idle_cpu < 0.02, f"the pool used {idle_cpu * 1000:.0f} ms of CPU while idle"


def test_inputs_are_checked_and_closed_backend_refuses(tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend(add_scale(tmp_path / "m.onnx", scale=3.0), CPU_ONLY)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(backend.infer({"INPUT0": x})["OUTPUT0"], 3 * x)
    with pytest.raises(InvalidInputError, match="missing"):
        backend.infer({})
    with pytest.raises(InvalidInputError, match="'INPUT0': dtype float64"):
        backend.infer({"INPUT0": x.astype(np.float64)})
    with pytest.raises(BackendError, match="onnxruntime"):
        backend.infer({"INPUT0": np.ones((2, 5), np.float32)})
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(BackendError, match="after close"):
        backend.infer({"INPUT0": x})


def test_unloadable_files_are_repository_errors(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="model file missing"):
        OnnxRuntimeBackend(tmp_path / "absent.onnx", CPU_ONLY)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(RepositoryError, match="not a loadable ONNX model"):
        OnnxRuntimeBackend(junk, CPU_ONLY)
    with pytest.raises(RepositoryError, match="no backend for platform 'pytorch_libtorch'"):
        open_backend("pytorch_libtorch", junk, CPU_ONLY)


def test_providers_are_the_requested_ones_that_exist() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider",
                             "CPUExecutionProvider"], available) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["TensorrtExecutionProvider"], available) == ["CPUExecutionProvider"]


def test_options_follow_settings_then_config_then_parameters() -> None:
    settings = BackendSettings(intra_op_threads=2, graph_optimization="basic")
    plain = backend_options(parse_model_config("max_batch_size: 4"), settings)
    assert plain.providers == settings.providers
    assert (plain.intra_op_threads, plain.graph_optimization, plain.batched) == (2, "basic", True)

    gpu_trt = backend_options(parse_model_config("""
        instance_group [ { kind: KIND_GPU } ]
        optimization { graph { level: -1 }
          execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"
            parameters { key: "precision_mode" value: "FP16" } } ] } }
        parameters { key: "intra_op_thread_count" value: { string_value: "3" } }
    """), BackendSettings(providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
    assert gpu_trt.providers[0] == "TensorrtExecutionProvider"
    assert gpu_trt.provider_options["TensorrtExecutionProvider"]["trt_fp16_enable"] == "True"
    assert (gpu_trt.graph_optimization, gpu_trt.intra_op_threads) == ("disable", 3)
    assert not gpu_trt.batched

    cpu_kind = backend_options(parse_model_config("""
        instance_group [ { count: 2 kind: KIND_CPU } ]
        optimization { execution_accelerators { gpu_execution_accelerator: [
          { name: "tensorrt" } ] } }
    """), BackendSettings())
    assert cpu_kind.providers == ("CPUExecutionProvider",)

    with pytest.raises(RepositoryError, match=r"parameters\['inter_op_thread_count'\]"):
        backend_options(parse_model_config(
            'parameters { key: "inter_op_thread_count" value: { string_value: "many" } }'),
            BackendSettings(), "m/config.pbtxt")
