"""Engines are chosen by key, never by file name; a mismatched engine is refused before any
TensorRT import and ONNX Runtime serves the version instead. Real ONNX Runtime, real files; the
"GPU" below is a DeviceInfo handed to the engine manager, as a probe on such a machine returns.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from model_factory import add_scale_config, conv_net, write_add_scale_repo

from edge.backends.base import BackendOptions
from edge.backends.engine_manager import (
    CACHE_DIR,
    ENGINE_OPTIONS,
    DeviceInfo,
    EngineBuilds,
    EngineKey,
    choose_engine,
    default_profiles,
    open_engine_or_fallback,
    sha256_of,
    write_engine_manifest,
)
from edge.backends.onnxruntime_backend import OnnxRuntimeBackend
from edge.backends.registry import backend_options
from edge.core.config import load_settings
from edge.repository.model_config import parse_model_config
from edge.scheduler.manager import ModelManager

ORIN = DeviceInfo("10.3.0", "Orin", "8.7", 16)
OPTIONS = BackendOptions(intra_op_threads=1, provider_options={ENGINE_OPTIONS: {
    "precision": "fp16", "config_max_batch": "4"}})


def _probe(device: DeviceInfo | None = ORIN):
    return lambda: (device, "" if device else "TensorRT is not installed")


def _version(tmp_path: Path) -> Path:
    version = tmp_path / "model" / "1"
    conv_net(version / "model.onnx")
    return version


def _key(version: Path, device: DeviceInfo = ORIN, precision: str = "fp16") -> EngineKey:
    onnx_path = version / "model.onnx"
    return EngineKey(sha256_of(onnx_path), device.tensorrt_version, device.gpu_name,
                     device.compute_capability, precision, default_profiles(onnx_path, 4))


def _fake_engine(plan: Path, key: EngineKey | None) -> Path:
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"not a real engine: deserializing it would fail loudly")
    if key is not None:
        write_engine_manifest(plan, key)
    return plan


@pytest.mark.parametrize(("field", "value"), [("tensorrt_version", "8.6.2"),
                                              ("gpu_name", "NVIDIA A2"),
                                              ("compute_capability", "8.6"),
                                              ("precision", "int8")])
def test_mismatched_engine_is_refused_and_onnxruntime_serves(tmp_path: Path, field: str,
                                                             value: str) -> None:
    version = _version(tmp_path)
    _fake_engine(version / "model.plan", replace(_key(version), **{field: value}))
    choice = choose_engine(version / "model.plan", OPTIONS, _probe())
    assert choice.plan is None
    assert any(field in r and value in r for r in choice.reasons), choice.reasons
    backend = open_engine_or_fallback(version / "model.plan", OPTIONS, _probe())
    with backend:
        assert isinstance(backend, OnnxRuntimeBackend)
        assert "ONNX Runtime fallback" in backend.description
        out = backend.infer({"image": np.ones((2, 1, 16, 16), np.float32)})
        assert out["logits"].shape == (2, 3)
    assert "tensorrt" not in sys.modules, "the key check must happen before importing TensorRT"


def test_engine_for_another_onnx_is_refused(tmp_path: Path) -> None:
    version = _version(tmp_path)
    _fake_engine(version / "model.plan", replace(_key(version), onnx_sha256="0" * 64))
    choice = choose_engine(version / "model.onnx", OPTIONS, _probe())
    assert choice.plan is None and "onnx_sha256" in choice.reasons[0]


def test_engine_without_manifest_is_never_used(tmp_path: Path) -> None:
    version = _version(tmp_path)
    _fake_engine(version / "model.plan", None)
    choice = choose_engine(version / "model.onnx", OPTIONS, _probe())
    assert choice.plan is None and "never loaded" in choice.reasons[0]


def test_matching_engine_is_found_by_key_in_the_cache(tmp_path: Path) -> None:
    version = _version(tmp_path)
    _fake_engine(version / "model.plan", replace(_key(version), gpu_name="Xavier"))
    key = _key(version)
    cached = _fake_engine(version.parent / CACHE_DIR / "1" / key.digest() / "model.plan", key)
    choice = choose_engine(version / "model.onnx", OPTIONS, _probe())
    assert choice.plan == cached
    assert choice.expected == key


def test_no_gpu_here_falls_back_and_skips_the_build(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    version = _version(tmp_path)
    _fake_engine(version / "model.plan", _key(version))  # would match on the Orin
    builds = EngineBuilds(probe=_probe(None))
    with caplog.at_level(logging.INFO):
        status = builds.ensure(version, OPTIONS, lambda: None)
    assert "engine build skipped" in status and "TensorRT is not installed" in status
    assert "engine build skipped" in caplog.text
    backend = open_engine_or_fallback(version / "model.plan", OPTIONS, _probe(None))
    with backend:
        assert isinstance(backend, OnnxRuntimeBackend)


def test_background_build_writes_a_keyed_engine_then_notifies(tmp_path: Path) -> None:
    version = _version(tmp_path)
    built: list[Path] = []

    def builder(onnx_path: Path, spec: object, target: Path, device: DeviceInfo) -> EngineKey:
        key = _key(version)
        built.append(_fake_engine(target, key))
        return key

    ready = threading.Event()
    builds = EngineBuilds(probe=_probe(), builder=builder)
    status = builds.ensure(version, OPTIONS, ready.set)
    assert "building engine" in status
    assert ready.wait(10), "on_ready was not called"
    assert choose_engine(version / "model.onnx", OPTIONS, _probe()).plan == built[0]
    assert "matches" in builds.ensure(version, OPTIONS, ready.set)


def test_manager_serves_a_tensorrt_plan_model_with_onnxruntime_on_cpu(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = write_add_scale_repo(repo, "add", (1,), add_scale_config("add").replace(
        'backend: "onnxruntime"', 'platform: "tensorrt_plan"'))
    _fake_engine(model_dir / "1" / "model.plan",
                 EngineKey("0" * 64, "10.3.0", "Orin", "8.7", "fp16", ()))
    config = parse_model_config((model_dir / "config.pbtxt").read_text())
    assert ENGINE_OPTIONS in backend_options(config, load_settings(environ={}).backend) \
        .provider_options
    settings = load_settings(overrides={"server": {"model_repository": str(repo)},
                                        "repository": {"poll_interval_s": 0}}, environ={})
    manager = ModelManager(settings)
    manager.start()
    try:
        model = manager.get("add")
        assert "ONNX Runtime fallback" in model.backend_description
    finally:
        manager.close(5)
    assert "tensorrt" not in sys.modules
