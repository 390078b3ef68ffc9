"""The zero-copy ModelInfer codec agrees with protobuf, views the received bytes, refuses
malformed encodings, and a malformed request through the real server gets INVALID_ARGUMENT
while the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from edge.api.infer_wire import (
    WireInferResponse,
    parse_infer_request,
    serialize_infer_response,
    serialize_stream_response,
)
from edge.protos import inference_pb2


def _full(wire: WireInferResponse) -> inference_pb2.ModelInferResponse:
    """The response as protobuf itself would carry it (raw outputs inside the message)."""
    full = inference_pb2.ModelInferResponse()
    full.CopyFrom(wire.message)
    full.raw_output_contents.extend(np.ascontiguousarray(a).tobytes() for a in wire.raw)
    return full


def _request() -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(model_name="affine", model_version="1", id="r-7")
    request.parameters["priority"].uint64_param = 2
    request.parameters["timeout"].int64_param = 150_000
    for name, dtype, shape in (("x", "FP32", (2, 4)), ("k", "INT32", (2, 4))):
        tensor = request.inputs.add(name=name, datatype=dtype)
        tensor.shape.extend(shape)
        tensor.parameters["note"].string_param = name * 3
    request.outputs.add(name="y")
    request.raw_input_contents.append(np.arange(8, dtype=np.float32).tobytes())
    request.raw_input_contents.append(np.arange(8, dtype=np.int32)[::-1].tobytes())
    return request


def test_parse_matches_protobuf_and_views_the_received_bytes() -> None:
    full = _request()
    data = full.SerializeToString()
    wire = parse_infer_request(data)
    assert [bytes(v) for v in wire.raw] == list(full.raw_input_contents)
    assert all(v.obj is data for v in wire.raw)  # views into the received bytes, no copy
    expected = inference_pb2.ModelInferRequest()
    expected.CopyFrom(full)
    expected.ClearField("raw_input_contents")
    assert wire.message == expected


def test_parse_keeps_fields_written_after_the_raw_contents_and_unknown_fields() -> None:
    head = inference_pb2.ModelInferRequest(model_name="m")
    head.raw_input_contents.append(b"\x01\x02\x03\x04")
    tail = inference_pb2.ModelInferRequest(id="after")
    tail.inputs.add(name="late", datatype="UINT8").shape.append(4)
    unknown = b"\x98\x06\x2a"  # field 99, wire type 0, value 42
    wire = parse_infer_request(head.SerializeToString() + unknown + tail.SerializeToString())
    assert [bytes(v) for v in wire.raw] == [b"\x01\x02\x03\x04"]
    assert (wire.message.model_name, wire.message.id) == ("m", "after")
    assert wire.message.inputs[0].name == "late"
    assert unknown in wire.message.SerializeToString()  # kept as an unknown field


def test_empty_request_parses() -> None:
    wire = parse_infer_request(b"")
    assert wire.raw == () and wire.message == inference_pb2.ModelInferRequest()


@pytest.mark.parametrize("data", [
    b"\x3a\x10abc",  # raw_input_contents claims 16 bytes, 3 follow
    b"\x0a\x05ab",  # model_name runs past the end
    b"\x08",  # varint field with no value
    b"\x08" + b"\xff" * 11,  # overlong varint
    b"\x0b\x0c",  # group wire types (3, 4) are not proto3
    b"\x0d\x01\x02",  # fixed32 truncated
])
def test_malformed_encodings_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_infer_request(data)


def test_response_serialization_equals_the_full_message() -> None:
    message = inference_pb2.ModelInferResponse(model_name="seg", model_version="3", id="q")
    arrays = (np.linspace(0, 1, 300, dtype=np.float32).reshape(3, 100),
              np.arange(6, dtype=np.int64).reshape(2, 3).T,  # not C-contiguous
              np.zeros((0, 4), np.float16), np.array([True, False]))
    for i, a in enumerate(arrays):
        message.outputs.add(name=f"o{i}", datatype="FP32").shape.extend(a.shape)
    wire = WireInferResponse(message, arrays)
    parsed = inference_pb2.ModelInferResponse.FromString(serialize_infer_response(wire))
    assert parsed == _full(wire)
    assert list(parsed.raw_output_contents) == [np.ascontiguousarray(a).tobytes()
                                                for a in arrays]


def test_stream_answer_nests_the_response_and_errors_pass_through() -> None:
    message = inference_pb2.ModelInferResponse(model_name="m", id="s-1")
    arrays = (np.arange(1000, dtype=np.float32),)  # a length that needs a 2-byte varint
    message.outputs.add(name="y", datatype="FP32").shape.append(1000)
    wire = WireInferResponse(message, arrays)
    parsed = inference_pb2.ModelStreamInferResponse.FromString(serialize_stream_response(wire))
    assert parsed.infer_response == _full(wire) and not parsed.error_message
    error = inference_pb2.ModelStreamInferResponse(error_message="model 'x' not found")
    assert serialize_stream_response(error) == error.SerializeToString()


def test_malformed_request_is_refused_and_the_server_keeps_serving(server, grpc_url, client,
                                                                   grpcclient) -> None:
    with grpc.insecure_channel(grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            infer(b"\x3a\x10abc")
    if server.grpc_frontend == "native":  # it names the fault
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents runs past the end" in err.value.details()
    else:  # grpcio answers an undecodable request itself
        assert err.value.code() == grpc.StatusCode.INTERNAL
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    k = grpcclient.InferInput("k", [1, 4], "INT32")
    k.set_data_from_numpy(np.full((1, 4), 3, np.int32))
    result = client.infer("affine", [x, k])
    np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 5.0, np.float32))


@pytest.mark.parametrize("name", ["x", "xy", "xyz", "wxyz"])  # moves the tensor's offset
def test_decoded_inputs_are_aligned_and_equal_whatever_their_offset(name: str) -> None:
    from edge.api.tensor_codec import decode_inputs

    values = np.arange(12, dtype=np.float32).reshape(1, 12)
    request = inference_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype="FP32").shape.extend(values.shape)
    request.raw_input_contents.append(values.tobytes())
    wire = parse_infer_request(request.SerializeToString())
    array = decode_inputs(wire.message, wire.raw)[name]
    assert array.flags.aligned
    np.testing.assert_array_equal(array, values)
