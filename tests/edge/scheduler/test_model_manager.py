"""ModelManager on real repositories: Triton-only repos, failures, hot reload, polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from model_factory import add_scale_config, conv_net, write_add_scale_repo, write_version

from edge.core.config import load_settings
from edge.core.errors import ModelNotFoundError, ModelNotReadyError, RepositoryError
from edge.core.types import InferenceRequest
from edge.scheduler.manager import ModelManager, ModelState

# A config as written for Triton: warm-up, TensorRT accelerator (ignored on KIND_CPU),
# two CPU instances, preferred batch sizes.
TRITON_CONFIG = """
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 1, 16, 16 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
model_warmup [ { name: "random" batch_size: 2
  inputs { key: "image" value: { data_type: TYPE_FP32 dims: [ 1, 16, 16 ] random_data: true } }
} ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def _manager(repo: Path, **repository: object) -> ModelManager:
    settings = load_settings(environ={}, overrides={
        "server": {"model_repository": str(repo), "drain_timeout_s": 10},
        "repository": dict(repository)})
    manager = ModelManager(settings)
    manager.start()
    return manager


def _add(manager: ModelManager, value: float, version: int | None = None) -> np.ndarray:
    x = np.full((1, 4), value, np.float32)
    future = manager.get("add", version).submit(InferenceRequest("add", {"INPUT0": x}))
    return future.result(timeout=10).outputs["OUTPUT0"]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_triton_only_repository_loads_and_serves(tmp_path: Path) -> None:
    path = conv_net(tmp_path / "classifier" / "1" / "model.onnx")
    (tmp_path / "classifier" / "config.pbtxt").write_text(TRITON_CONFIG)
    manager = _manager(tmp_path)
    try:
        assert manager.ready()
        model = manager.get("classifier")
        assert (model.id.version, model.max_batch_size, model.sidecar) == (1, 8, None)
        assert "CPUExecutionProvider" in model.backend_description
        x = np.random.default_rng(3).random((3, 1, 16, 16), dtype=np.float32)
        got = model.submit(InferenceRequest("classifier", {"image": x})).result(timeout=10)
        expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"image": x})[0]
        np.testing.assert_allclose(got.outputs["logits"], expected, rtol=1e-5)
    finally:
        manager.close(5)


def test_config_without_inputs_is_completed_from_the_model(tmp_path: Path) -> None:
    conv_net(tmp_path / "auto" / "1" / "model.onnx")
    (tmp_path / "auto" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    manager = _manager(tmp_path)
    try:
        model = manager.get("auto")
        assert model.max_batch_size == 4 and model.config.HasField("dynamic_batching")
        assert [(i.name, list(i.dims)) for i in model.config.input] == [("image", [1, 16, 16])]
        x = np.zeros((4, 1, 16, 16), np.float32)
        assert model.submit(InferenceRequest("auto", {"image": x})).result(10).outputs[
            "logits"].shape == (4, 3)
    finally:
        manager.close(5)


def test_a_broken_model_is_unavailable_with_its_reason_and_others_serve(tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add")
    write_version(tmp_path, "broken", 1)
    (tmp_path / "broken" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 4\n'
        'input [ { name: "WRONG" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    manager = _manager(tmp_path)
    try:
        np.testing.assert_array_equal(_add(manager, 1.0), np.full((1, 4), 3.0))
        states = {(e.name, e.version): e for e in manager.index()}
        assert states[("add", 1)].state is ModelState.READY
        broken = states[("broken", 1)]
        assert broken.state is ModelState.UNAVAILABLE
        assert "input[0].name: 'WRONG' is not a model input" in broken.reason
        with pytest.raises(ModelNotReadyError, match="WRONG"):
            manager.get("broken")
        with pytest.raises(ModelNotFoundError):
            manager.get("nothing")
        with pytest.raises(ModelNotFoundError):
            manager.get("add", 9)
        assert not manager.ready()  # strict readiness, as Triton
    finally:
        manager.close(5)
    lenient = _manager(tmp_path, strict_readiness=False)
    try:
        assert lenient.ready()
    finally:
        lenient.close(5)


def test_hot_reload_under_load_fails_no_request(tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add", config=add_scale_config(
        "add", 8, instances=2, extra="dynamic_batching { }"))
    manager = _manager(tmp_path)
    failures: list[BaseException] = []
    offsets: set[float] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                out = _add(manager, 0.0)
                offsets.add(float(out[0, 0]))
            except BaseException as exc:  # the test counts every failure
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        first = manager.get("add")
        write_version(tmp_path, "add", 2, offset=2.0)
        manager.load("add")  # new version loads and warms while version 1 serves
        assert manager.get("add").id.version == 2
        time.sleep(0.2)
        (tmp_path / "add" / "config.pbtxt").write_text(add_scale_config(
            "add", 4, instances=1, extra="dynamic_batching { max_queue_delay_microseconds: 50 }"))
        manager.load("add")  # same version, new config: replaced in place
        assert manager.get("add").max_batch_size == 4
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        manager.close(5)
    assert failures == []
    assert offsets == {1.0, 2.0}
    assert first.statistics().inference_count > 0
    with pytest.raises(ModelNotReadyError):  # the replaced version is closed
        first.submit(InferenceRequest("add", {"INPUT0": np.zeros((1, 4), np.float32)},
                                      version=1))


def test_unload_load_and_config_override(tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add", versions=(1, 2))
    manager = _manager(tmp_path)
    try:
        manager.unload("add")
        assert not manager.is_ready("add")
        with pytest.raises(ModelNotReadyError, match="unloaded"):
            manager.get("add")
        manager.load("add", config_text=add_scale_config(
            "add", extra="version_policy: { all { } }"))
        assert manager.is_ready("add", 1) and manager.is_ready("add", 2)
        np.testing.assert_array_equal(_add(manager, 0.0, version=1), np.full((1, 4), 1.0))
        with pytest.raises(RepositoryError, match="max_batch_size"):
            manager.load("add", config_text='max_batch_size: "x"')
        assert manager.is_ready("add", 2)  # a failed reload leaves the served versions alone
        with pytest.raises(ModelNotFoundError):
            manager.unload("never")
    finally:
        manager.close(5)


def test_modified_file_is_refused_by_sha256(tmp_path: Path) -> None:
    from model_factory import add_scale

    from edge.core.types import Task
    from edge.preprocess.imaging import PreprocessSpec
    from edge.repository.model_config import parse_model_config
    from edge.repository.publish import publish_version
    from edge.repository.sidecar import Sidecar

    sidecar = Sidecar(task=Task.CLASSIFY, labels=("a",),
                      preprocess=PreprocessSpec(height=4, width=4))
    publish_version(tmp_path, "add", {"model.onnx": add_scale(tmp_path / "src.onnx")},
                    parse_model_config(add_scale_config("add")), sidecar)
    (tmp_path / "add" / "1" / "model.onnx").write_bytes(
        add_scale(tmp_path / "other.onnx", scale=5.0).read_bytes())
    manager = _manager(tmp_path)
    try:
        entry = next(e for e in manager.index() if e.name == "add")
        assert entry.state is ModelState.UNAVAILABLE and "sha256" in entry.reason
    finally:
        manager.close(5)


def test_poll_mode_picks_up_new_versions_and_removed_models(tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add")
    write_add_scale_repo(tmp_path, "other")
    manager = _manager(tmp_path, poll_interval_s=0.05)
    try:
        assert manager.get("add").id.version == 1
        write_version(tmp_path, "add", 2, offset=2.0)
        _wait_for(lambda: manager.is_ready("add", 2))
        np.testing.assert_array_equal(_add(manager, 0.0), np.full((1, 4), 2.0))
        assert not manager.is_ready("add", 1)  # latest-1 policy: version 1 retired
        for path in sorted((tmp_path / "other").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (tmp_path / "other").rmdir()
        _wait_for(lambda: not manager.is_ready("other"))
    finally:
        manager.close(5)
