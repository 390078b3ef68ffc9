"""Which backend runs a model, and with what options: config.pbtxt over BackendSettings.

Precedence, lowest first: ``BackendSettings``; the config's instance kind and
``optimization`` block (Triton's semantics: ``KIND_CPU`` keeps a model on the CPU; a
``gpu_execution_accelerator`` named ``tensorrt`` puts the TensorRT provider first;
``graph { level }`` -1 disables graph optimisation, 1 is extended); then ``parameters``
(Triton's ``intra_op_thread_count``/``inter_op_thread_count``, and mededge's ``providers``,
a comma list, and ``graph_optimization``).

TensorRT engines: platform ``tensorrt_plan`` (or parameter ``tensorrt_engine: "true"`` on an
ONNX model) goes through ``engine_manager``, which serves a matching engine or falls back to
ONNX Runtime on the version's model.onnx; parameters ``tensorrt_precision`` (fp32, fp16, int8),
``tensorrt_max_batch``, ``tensorrt_dla_core`` and ``tensorrt_workspace_mb`` shape the engine.
"""

from __future__ import annotations

from pathlib import Path

from edge.backends.base import Backend, BackendOptions
from edge.backends.engine_manager import ENGINE_OPTIONS
from edge.core.config import BackendSettings
from edge.core.errors import RepositoryError
from edge.protos import model_config_pb2
from edge.repository.model_config import ModelConfig

ONNX_PLATFORMS = ("onnxruntime_onnx",)
ONNX_BACKENDS = ("onnxruntime",)
TENSORRT_PLATFORMS = ("tensorrt_plan", "tensorrt")
#: A model served by a remote KServe v2 server (edge/backends/remote_kserve.py); its config's
#: ``remote_*`` parameters travel in ``BackendOptions.provider_options[REMOTE_OPTIONS]``.
REMOTE_BACKENDS = ("remote",)
REMOTE_OPTIONS = "remote"
_ENGINE_PARAMS = {"tensorrt_precision": "precision", "tensorrt_max_batch": "max_batch",
                  "tensorrt_dla_core": "dla_core", "tensorrt_workspace_mb": "workspace_mb"}
_TRT_EP = "TensorrtExecutionProvider"
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
_KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU


def _param(config: ModelConfig, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def _int_param(config: ModelConfig, key: str, default: int, source: str) -> int:
    value = _param(config, key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise RepositoryError(f"{source}: parameters[{key!r}]: not an integer: {value!r}") from exc


def backend_options(config: ModelConfig, settings: BackendSettings,
                    source: str = "config.pbtxt") -> BackendOptions:
    """The options to open ``config``'s model with.

    Raises:
        RepositoryError: a parameter has an invalid value; the message names it.
    """
    providers = list(settings.providers)
    trt_params: dict[str, str] = {}
    accel = config.optimization.execution_accelerators
    if any(a.name == "tensorrt" for a in accel.gpu_execution_accelerator):
        providers = [_TRT_EP] + [p for p in providers if p != _TRT_EP]
        for a in accel.gpu_execution_accelerator:
            if a.name == "tensorrt":
                params = dict(a.parameters)
                if params.get("precision_mode", "").upper() == "FP16":
                    trt_params["trt_fp16_enable"] = "True"
                if "max_workspace_size_bytes" in params:
                    trt_params["trt_max_workspace_size"] = params["max_workspace_size_bytes"]
    if config.instance_group and all(g.kind == _KIND_CPU for g in config.instance_group):
        providers = [_CPU_EP]
    named = _param(config, "providers")
    if named:
        providers = [p.strip() for p in named.split(",") if p.strip()]

    graph = settings.graph_optimization
    if config.optimization.HasField("graph"):
        level = config.optimization.graph.level
        graph = {-1: "disable", 1: "extended"}.get(level, "all")
    graph = _param(config, "graph_optimization") or graph
    if graph not in ("disable", "basic", "extended", "all"):
        raise RepositoryError(f"{source}: parameters['graph_optimization']: {graph!r} is not "
                              "one of disable, basic, extended, all")
    intra = _int_param(config, "intra_op_thread_count", settings.intra_op_threads, source)
    inter = _int_param(config, "inter_op_thread_count", settings.inter_op_threads, source)
    provider_options: dict[str, dict[str, str]] = {_TRT_EP: trt_params} if trt_params else {}
    engine_wanted = (config.platform or config.backend) in TENSORRT_PLATFORMS or \
        (_param(config, "tensorrt_engine") or "").lower() in ("1", "true")
    if engine_wanted:
        engine = {v: _param(config, k) or "" for k, v in _ENGINE_PARAMS.items()}
        engine["config_max_batch"] = str(max(1, config.max_batch_size))
        provider_options[ENGINE_OPTIONS] = {k: v for k, v in engine.items() if v}
    remote = {key: config.parameters[key].string_value for key in config.parameters
              if key.startswith("remote_")}
    if remote or (config.backend or config.platform) in REMOTE_BACKENDS:
        provider_options[REMOTE_OPTIONS] = remote
    return BackendOptions(
        providers=tuple(providers), intra_op_threads=max(0, intra),
        inter_op_threads=max(1, inter), graph_optimization=graph,
        batched=config.max_batch_size > 0, provider_options=provider_options)


def wants_engine(platform: str, options: BackendOptions) -> bool:
    """Whether a TensorRT engine should serve this model (platform or parameter)."""
    return platform in TENSORRT_PLATFORMS or ENGINE_OPTIONS in options.provider_options


def open_backend(platform: str, path: Path, options: BackendOptions) -> Backend:
    """Open the model file at ``path`` with the backend for ``platform``.

    ``platform`` is a config's ``backend`` or ``platform`` (``onnxruntime``,
    ``onnxruntime_onnx``, ``tensorrt_plan``). Remote backends plug in here.

    Raises:
        RepositoryError: no backend serves ``platform``, or the file is not a loadable model.
        BackendError: the runtime could not open the model.
    """
    # Remote first: ``remote_*`` parameters send the model to a KServe v2 server, whatever its
    # platform (so the same folder also serves locally under Triton, which ignores them).
    if platform in REMOTE_BACKENDS or REMOTE_OPTIONS in options.provider_options:
        from edge.backends.remote_kserve import RemoteKServeBackend, RemoteTarget

        params = options.provider_options.get(REMOTE_OPTIONS, {})
        return RemoteKServeBackend(RemoteTarget.from_parameters(params, path), options)
    if wants_engine(platform, options):
        from edge.backends.engine_manager import open_engine_or_fallback

        return open_engine_or_fallback(path, options)
    if platform in ONNX_BACKENDS or platform in ONNX_PLATFORMS:
        from edge.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, options)
    raise RepositoryError(f"{path}: no backend for platform {platform!r} in this build")
