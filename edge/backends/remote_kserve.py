"""Remote KServe v2 backend: a model's batches run on another KServe v2 / Triton server.

The box keeps its own scheduler (queues, batching, priorities, deadlines), statistics and error
mapping; only the execution moves: each batch becomes one ``ModelInfer`` call over gRPC with
``raw_input_contents``. Tensor names, types and shapes come from the remote ``ModelMetadata``,
so a config.pbtxt may leave them out as for a local model. The stubs are our own
wire-compatible ones (``edge.protos``), so no tritonclient is needed in the server process.

Configured in a model's config.pbtxt: ``backend: "remote"`` (or any ONNX model with a
``remote_url`` parameter, so the same folder is served locally by Triton, which ignores it),
with the parameters of :meth:`RemoteTarget.from_parameters`.

What leaves the box is the model's input tensors, an opaque random request id and allow-listed
scheduling parameters: no DICOM attributes, no identifiers. Request ids and parameters pass
through :class:`edge.backends.deidentify.Pseudonymizer` (ids replaced, mapped back on the
response; UID-shaped values dropped). Scrubbing the pixels themselves (burned-in text) plugs in
as an :data:`OutboundFilter` given to :class:`RemoteKServeBackend`.

TLS: a ``grpcs://`` URL or ``remote_tls: "true"``, with ``remote_ca_file`` (None: the system
trust store), ``remote_cert_file`` / ``remote_key_file`` (mutual TLS), ``remote_server_name``
(the name to check in the remote's certificate when it differs from the URL's host), and
``remote_token_file`` (a bearer token sent as ``authorization`` metadata on every call).
Relative paths are relative to the model's folder. See docs/security.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends.base import Backend, BackendOptions
from edge.backends.deidentify import ParameterValue, Pseudonymizer
from edge.core.errors import BackendError, ConfigError, InvalidInputError, RepositoryError
from edge.core.tls import PemMaterial, pem_material
from edge.core.types import KSERVE_TO_NUMPY, TensorSpec

log = logging.getLogger(__name__)

#: Called on every batch before it is sent; returns the arrays to send (same names, dtypes and
#: shapes). The hook for de-identifying what leaves the box. It may raise BackendError.
OutboundFilter = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

#: Typed ``InferTensorContents`` fields, for servers that answer without raw contents.
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents",
                   "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _float_param(params: Mapping[str, str], key: str, default: float, path: Path) -> float:
    try:
        value = float(params.get(key, default))
    except ValueError as exc:
        raise RepositoryError(f"{path}: parameters[{key!r}]: not a number: "
                              f"{params[key]!r}") from exc
    if value <= 0:
        raise RepositoryError(f"{path}: parameters[{key!r}]: must be > 0")
    return value


def _file_param(params: Mapping[str, str], key: str, path: Path) -> Path | None:
    value = params.get(key, "").strip()
    if not value:
        return None
    return path.parent.parent / value  # relative to the model's folder; absolute stays


@dataclass(frozen=True)
class RemoteTls:
    """TLS to the remote: files as configured; ``None`` files use grpc's defaults."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""  # "": the URL's host

    def material(self, where: str) -> PemMaterial:
        """Raises: RepositoryError: a file is missing or invalid; the message names it."""
        try:
            return pem_material(self.cert_file, self.key_file, self.ca_file,
                                f"{where}: parameters['remote_tls']")
        except ConfigError as exc:
            raise RepositoryError(str(exc)) from exc


@dataclass(frozen=True)
class RemoteResult:
    """One remote call's outputs and the caller's own request id, mapped back."""

    id: str
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class RemoteTarget:
    """Where a model's batches go: ``url`` is ``host:port`` of a KServe v2 gRPC endpoint."""

    url: str
    model: str
    version: str = ""  # "": the remote server's version policy picks
    timeout_s: float = 60.0  # per ModelInfer call
    connect_timeout_s: float = 10.0  # opening: waiting for the server and its metadata
    max_message_bytes: int = 512 * 1024 * 1024
    tls: RemoteTls | None = None  # None: plaintext
    token_file: Path | None = None  # bearer token for the remote, read when opened

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], path: Path) -> RemoteTarget:
        """Read a config.pbtxt's ``remote_*`` parameters; ``path`` is the version's model file.

        ``remote_url`` (required), ``remote_model_name`` (default: this model's folder name),
        ``remote_model_version`` (default: the remote's choice), ``remote_timeout_s``,
        ``remote_connect_timeout_s``, ``remote_max_message_bytes``; TLS: ``remote_tls``,
        ``remote_ca_file``, ``remote_cert_file``, ``remote_key_file``, ``remote_server_name``;
        ``remote_token_file``.

        Raises:
            RepositoryError: ``remote_url`` is missing or a value is invalid; names the key.
        """
        url = params.get("remote_url", "").strip()
        if not url:
            raise RepositoryError(f"{path}: parameters['remote_url']: required for a remote "
                                  "model (host:port of a KServe v2 gRPC endpoint)")
        secure = url.startswith(("grpcs://", "https://"))
        for scheme in ("grpc://", "http://", "grpcs://", "https://"):
            url = url.removeprefix(scheme)
        flag = params.get("remote_tls", "").strip().lower()
        if flag not in ("", "true", "false"):
            raise RepositoryError(f"{path}: parameters['remote_tls']: true or false")
        secure = secure or flag == "true"
        cert, key = (_file_param(params, "remote_cert_file", path),
                     _file_param(params, "remote_key_file", path))
        if (cert is None) != (key is None):
            raise RepositoryError(f"{path}: parameters['remote_cert_file'] and "
                                  "['remote_key_file'] go together (a client certificate)")
        tls = RemoteTls(_file_param(params, "remote_ca_file", path), cert, key,
                        params.get("remote_server_name", "").strip()) if secure else None
        try:
            max_bytes = int(params.get("remote_max_message_bytes", cls.max_message_bytes))
        except ValueError as exc:
            raise RepositoryError(f"{path}: parameters['remote_max_message_bytes']: not an "
                                  "integer") from exc
        return cls(url=url, model=params.get("remote_model_name") or path.parent.parent.name,
                   version=params.get("remote_model_version", ""),
                   timeout_s=_float_param(params, "remote_timeout_s", cls.timeout_s, path),
                   connect_timeout_s=_float_param(params, "remote_connect_timeout_s",
                                                  cls.connect_timeout_s, path),
                   max_message_bytes=max_bytes, tls=tls,
                   token_file=_file_param(params, "remote_token_file", path))


def _specs(tensors: Any, batched: bool, where: str) -> tuple[TensorSpec, ...]:
    specs = []
    for tensor in tensors:
        if tensor.datatype not in KSERVE_TO_NUMPY:
            raise RepositoryError(f"{where}: tensor {tensor.name!r}: datatype {tensor.datatype} "
                                  "is not supported by mededge backends")
        shape = tuple(int(d) for d in tensor.shape)
        if batched:
            if not shape:
                raise RepositoryError(f"{where}: tensor {tensor.name!r} has no batch axis but "
                                      "max_batch_size > 0")
            shape = shape[1:]
        specs.append(TensorSpec(tensor.name, tensor.datatype, shape))
    return tuple(specs)


def _decode(tensor: Any, raw: bytes | None, where: str) -> np.ndarray:
    dtype = KSERVE_TO_NUMPY.get(tensor.datatype)
    if dtype is None:
        raise BackendError(f"{where}: output {tensor.name!r}: unsupported datatype "
                           f"{tensor.datatype}")
    shape = tuple(int(d) for d in tensor.shape)
    if raw is not None:
        flat = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    elif tensor.datatype in _CONTENTS_FIELD:
        flat = np.asarray(getattr(tensor.contents, _CONTENTS_FIELD[tensor.datatype]), dtype)
    else:
        raise BackendError(f"{where}: output {tensor.name!r}: no contents")
    try:
        return flat.astype(dtype, copy=False).reshape(shape)
    except ValueError as exc:
        raise BackendError(f"{where}: output {tensor.name!r}: {flat.size} values do not fill "
                           f"shape {list(shape)}") from exc


class RemoteKServeBackend(Backend):
    """One model on a remote KServe v2 gRPC server, behind the Backend interface.

    Raises (constructor):
        BackendError: the server cannot be reached within ``connect_timeout_s``, or the model
            is not ready there; the message names the URL and the model.
        RepositoryError: the remote model has tensors mededge cannot carry (BYTES).
    """

    def __init__(self, target: RemoteTarget, options: BackendOptions | None = None,
                 outbound: OutboundFilter | None = None,
                 pseudonymizer: Pseudonymizer | None = None) -> None:
        super().__init__()
        import grpc  # grpc and the stubs only when a remote model is opened

        from edge.protos import inference_pb2, inference_pb2_grpc

        self._grpc = grpc
        pb: Any = inference_pb2  # generated code: no type information
        self._pb = pb
        self.target = target
        self._outbound = outbound
        self.pseudonymizer = pseudonymizer if pseudonymizer is not None else Pseudonymizer()
        self._where = f"remote {target.url} model {target.model!r}"
        self._metadata = self._bearer(target)
        self._channel = self._open_channel(target)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer = stub.ModelInfer
        try:
            ready = stub.ModelReady(
                pb.ModelReadyRequest(name=target.model, version=target.version),
                timeout=target.connect_timeout_s, wait_for_ready=True, metadata=self._metadata)
            if not ready.ready:
                raise BackendError(f"{self._where}: not ready on the remote server")
            meta = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=target.model, version=target.version),
                timeout=target.connect_timeout_s, metadata=self._metadata)
            batched = (options or BackendOptions()).batched
            self.inputs = _specs(meta.inputs, batched, self._where)
            self.outputs = _specs(meta.outputs, batched, self._where)
        except grpc.RpcError as exc:
            self._channel.close()
            raise BackendError(f"{self._where}: {exc.code().name}: {exc.details()}") from exc
        except BaseException:
            self._channel.close()
            raise
        self._output_names = tuple(s.name for s in self.outputs)
        self.description = f"remote KServe v2 {target.url} ({meta.platform or 'unknown'})"
        log.info("%s: opened, %d inputs, %d outputs", self._where, len(self.inputs),
                 len(self.outputs))

    def _bearer(self, target: RemoteTarget) -> tuple[tuple[str, str], ...]:
        if target.token_file is None:
            return ()
        try:
            token = target.token_file.read_text().strip()
        except OSError as exc:
            raise RepositoryError(f"{self._where}: parameters['remote_token_file']: "
                                  f"{target.token_file}: cannot read: {exc.strerror}") from exc
        if not token:
            raise RepositoryError(f"{self._where}: parameters['remote_token_file']: "
                                  f"{target.token_file} is empty")
        return (("authorization", f"Bearer {token}"),)

    def _open_channel(self, target: RemoteTarget) -> Any:
        size = target.max_message_bytes
        options: list[tuple[str, Any]] = [("grpc.max_send_message_length", size),
                                          ("grpc.max_receive_message_length", size)]
        if target.tls is None:
            return self._grpc.insecure_channel(target.url, options=options)
        pem = target.tls.material(self._where)
        if target.tls.server_name:
            options.append(("grpc.ssl_target_name_override", target.tls.server_name))
        credentials = self._grpc.ssl_channel_credentials(
            root_certificates=pem.root_certificates, private_key=pem.private_key,
            certificate_chain=pem.cert_chain)
        return self._grpc.secure_channel(target.url, credentials, options=options)

    def _request(self, inputs: Mapping[str, np.ndarray], request_id: str,
                 parameters: Mapping[str, ParameterValue]) -> Any:
        request = self._pb.ModelInferRequest(model_name=self.target.model,
                                             model_version=self.target.version, id=request_id)
        for key, value in parameters.items():
            field = ("bool_param" if isinstance(value, bool) else "int64_param"
                     if isinstance(value, int) else "double_param" if isinstance(value, float)
                     else "string_param")
            setattr(request.parameters[key], field, value)
        for spec in self.inputs:
            array = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype.newbyteorder("<"))
            request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        for name in self._output_names:
            request.outputs.add(name=name)
        return request

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One ModelInfer call. Raises BackendError naming the URL on any RPC failure."""
        return self._call(inputs, "", {}).outputs

    def infer_request(self, inputs: Mapping[str, np.ndarray], request_id: str,
                      parameters: Mapping[str, ParameterValue] | None = None) -> RemoteResult:
        """One ModelInfer call carrying a request id and parameters, de-identified on the way
        out (:class:`Pseudonymizer`) and mapped back on the way in.

        Raises:
            BackendError: closed, an RPC failure, or a response for another request id.
            InvalidInputError: an input is missing or unknown.
        """
        if self.closed:
            raise BackendError(f"{self._where}: infer_request() after close()")
        expected = {s.name for s in self.inputs}
        if set(inputs) != expected:
            raise InvalidInputError(f"inputs: missing {sorted(expected - set(inputs))}, "
                                    f"unknown {sorted(set(inputs) - expected)}")
        return self._call(inputs, request_id, parameters or {})

    def _call(self, inputs: Mapping[str, np.ndarray], request_id: str,
              parameters: Mapping[str, ParameterValue]) -> RemoteResult:
        if self._outbound is not None:
            inputs = self._outbound(inputs)
        sent = self.pseudonymizer.outbound(request_id, parameters)
        try:
            response = self._infer(self._request(inputs, sent.id, sent.parameters),
                                   timeout=self.target.timeout_s, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            self.pseudonymizer.forget(sent.id)
            raise BackendError(f"{self._where}: ModelInfer: {exc.code().name}: "
                               f"{exc.details()}") from exc
        if response.id and response.id != sent.id:
            self.pseudonymizer.forget(sent.id)
            raise BackendError(f"{self._where}: ModelInfer answered for another request id")
        original = self.pseudonymizer.inbound(sent.id)  # the remote may leave the id empty
        raw = list(response.raw_output_contents)
        results: dict[str, np.ndarray] = {}
        for index, tensor in enumerate(response.outputs):
            results[tensor.name] = _decode(tensor, raw[index] if index < len(raw) else None,
                                           self._where)
        missing = [n for n in self._output_names if n not in results]
        if missing:
            raise BackendError(f"{self._where}: response lacks outputs {missing}")
        return RemoteResult(original, results)

    def _close_impl(self) -> None:
        self._channel.close()
