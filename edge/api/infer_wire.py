"""ModelInfer on the wire without copying tensors: the request's raw inputs stay in gRPC's bytes.

grpcio hands a handler the request as one ``bytes`` object. Parsing it with protobuf copies each
``raw_input_contents`` entry into the message, and reading an entry back copies it once more: two
copies of every input tensor (600 KB for a ResNet-sized image) before ``np.frombuffer`` can
view it. :func:`parse_infer_request` walks only the top level of the encoding (the protobuf
wire format, https://protobuf.dev/programming-guides/encoding/), keeps each raw input as a
``memoryview`` into the received bytes, and lets protobuf parse the rest (names, shapes,
parameters: a few hundred bytes). :func:`serialize_infer_response` is the mirror image for the
answer: the message without raw outputs, serialised by protobuf, followed by each output's
field header and its array's own buffer, joined in one copy; :func:`serialize_stream_response`
wraps the same pieces as ModelStreamInfer's ``infer_response``.

Both rely on a protobuf rule: concatenated encodings of a message merge, and repeated fields keep
their order, so splitting field 7 (``raw_input_contents``) out of a request, or appending field 6
(``raw_output_contents``) to a response, gives exactly what the full message would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from edge.protos import inference_pb2

#: Field numbers in proto/inference.proto.
RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
STREAM_ANSWER_FIELD = 2  # ModelStreamInferResponse.infer_response
_LENGTH_DELIMITED = 2
_RAW_OUTPUT_TAG = bytes([(RAW_OUTPUT_FIELD << 3) | _LENGTH_DELIMITED])
_STREAM_ANSWER_TAG = bytes([(STREAM_ANSWER_FIELD << 3) | _LENGTH_DELIMITED])


@dataclass(frozen=True)
class WireInferRequest:
    """A ModelInferRequest as received: ``message`` holds every field except
    ``raw_input_contents``, whose entries are ``raw`` (read-only views into the received bytes).
    """

    message: inference_pb2.ModelInferRequest
    raw: tuple[memoryview, ...]


@dataclass(frozen=True)
class WireInferResponse:
    """A ModelInferResponse to send: ``message`` without raw outputs, and the arrays whose bytes
    become ``raw_output_contents`` in order (C-contiguous)."""

    message: inference_pb2.ModelInferResponse
    raw: tuple[np.ndarray, ...]


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, next position). Raises DecodeError when truncated or longer than 10 bytes."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("ModelInferRequest: truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_infer_request(data: bytes) -> WireInferRequest:
    """Split the encoded request into its raw inputs (views, no copy) and the rest (parsed).

    Raises:
        DecodeError: malformed encoding (truncated field, unknown wire type); gRPC answers
            the call with INTERNAL, as it does for any undecodable request.
    """
    view = memoryview(data)
    end = len(view)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    pos = 0
    while pos < end:
        start = pos
        key, pos = _varint(view, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(view, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(view, pos, end)
            if field == RAW_INPUT_FIELD:
                if pos + length > end:
                    raise DecodeError("ModelInferRequest: raw_input_contents runs past the end")
                raw.append(view[pos:pos + length])
                pos += length
                continue
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise DecodeError(f"ModelInferRequest: field {field} has unsupported wire type "
                              f"{wire_type}")
        if pos > end:
            raise DecodeError(f"ModelInferRequest: field {field} runs past the end")
        rest.append(view[start:pos])
    message = inference_pb2.ModelInferRequest.FromString(b"".join(rest))
    return WireInferRequest(message, tuple(raw))


def _response_parts(response: WireInferResponse) -> tuple[list[bytes | np.ndarray], int]:
    """The pieces of the encoded ModelInferResponse (no copy of the outputs) and their size."""
    head = response.message.SerializeToString()
    parts: list[bytes | np.ndarray] = [head]
    size = len(head)
    for array in response.raw:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # a view, no copy
        length = _encode_varint(data.nbytes)
        parts += [_RAW_OUTPUT_TAG, length, data]
        size += len(_RAW_OUTPUT_TAG) + len(length) + data.nbytes
    return parts, size


def infer_response_parts(response: WireInferResponse) -> list[bytes | np.ndarray]:
    """The encoded ModelInferResponse as pieces to join (the arrays not copied)."""
    return _response_parts(response)[0]


def stream_response_parts(response: WireInferResponse | inference_pb2.ModelStreamInferResponse
                          ) -> list[bytes | np.ndarray]:
    """The encoded ModelStreamInferResponse as pieces to join: an answer becomes its
    ``infer_response`` field; an error message (a ModelStreamInferResponse already) is
    serialised as it is."""
    if not isinstance(response, WireInferResponse):
        return [response.SerializeToString()]
    parts, size = _response_parts(response)
    return [_STREAM_ANSWER_TAG, _encode_varint(size), *parts]


def serialize_infer_response(response: WireInferResponse) -> bytes:
    """The encoded ModelInferResponse, raw outputs appended from the arrays' own buffers."""
    return b"".join(infer_response_parts(response))


def serialize_stream_response(
        response: WireInferResponse | inference_pb2.ModelStreamInferResponse) -> bytes:
    """The encoded ModelStreamInferResponse (:func:`stream_response_parts`, joined in one
    copy)."""
    return b"".join(stream_response_parts(response))
