"""The KServe v2 ``inference.GRPCInferenceService`` servicer, on top of the ModelManager.

Handlers raise :mod:`edge.core.errors` types and leave the status codes to
:class:`edge.api.errors.ErrorInterceptor`. The hot path (:meth:`ModelInfer`) is: resolve the
model, decode raw inputs zero-copy, submit, wait, encode raw outputs. ModelInfer and
ModelStreamInfer take :class:`~edge.api.infer_wire.WireInferRequest` (raw inputs left in the
received bytes) and answer :class:`~edge.api.infer_wire.WireInferResponse` objects; the
server registers the matching (de)serializers (:func:`edge.api.grpc_server.inference_handlers`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

import edge
from edge.api.auth import PermissionDeniedError
from edge.api.errors import status_for
from edge.api.infer_wire import (
    WireInferRequest,
    WireInferResponse,
    infer_response_parts,
    parse_infer_request,
    stream_response_parts,
)
from edge.api.metrics import RequestCounters
from edge.api.shared_memory import SharedMemoryRegistry
from edge.api.statistics import model_statistics_proto, served_models
from edge.api.tensor_codec import (
    ShmPlacement,
    check_output_placement,
    decode_inputs,
    encode_outputs,
    shm_placement,
)
from edge.core.errors import DeadlineExceededError, InvalidInputError
from edge.core.types import InferenceRequest, InferenceResponse
from edge.protos import inference_pb2, inference_pb2_grpc, model_config_pb2

if TYPE_CHECKING:
    from concurrent.futures import Future

    from edge.scheduler.manager import ModelManager, ServedModel

log = logging.getLogger(__name__)

#: How a front end other than grpcio takes an answer: reply(code, message, encoded parts).
Reply = Callable[[int, str, Sequence[Any] | None], None]
#: ModelConfig parameter carrying the sidecar's task, labels and preprocessing as JSON.
SIDECAR_PARAMETER = "mededge.sidecar"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy")
SHARED_MEMORY_EXTENSION = "system_shared_memory"
#: Extra wait past a request's deadline before the front end gives up on the scheduler.
_DEADLINE_GRACE_S = 1.0


def parse_version(text: str) -> int | None:
    """A request's version string as an int; "" means the server's choice (None).

    Raises:
        InvalidInputError: not a non-negative integer.
    """
    if not text:
        return None
    if not text.isdigit():
        raise InvalidInputError(f"model version must be an integer, got {text!r}")
    return int(text)


def _deadline(request: inference_pb2.ModelInferRequest, remaining: float | None
              ) -> float | None:
    """The monotonic deadline from the gRPC deadline (``remaining`` seconds, None: none) and
    Triton's ``timeout`` (microseconds)."""
    now = time.monotonic()
    deadline = None
    if remaining is not None and remaining < 1e8:
        deadline = now + remaining
    if "timeout" in request.parameters:
        param = request.parameters["timeout"]
        micros = param.int64_param or param.uint64_param
        if micros > 0:
            limit = now + micros / 1e6
            deadline = limit if deadline is None else min(deadline, limit)
    return deadline


def _priority(request: inference_pb2.ModelInferRequest) -> int:
    if "priority" not in request.parameters:
        return 0
    param = request.parameters["priority"]
    return int(param.uint64_param or param.int64_param)


class _Submitted:
    """A request handed to the scheduler, waiting for its result (``future``: None until
    ``submit`` returned; a front end's reply callback gets the future itself)."""

    __slots__ = ("request", "model", "future", "deadline", "outputs", "placements",
                 "started_ns")

    def __init__(self, request: WireInferRequest, model: ServedModel,
                 deadline: float | None, outputs: tuple[str, ...],
                 placements: dict[str, ShmPlacement], started_ns: int) -> None:
        self.request = request
        self.model = model
        self.future: Future[InferenceResponse] | None = None
        self.deadline = deadline
        self.outputs = outputs
        self.placements = placements
        self.started_ns = started_ns


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 RPCs served from a :class:`ModelManager`."""

    def __init__(self, manager: ModelManager, counters: RequestCounters,
                 shared_memory: SharedMemoryRegistry | None = None) -> None:
        """``shared_memory`` None turns the system shared-memory extension off (its RPCs and
        tensors placed in shared memory are then refused with INVALID_ARGUMENT)."""
        self._manager = manager
        self._counters = counters
        self._shm = shared_memory
        #: Set by a front end that proxies calls to this servicer: the metadata key carrying
        #: the caller's own peer (the proxy's connection is always local).
        self.forwarded_peer_key: str | None = None

    # --- health and metadata ----------------------------------------------------------------

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerReadyResponse(ready=self._manager.ready())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        ready = self._manager.is_ready(request.name, parse_version(request.version))
        return inference_pb2.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        extensions = EXTENSIONS + ((SHARED_MEMORY_EXTENSION,) if self._shm is not None else ())
        return inference_pb2.ServerMetadataResponse(
            name="mededge", version=edge.__version__, extensions=extensions)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._manager.get(request.name, parse_version(request.version))
        response = inference_pb2.ModelMetadataResponse(
            name=model.id.name, platform=model.platform, versions=self._versions(model.id.name))
        batch = (-1,) if model.max_batch_size > 0 else ()
        for spec in model.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=batch + spec.shape)
        for spec in model.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=batch + spec.shape)
        return response

    def _versions(self, name: str) -> list[str]:
        return sorted({str(e.version) for e in self._manager.index()
                       if e.name == name and e.version is not None and _state(e) == "READY"},
                      key=int)

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._manager.get(request.name, parse_version(request.version))
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(model.config)
        if model.sidecar is not None:
            sidecar = model.sidecar
            config.parameters[SIDECAR_PARAMETER].string_value = json.dumps({
                "task": sidecar.task.value, "labels": list(sidecar.labels),
                "preprocess": sidecar.preprocess.to_dict(),
                "thresholds": dict(sidecar.thresholds),
                "postprocess": dict(sidecar.postprocess)})
        return inference_pb2.ModelConfigResponse(config=config)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        version = parse_version(request.version)
        response = inference_pb2.ModelStatisticsResponse()
        if request.name:
            models = [self._manager.get(request.name, version)]
        else:
            models = served_models(self._manager)
        for model in models:
            response.model_stats.append(model_statistics_proto(model, self._counters))
        return response

    # --- repository -------------------------------------------------------------------------

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = inference_pb2.RepositoryIndexResponse()
        for entry in self._manager.index():
            state = _state(entry)
            if request.ready and state != "READY":
                continue
            version = "" if entry.version is None else str(entry.version)
            response.models.add(name=entry.name, version=version, state=state,
                                reason=entry.reason or "")
        return response

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        config_text = None
        if "config" in request.parameters:
            config_text = config_override_text(request.parameters["config"].string_param,
                                               request.model_name)
        self._manager.load(request.model_name, config_text)
        return inference_pb2.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._manager.unload(request.model_name)
        return inference_pb2.RepositoryModelUnloadResponse()

    # --- system shared memory --------------------------------------------------------------

    def _registry(self) -> SharedMemoryRegistry:
        if self._shm is None:
            raise InvalidInputError("system shared memory is not enabled on this server "
                                    "(grpc.shared_memory)")
        return self._shm

    def SystemSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = inference_pb2.SystemSharedMemoryStatusResponse()
        for region in self._registry().status(request.name):
            status = response.regions[region.name]
            status.name, status.key = region.name, region.key
            status.offset, status.byte_size = region.offset, region.byte_size
        return response

    def SystemSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = self._peer(context)
        if not is_local_peer(peer):
            raise PermissionDeniedError(
                f"shared memory region {request.name!r}: registration is only accepted from "
                f"this host (peer {peer})")
        self._registry().register(request.name, request.key, request.offset, request.byte_size)
        return inference_pb2.SystemSharedMemoryRegisterResponse()

    def _peer(self, context: grpc.ServicerContext) -> str:
        if self.forwarded_peer_key is None:
            return context.peer()
        forwarded = [value for key, value in context.invocation_metadata() or ()
                     if key == self.forwarded_peer_key]
        return str(forwarded[-1]) if forwarded else "unknown"

    def SystemSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._registry().unregister(request.name)
        return inference_pb2.SystemSharedMemoryUnregisterResponse()

    # --- inference --------------------------------------------------------------------------

    def ModelInfer(self, request: WireInferRequest, context: grpc.ServicerContext
                   ) -> WireInferResponse:
        started = time.perf_counter_ns()
        message = request.message
        model = self._manager.get(message.model_name, parse_version(message.model_version))
        try:
            submitted = self._submit(model, request, context.time_remaining(), started)
            future = submitted.future
            assert future is not None
            if not context.add_callback(future.cancel):
                future.cancel()
            return self._finish(submitted)
        finally:
            self._counters.observe(model.id.name, str(model.id.version),
                                   time.perf_counter_ns() - started)

    def ModelStreamInfer(self, request_iterator: Iterator[WireInferRequest],
                         context: grpc.ServicerContext) -> Iterator[Any]:
        """Requests are submitted as they arrive; responses come back in request order: an
        answer as a WireInferResponse, a failure as a ModelStreamInferResponse with its
        ``error_message`` (see :func:`edge.api.infer_wire.serialize_stream_response`)."""
        pending: queue.SimpleQueue[_Submitted | Any | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                for request in request_iterator:
                    pending.put(self._stream_submit(request, context))
            except Exception as exc:  # the client went away mid-stream
                if context.is_active():
                    pending.put(_stream_error(None, exc))
            finally:
                pending.put(None)

        threading.Thread(target=read, name="grpc-stream-reader", daemon=True).start()
        while (item := pending.get()) is not None:
            if not isinstance(item, _Submitted):
                yield item
                continue
            response: WireInferResponse | Any
            try:
                response = self._finish(item)
            except Exception as exc:
                response = _stream_error(item.request.message, exc)
            self._counters.observe(item.model.id.name, str(item.model.id.version),
                                   time.perf_counter_ns() - item.started_ns)
            yield response

    def start_infer(self, payload: bytes, remaining: float | None, stream: bool,
                    reply: Reply, inline: bool = True
                    ) -> Future[InferenceResponse] | None:
        """ModelInfer (or one ModelStreamInfer message) for a front end that is not grpcio:
        ``payload`` is the encoded request, ``remaining`` the seconds to the gRPC deadline;
        ``inline`` False keeps an idle model from running it on the calling thread.
        ``reply(code, message, parts)`` is called exactly once, now or from the thread that
        finishes the request: code 0 with the encoded response's pieces, or a gRPC status code
        and its message. On a stream a failure is an answer carrying ``error_message``, as in
        :meth:`ModelStreamInfer`. Returns the scheduler's future (to cancel it when the
        caller goes away), or None when already answered."""
        started = time.perf_counter_ns()
        message: inference_pb2.ModelInferRequest | None = None
        model: ServedModel | None = None
        try:
            try:
                request = parse_infer_request(payload)
            except DecodeError as exc:
                raise InvalidInputError(f"malformed request: {exc}") from exc
            message = request.message
            model = self._manager.get(message.model_name, parse_version(message.model_version))
            # The answer goes out from the thread that completes the future, as soon as it
            # does: before an inline run's bookkeeping, which follows it.
            future = self._submit(model, request, remaining, started, lambda submitted, done:
                                  self._reply(submitted, done, stream, reply), inline).future
        except Exception as exc:
            if model is not None:
                self._counters.observe(model.id.name, str(model.id.version),
                                       time.perf_counter_ns() - started)
            _reply_error(reply, stream, message, exc)
            return None
        return future

    def _reply(self, submitted: _Submitted, future: Future[InferenceResponse], stream: bool,
               reply: Reply) -> None:
        try:
            response = self._answer(submitted, future.result(0))
        except BaseException as exc:  # noqa: BLE001 (every failure is the caller's answer)
            _reply_error(reply, stream, submitted.request.message, exc)
        else:
            reply(0, "", stream_response_parts(response) if stream
                  else infer_response_parts(response))
        finally:
            self._counters.observe(submitted.model.id.name, str(submitted.model.id.version),
                                   time.perf_counter_ns() - submitted.started_ns)

    def _stream_submit(self, request: WireInferRequest, context: grpc.ServicerContext
                       ) -> _Submitted | Any:
        started = time.perf_counter_ns()
        message = request.message
        try:
            model = self._manager.get(message.model_name, parse_version(message.model_version))
        except Exception as exc:
            return _stream_error(message, exc)
        try:
            return self._submit(model, request, context.time_remaining(), started)
        except Exception as exc:
            self._counters.observe(model.id.name, str(model.id.version),
                                   time.perf_counter_ns() - started)
            return _stream_error(message, exc)

    def _submit(self, model: ServedModel, request: WireInferRequest,
                remaining: float | None, started: int,
                on_done: Callable[[_Submitted, Future[InferenceResponse]], None] | None = None,
                inline: bool = True) -> _Submitted:
        """Decode and submit (``remaining``: seconds to the gRPC deadline, None: none);
        ``on_done(submitted, future)`` is called when the future completes, from the thread
        that completes it (possibly this one, before this returns, when ``inline`` lets an
        idle model run it here).

        Raises:
            InvalidInputError: undecodable tensors, an unknown output, or inputs the model
                does not take (counted here as refused).
            QueueFullError: the model's queue is full (counted by the scheduler).
        """
        message = request.message
        requested = tuple(o.name for o in message.outputs)
        known = [spec.name for spec in model.outputs]
        placements: dict[str, ShmPlacement] = {}
        try:
            inputs = decode_inputs(message, request.raw, self._shm)
            for output in message.outputs:
                name = output.name
                if name not in known:
                    raise InvalidInputError(
                        f"model {model.id.name!r} has no output {name!r} (outputs: {known})")
                placement = shm_placement(output.parameters, f"output {name!r}")
                if placement is not None:
                    check_output_placement(name, placement, self._shm)
                    placements[name] = placement
            deadline = _deadline(message, remaining)
            submitted = _Submitted(request, model, deadline, requested or tuple(known),
                                   placements, started)
            submitted.future = model.submit(InferenceRequest(
                model=model.id.name, inputs=inputs, version=model.id.version,
                request_id=message.id, priority=_priority(message), deadline=deadline,
                outputs=requested), inline=inline,
                on_done=None if on_done is None else partial(on_done, submitted))
        except InvalidInputError:
            # The scheduler counts rejections for a full queue, not for invalid input.
            self._counters.refuse(model.id.name, str(model.id.version))
            raise
        return submitted

    def _finish(self, submitted: _Submitted) -> WireInferResponse:
        """Wait for the result and build the response.

        Raises:
            DeadlineExceededError: the deadline (plus a grace) passed without a result.
            MededgeError: whatever the scheduler failed the request with.
        """
        future = submitted.future
        assert future is not None
        timeout = None
        if submitted.deadline is not None:
            timeout = max(0.0, submitted.deadline - time.monotonic()) + _DEADLINE_GRACE_S
        try:
            result = future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            raise DeadlineExceededError(
                f"model {submitted.model.id}: deadline passed before execution") from exc
        return self._answer(submitted, result)

    def _answer(self, submitted: _Submitted, result: InferenceResponse) -> WireInferResponse:
        """The response to a submitted request from its result (outputs encoded, or written to
        their shared-memory regions)."""
        response = inference_pb2.ModelInferResponse(
            model_name=result.model.name, model_version=str(result.model.version),
            id=submitted.request.message.id)
        return WireInferResponse(response, encode_outputs(
            response, result.outputs, submitted.outputs, submitted.placements, self._shm))


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``,
    ``unix:/path``) is a process on this host: only those can share memory with the server."""
    kind, _, address = peer.partition(":")
    if kind == "unix":
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    return (kind == "ipv4" and host.startswith("127.")) or (
        kind == "ipv6" and host in ("::1", "::ffff:127.0.0.1"))


def _state(entry: Any) -> str:
    state = entry.state
    return str(getattr(state, "value", state))


def _reply_error(reply: Reply, stream: bool,
                 request: inference_pb2.ModelInferRequest | None, exc: BaseException) -> None:
    """Answer a failed request: on a stream an answer with ``error_message``, else a status."""
    if stream:
        reply(0, "", stream_response_parts(_stream_error(request, exc)))
        return
    status = status_for(exc)
    if status.code is not grpc.StatusCode.CANCELLED:
        log.debug("gRPC call failed: %s: %s", status.code.name, status.message)
    reply(status.code.value[0], status.message, None)


def _stream_error(request: inference_pb2.ModelInferRequest | None, exc: BaseException) -> Any:
    response = inference_pb2.ModelStreamInferResponse(error_message=status_for(exc).message)
    if request is not None:
        response.infer_response.model_name = request.model_name
        response.infer_response.model_version = request.model_version
        response.infer_response.id = request.id
    return response


def config_override_text(text: str, model_name: str) -> str:
    """A load request's ``config`` parameter (JSON as Triton takes it, or protobuf text) as
    config.pbtxt text.

    Raises:
        InvalidInputError: neither valid JSON nor valid protobuf text for a ModelConfig.
    """
    config = model_config_pb2.ModelConfig()
    try:
        if text.lstrip().startswith("{"):
            json_format.Parse(text, config, ignore_unknown_fields=True)
        else:
            text_format.Parse(text, config, allow_unknown_field=True)
    except (json_format.ParseError, text_format.ParseError) as exc:
        raise InvalidInputError(f"load {model_name!r}: config parameter: {exc}") from exc
    if config.name and config.name != model_name:
        raise InvalidInputError(
            f"load {model_name!r}: config parameter names another model {config.name!r}")
    return text_format.MessageToString(config)
