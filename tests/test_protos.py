"""The committed ``edge/protos`` are what ``proto/generate.py`` makes, and the inference
service is wire-compatible with the one tritonclient was built against."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_generate():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_match_committed(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    written = _load_generate().generate(tmp_path)
    assert written
    committed = ROOT / "edge" / "protos"
    for path in written:
        rel = path.relative_to(tmp_path)
        target = committed / rel
        assert target.exists(), f"{rel} is generated but not committed; run make proto"
        assert target.read_text() == path.read_text(), f"{rel} is stale; run make proto"
    generated = {p.relative_to(tmp_path) for p in written}
    stale = {p.relative_to(committed) for p in committed.rglob("*_pb2*.py")} - generated
    assert not stale, f"committed but no longer generated: {sorted(map(str, stale))}"


def _fields(descriptor, prefix: str = "") -> dict[str, tuple]:
    out = {}
    name = prefix + descriptor.name
    for field in descriptor.fields:
        out[f"{name}.{field.name}"] = (field.number, field.type,
                                       field.message_type.full_name if field.message_type else "")
    for nested in descriptor.nested_types:
        out.update(_fields(nested, name + "."))
    return out


def test_inference_service_is_wire_compatible_with_tritonclient() -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    from edge.protos import inference_pb2
    from edge.tools.triton_client import grpcclient

    theirs_file = grpcclient().service_pb2.DESCRIPTOR
    ours_file = inference_pb2.DESCRIPTOR
    theirs: dict[str, tuple] = {}
    for message in theirs_file.message_types_by_name.values():
        theirs.update(_fields(message))
    for message in ours_file.message_types_by_name.values():
        for key, spec in _fields(message).items():
            assert key in theirs, f"{key} is not in Triton's protocol"
            assert theirs[key] == spec, f"{key}: ours {spec}, Triton's {theirs[key]}"
    their_methods = {m.name: m for m in theirs_file.services_by_name[
        "GRPCInferenceService"].methods}
    for method in ours_file.services_by_name["GRPCInferenceService"].methods:
        other = their_methods[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name, other.output_type.full_name)
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming, other.server_streaming)
