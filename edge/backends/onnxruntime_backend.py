"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind one Backend.

Providers are the requested preference order intersected with what the installed onnxruntime
offers (``onnxruntime.get_available_providers()``); the choice is logged. Inputs go to
``InferenceSession.run`` as they are when they are C-contiguous with the model's dtype, which
ONNX Runtime's CPU provider reads in place (no copy). IO binding was measured not to help on CPU
for batch sizes that change per call, so it is not used here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends.base import Backend, BackendOptions
from edge.core.errors import BackendError, RepositoryError
from edge.core.types import TensorSpec

log = logging.getLogger(__name__)

#: ONNX Runtime's tensor type strings and their KServe v2 names.
ORT_TO_KSERVE: Mapping[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}

#: Session config entries every session gets, before those in
#: ``BackendOptions.provider_options[SESSION_CONFIG_KEY]``. ONNX Runtime's pool threads spin
#: between the parallel sections of a run (no sleep and wake-up per operator), and
#: ``force_spinning_stop`` ends the spinning as soon as a run returns: by default they go on
#: spinning after each run, burning the cores that the gRPC threads, the DICOM receiver and
#: other instances need (2 cores, under load: batch-1 ResNet18 through gRPC about 10 ms slower).
#: Against spinning off, measured on 2 cores: batch-1 ResNet18 0.4-0.9 ms faster, U-Net 4 ms,
#: 8 clients through the server +3 % (docs/benchmarks.md). ``mededge bench serve`` gives the
#: raw and Triton sessions the same entries.
SESSION_CONFIG: Mapping[str, str] = {"session.intra_op.allow_spinning": "1",
                                     "session.force_spinning_stop": "1",
                                     "session.inter_op.allow_spinning": "0"}
#: Key of ``BackendOptions.provider_options`` holding extra session config entries.
SESSION_CONFIG_KEY = "onnxruntime_session_config"

_GRAPH_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                 "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested providers that are available, in the requested order; CPU as the floor."""
    chosen = [p for p in requested if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _specs(nodes: Sequence[Any], batched: bool, path: Path) -> tuple[TensorSpec, ...]:
    specs = []
    for node in nodes:
        datatype = ORT_TO_KSERVE.get(node.type)
        if datatype is None:
            raise RepositoryError(f"{path}: tensor {node.name!r} has unsupported type {node.type}")
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        if batched:
            if not dims:
                raise RepositoryError(
                    f"{path}: tensor {node.name!r} is a scalar but max_batch_size > 0 needs a "
                    "batch axis")
            dims = dims[1:]
        specs.append(TensorSpec(node.name, datatype, dims))
    return tuple(specs)


class OnnxRuntimeBackend(Backend):
    """One ``onnxruntime.InferenceSession``; ``run`` is thread-safe, so instances may share it.

    Raises (constructor):
        RepositoryError: the file is missing, not a valid ONNX model, or has unsupported tensors.
        BackendError: ONNX Runtime could not create a session with the chosen providers.
    """

    def __init__(self, path: Path, options: BackendOptions | None = None) -> None:
        super().__init__()
        import onnxruntime as ort  # heavy; only when a model is opened

        options = options or BackendOptions()
        path = Path(path)
        if not path.is_file():
            raise RepositoryError(f"{path}: model file missing")
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _GRAPH_LEVELS[options.graph_optimization])
        so.log_severity_level = 3
        entries = {**SESSION_CONFIG, **options.provider_options.get(SESSION_CONFIG_KEY, {})}
        for key, value in entries.items():
            so.add_session_config_entry(key, value)
        providers = choose_providers(options.providers, ort.get_available_providers())
        provider_options = [dict(options.provider_options.get(p, {})) for p in providers]
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers,
                                                 provider_options=provider_options)
        except Exception as exc:  # onnxruntime raises its own untyped errors; keep the cause
            text = str(exc)
            if "INVALID_PROTOBUF" in text or "INVALID_GRAPH" in text or "NO_SUCHFILE" in text:
                raise RepositoryError(f"{path}: not a loadable ONNX model: {text}") from exc
            raise BackendError(f"{path}: onnxruntime could not open the model: {text}") from exc
        self.providers = tuple(self._session.get_providers())
        self.description = f"onnxruntime {ort.__version__} {','.join(self.providers)}"
        log.info("%s: providers %s (requested %s)", path, self.providers, options.providers)
        self.inputs = _specs(self._session.get_inputs(), options.batched, path)
        self.outputs = _specs(self._session.get_outputs(), options.batched, path)
        self._output_names = [s.name for s in self.outputs]

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: a if a.flags.c_contiguous else np.ascontiguousarray(a)
                for name, a in inputs.items()}
        try:
            results = self._session.run(self._output_names, feed)
        except Exception as exc:  # onnxruntime's Fail/InvalidArgument have no common base
            raise BackendError(f"onnxruntime: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def _close_impl(self) -> None:
        # InferenceSession has no close(); dropping the last reference frees it.
        del self._session
