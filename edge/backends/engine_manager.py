"""TensorRT engines looked up by what they were built for, never by file name alone.

An engine is valid only for the exact ONNX it came from, the TensorRT version and the GPU
(name, compute capability) it was built on, its precision, optimisation profiles and DLA core:
that tuple is the :class:`EngineKey`, stored beside the engine as ``model.plan.json``. At load
the expected key is computed (ONNX sha256 + this machine's TensorRT and GPU, probed *without*
importing TensorRT) and compared with each candidate's manifest before TensorRT is touched; a
mismatched engine is never deserialized. Without a matching engine, ONNX Runtime serves the
version's ``model.onnx`` while :class:`EngineBuilds` builds the engine in the background into
``MODEL/.engines/<version>/<key digest>/``; the model manager then reloads the version, which
swaps the engine in atomically.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge.backends.base import Backend, BackendOptions
from edge.core.durable import write_atomically
from edge.core.errors import BackendError, RepositoryError

log = logging.getLogger(__name__)

PLAN_FILE, ONNX_FILE = "model.plan", "model.onnx"
MANIFEST_SUFFIX = ".json"
CACHE_DIR = ".engines"
#: BackendOptions.provider_options key carrying the engine parameters (registry fills it).
ENGINE_OPTIONS = "mededge.tensorrt_engine"
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Profile:
    """One input's optimisation profile: min/opt/max shapes, batch axis included."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class DeviceInfo:
    """This machine's TensorRT and GPU, as far as engines care."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    sm_count: int = 0


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: tuple[Profile, ...]
    dla_core: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["profiles"] = [{"input": p.input, "min": list(p.min), "opt": list(p.opt),
                            "max": list(p.max)} for p in self.profiles]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineKey:
        """Raises KeyError/TypeError/ValueError on a malformed mapping."""
        profiles = tuple(Profile(str(p["input"]), tuple(int(x) for x in p["min"]),
                                 tuple(int(x) for x in p["opt"]), tuple(int(x) for x in p["max"]))
                         for p in data["profiles"])
        dla = data.get("dla_core")
        return cls(str(data["onnx_sha256"]), str(data["tensorrt_version"]),
                   str(data["gpu_name"]), str(data["compute_capability"]),
                   str(data["precision"]), profiles, None if dla is None else int(dla))

    def digest(self) -> str:
        """A short stable name for the cache folder."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def mismatches(self, other: EngineKey) -> list[str]:
        """``field: ours != theirs`` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {b[k]!r} != expected {a[k]!r}" for k in a if a[k] != b[k]]


# -- probing this machine (no TensorRT import) -----------------------------------------------

def _tensorrt_version() -> str | None:
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    spec = importlib.util.find_spec("tensorrt")  # JetPack's apt package has no dist-info
    if spec is None or spec.origin is None:
        return None
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", Path(spec.origin).read_text())
    return match.group(1) if match else None


def cuda_runtime() -> Any:
    """cuda-python's runtime module. Raises ImportError when cuda-python is missing."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


def probe_device(index: int = 0) -> tuple[DeviceInfo | None, str]:
    """This machine's TensorRT version and GPU ``index``, or None and the reason why not.

    Imports cuda-python (when installed) but never TensorRT.
    """
    version = _tensorrt_version()
    if version is None:
        return None, "TensorRT is not installed"
    try:
        cudart = cuda_runtime()
    except ImportError:
        return None, "cuda-python is not installed (pip install 'mededge[tensorrt]')"
    err, props = cudart.cudaGetDeviceProperties(index)
    if int(err) != 0:
        return None, f"no CUDA GPU {index}: {err}"
    name = props.name.decode(errors="replace").rstrip("\x00") \
        if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(version, name, f"{props.major}.{props.minor}",
                      int(props.multiProcessorCount)), ""


# -- manifests -------------------------------------------------------------------------------

def manifest_path(plan: Path) -> Path:
    return plan.with_name(plan.name + MANIFEST_SUFFIX)


def read_engine_key(plan: Path) -> EngineKey | None:
    """The key stored beside ``plan``; None when there is no manifest.

    Raises:
        RepositoryError: the manifest exists but is malformed.
    """
    path = manifest_path(plan)
    if not path.is_file():
        return None
    try:
        return EngineKey.from_dict(json.loads(path.read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(f"{path}: malformed engine manifest: {exc}") from exc


def write_engine_manifest(plan: Path, key: EngineKey, extra: Mapping[str, Any] = {}) -> Path:
    """Write ``model.plan.json`` atomically (temporary file, fsync, rename)."""
    path = manifest_path(plan)
    write_atomically(path, json.dumps({"key": key.to_dict(), **dict(extra)}, indent=1))
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- what to expect, which engine to use -------------------------------------------------------

@dataclass(frozen=True)
class EngineWish:
    """What the configuration asks of an engine, before the machine is known."""

    precision: str
    profiles: tuple[Profile, ...]
    dla_core: int | None = None
    workspace_mb: int = 2048


def onnx_input_shapes(onnx_path: Path) -> dict[str, tuple[int, ...]]:
    """Input name -> shape, -1 for symbolic dims (initializers excluded)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") else -1
                          for d in i.type.tensor_type.shape.dim)
            for i in graph.input if i.name not in inits}


def default_profiles(onnx_path: Path, max_batch: int, opt_batch: int | None = None, *,
                     fixed: bool = False) -> tuple[Profile, ...]:
    """Batch 1..``max_batch`` (opt: ``opt_batch`` or max); ``fixed``: min=opt=max (DLA).

    Raises:
        RepositoryError: a non-batch dimension is symbolic (give explicit profiles).
    """
    out = []
    top = max(1, max_batch)
    for name, shape in onnx_input_shapes(onnx_path).items():
        rest = shape[1:]
        if any(d < 1 for d in rest):
            raise RepositoryError(f"{onnx_path}: input {name!r} has symbolic non-batch dims "
                                  f"{list(shape)}; TensorRT needs fixed image sizes")
        lo, opt = (top, top) if fixed else (1, min(top, opt_batch or top))
        out.append(Profile(name, (lo, *rest), (opt, *rest), (top, *rest)))
    return tuple(out)


def engine_wish(onnx_path: Path, options: BackendOptions,
                published: EngineKey | None) -> EngineWish:
    """Config parameters first, then what the version's published engine was built with.

    Raises:
        RepositoryError: a parameter has an invalid value.
    """
    params = dict(options.provider_options.get(ENGINE_OPTIONS, {}))
    precision = params.get("precision") or (published.precision if published else "fp16")
    if precision not in PRECISIONS:
        raise RepositoryError(f"parameters['tensorrt_precision']: {precision!r} not in "
                              f"{PRECISIONS}")
    dla = params.get("dla_core")
    dla_core = int(dla) if dla not in (None, "") else (published.dla_core if published else None)
    if published is not None and "max_batch" not in params:
        profiles = published.profiles
    else:
        max_batch = params.get("max_batch") or params.get("config_max_batch") or 8
        profiles = default_profiles(onnx_path, int(max_batch),
                                    fixed=dla_core is not None)
    return EngineWish(precision, profiles, dla_core, int(params.get("workspace_mb") or 2048))


def expected_key(onnx_path: Path, wish: EngineWish, device: DeviceInfo) -> EngineKey:
    return EngineKey(sha256_of(onnx_path), device.tensorrt_version, device.gpu_name,
                     device.compute_capability, wish.precision, wish.profiles, wish.dla_core)


def candidate_engines(version_dir: Path) -> list[Path]:
    """The version's own ``model.plan``, then engines built for it in the cache."""
    cache = version_dir.parent / CACHE_DIR / version_dir.name
    found = [version_dir / PLAN_FILE] if (version_dir / PLAN_FILE).is_file() else []
    return found + sorted(cache.glob(f"*/{PLAN_FILE}")) if cache.is_dir() else found


def select_engine(candidates: Sequence[Path], expected: EngineKey | None
                  ) -> tuple[Path | None, list[str]]:
    """The first candidate whose manifest key equals ``expected``, and why the others were
    refused. Reads only the JSON manifests; never TensorRT."""
    reasons = []
    for plan in candidates:
        try:
            key = read_engine_key(plan)
        except RepositoryError as exc:
            reasons.append(str(exc))
            continue
        if key is None:
            reasons.append(f"{plan}: no {manifest_path(plan).name}; an engine without its key "
                           "is never loaded")
        elif expected is None:
            reasons.append(f"{plan}: cannot be checked on this machine")
        elif key != expected:
            reasons.append(f"{plan}: built for another setup: " +
                           "; ".join(expected.mismatches(key)))
        else:
            return plan, reasons
    return None, reasons


@dataclass(frozen=True)
class EngineChoice:
    """What serves a version: ``plan`` (a matching engine) or None (ONNX Runtime), and why."""

    onnx_path: Path
    plan: Path | None
    expected: EngineKey | None
    reasons: tuple[str, ...]
    wish: EngineWish | None


def choose_engine(path: Path, options: BackendOptions,
                  probe: Callable[[], tuple[DeviceInfo | None, str]] = probe_device
                  ) -> EngineChoice:
    """Decide, without importing TensorRT, whether a matching engine exists for ``path``'s
    version (``path`` is the version's model.plan or model.onnx).

    Raises:
        RepositoryError: the version has neither a usable engine nor a model.onnx to fall back
            on, or a parameter is invalid.
    """
    version_dir = path.parent
    onnx_path = version_dir / ONNX_FILE
    candidates = candidate_engines(version_dir)
    published = None
    if (version_dir / PLAN_FILE).is_file():
        try:
            published = read_engine_key(version_dir / PLAN_FILE)
        except RepositoryError:
            published = None
    device, why = probe()
    if not onnx_path.is_file():
        if device is None or published is None:
            raise RepositoryError(f"{version_dir}: no {ONNX_FILE} to serve with ONNX Runtime "
                                  f"and no usable engine ({why or 'engine has no manifest'})")
        here = replace(published, tensorrt_version=device.tensorrt_version,
                       gpu_name=device.gpu_name, compute_capability=device.compute_capability)
        plan, reasons = select_engine(candidates, here)
        return EngineChoice(onnx_path, plan, None, tuple(reasons), None)
    wish = engine_wish(onnx_path, options, published)
    expected = expected_key(onnx_path, wish, device) if device is not None else None
    plan, reasons = select_engine(candidates, expected)
    if device is None:
        reasons.append(f"no TensorRT engine on this machine: {why}")
    return EngineChoice(onnx_path, plan, expected, tuple(reasons), wish)


def open_engine_or_fallback(path: Path, options: BackendOptions,
                            probe: Callable[[], tuple[DeviceInfo | None, str]] = probe_device
                            ) -> Backend:
    """A TensorRT backend on a matching engine, else ONNX Runtime on the version's model.onnx.

    Raises:
        RepositoryError: nothing to serve the version with (see :func:`choose_engine`).
        BackendError: TensorRT or ONNX Runtime failed to open the model.
    """
    choice = choose_engine(path, options, probe)
    for reason in choice.reasons:
        log.warning("%s", reason)
    if choice.plan is not None:
        from edge.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(choice.plan, options)
    from edge.backends.onnxruntime_backend import OnnxRuntimeBackend

    providers = tuple(p for p in options.providers if p != "TensorrtExecutionProvider")
    backend = OnnxRuntimeBackend(choice.onnx_path,
                                 replace(options, providers=providers or ("CPUExecutionProvider",)))
    backend.description += " (TensorRT engine pending: ONNX Runtime fallback)"
    return backend


class EngineBuilds:
    """Background engine builds, one per key; owned by the model manager.

    ``ensure`` returns at once: it starts a build thread when a version has no matching engine
    and the machine can build one; ``on_ready`` is called from that thread when the engine is
    on disk (the manager then reloads the version, swapping the engine in atomically).
    """

    def __init__(self, probe: Callable[[], tuple[DeviceInfo | None, str]] = probe_device,
                 builder: Callable[..., EngineKey] | None = None) -> None:
        self._probe = probe
        self._builder = builder
        self._threads: dict[str, threading.Thread] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def ensure(self, version_dir: Path, options: BackendOptions,
               on_ready: Callable[[], None]) -> str:
        """Start building the version's engine if needed; returns what happens, for the log.

        Raises:
            RepositoryError: the version cannot be served at all (no ONNX, bad parameters).
        """
        choice = choose_engine(version_dir / ONNX_FILE, options, self._probe)
        if choice.plan is not None:
            return f"engine {choice.plan} matches"
        if choice.expected is None or choice.wish is None:
            status = f"engine build skipped for {version_dir}: {choice.reasons[-1]}"
            log.info("%s; ONNX Runtime serves it", status)
            return status
        key, wish = choice.expected, choice.wish
        target = version_dir.parent / CACHE_DIR / version_dir.name / key.digest() / PLAN_FILE
        with self._lock:
            if key.digest() in self._failed:
                return f"engine build failed before: {self._failed[key.digest()]}"
            running = self._threads.get(key.digest())
            if running is not None and running.is_alive():
                return f"engine build for {version_dir} already running"
            thread = threading.Thread(target=self._build, name=f"trt-build-{key.digest()}",
                                      args=(choice.onnx_path, wish, key, target, on_ready),
                                      daemon=True)
            self._threads[key.digest()] = thread
        thread.start()
        return f"building engine {target} in the background; ONNX Runtime serves meanwhile"

    def _build(self, onnx_path: Path, wish: EngineWish, key: EngineKey, target: Path,
               on_ready: Callable[[], None]) -> None:
        from edge.backends.tensorrt_build import BuildSpec, build_engine

        builder = self._builder or build_engine

        spec = BuildSpec(wish.precision, wish.profiles, wish.workspace_mb, wish.dla_core,
                         timing_cache=target.parents[2] / "timing.cache")
        device, _ = self._probe()
        try:
            built = builder(onnx_path, spec, target, device)
            if built != key:
                raise BackendError(f"built engine key differs from the expected one: "
                                   f"{'; '.join(key.mismatches(built))}")
        except Exception as exc:  # a failed build must not kill the server; log it once
            log.error("TensorRT engine build for %s failed: %s", onnx_path, exc)
            with self._lock:
                self._failed[key.digest()] = str(exc)
            return
        if not self._closed.is_set():
            on_ready()

    def close(self) -> None:
        """Stop notifying; running builds finish in their daemon threads."""
        self._closed.set()
