"""Settings: one YAML file validated at start-up into a typed, frozen object, passed down.

Precedence, lowest first: defaults, the YAML file, ``MEDEDGE_<SECTION>__<KEY>`` environment
variables, command-line flags. A bad file stops start-up with a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edge.core.errors import ConfigError

ENV_PREFIX = "MEDEDGE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """Where the service listens and keeps its data."""

    bind: str = "0.0.0.0"
    data_dir: Path = Path("./mededge-data")
    model_repository: Path = Path("./models")
    grpc_port: int = Field(8001, ge=0, le=65535)
    http_port: int = Field(8002, ge=0, le=65535)
    drain_timeout_s: float = Field(30.0, gt=0)


class ServerTlsSettings(_Section):
    """TLS on a listening port (DICOM, gRPC, HTTP). Off by default; see docs/security.md.

    With ``enabled`` the port speaks TLS only: plaintext clients fail their handshake.
    """

    enabled: bool = False
    cert_file: Path | None = None  # our certificate chain, PEM, leaf first
    key_file: Path | None = None  # its private key, PEM, unencrypted
    ca_file: Path | None = None  # CA certificates that sign client certificates (mutual TLS)
    require_client_cert: bool = False  # mutual TLS: refuse clients without a valid certificate

    @model_validator(mode="after")
    def _complete(self) -> ServerTlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("cert_file and key_file are required when enabled")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA of the client "
                             "certificates)")
        return self


class ClientTlsSettings(_Section):
    """TLS when we connect out (DICOM destinations). Off by default; see docs/security.md."""

    enabled: bool = False
    ca_file: Path | None = None  # CA certificates we trust; None: the system's trust store
    cert_file: Path | None = None  # our client certificate chain (mutual TLS), PEM
    key_file: Path | None = None  # its private key
    verify_peer: bool = True  # False: no certificate check at all (testing only)
    check_hostname: bool = True  # the peer's certificate must name the host we connect to

    @model_validator(mode="after")
    def _complete(self) -> ClientTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate)")
        if self.check_hostname and not self.verify_peer:
            raise ValueError("check_hostname needs verify_peer")
        return self


#: Rights a bearer token can carry (docs/security.md has the method table).
Right = Literal["infer", "repository", "metrics"]


class TokenEntry(_Section):
    """One bearer token, stored as the sha256 of the token (hex), never the token itself."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rights: tuple[Right, ...] = Field(min_length=1)


class AuthSettings(_Section):
    """Bearer tokens for gRPC and /metrics; ``tokens_file`` (YAML list of entries) adds to
    ``tokens``. Which front ends demand a token is said in ``grpc`` and ``http``."""

    tokens_file: Path | None = None
    tokens: tuple[TokenEntry, ...] = ()


#: gRPC methods that need no token by default: health checks (grpc.health.v1, KServe's
#: ServerLive/ServerReady) and server reflection.
PUBLIC_GRPC_METHODS: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


class GrpcSettings(_Section):
    """gRPC front end limits. The default message size holds a CT volume."""

    max_message_bytes: int = Field(512 * 1024 * 1024, ge=4 * 1024 * 1024)
    max_workers: int = Field(32, ge=1)
    # The C++ front end on the public port (docs/serving-interfaces.md); off, or where it
    # cannot be built, grpcio serves the port itself.
    native_frontend: bool = True
    # Its threads. A request runs inline on one only while another waits to read the next,
    # so 2 serve any load; each more thread waiting on the queue is woken for some requests
    # (docs/benchmarks.md: 8 threads cost ResNet-18 0.4 ms at batch 1).
    native_threads: int = Field(2, ge=2)
    reflection: bool = True
    tls: ServerTlsSettings = ServerTlsSettings()
    require_token: bool = False  # every call but public_methods needs a bearer token
    public_methods: tuple[str, ...] = PUBLIC_GRPC_METHODS  # full names or "/service/" prefixes
    # KServe v2 system shared memory (same-host clients pass tensors through /dev/shm)
    shared_memory: bool = True


class HttpSettings(_Section):
    """The HTTP front end (/metrics, /v2/health/*)."""

    bind: str | None = None  # None: server.bind
    tls: ServerTlsSettings = ServerTlsSettings()
    metrics_auth: bool = False  # /metrics needs a token with the ``metrics`` right
    health_auth: bool = False  # /v2/health/* too (probes then need a token)


class RepositorySettings(_Section):
    """How the model repository is watched and loaded."""

    poll_interval_s: float = Field(0.0, ge=0)  # 0: no polling, explicit load/unload only
    load_all: bool = True
    verify_sha256: bool = True
    warmup: bool = True
    # Triton's --strict-readiness: the server is ready only when every model it tried to load
    # is ready; False: ready once the repository was loaded, whatever failed.
    strict_readiness: bool = True
    # When a config.pbtxt gives neither inputs nor outputs nor max_batch_size and the model's
    # first axis is dynamic everywhere, serve it batched up to this size (Triton's default 4).
    default_max_batch_size: int = Field(4, ge=0)


class BackendSettings(_Section):
    """ONNX Runtime defaults; a model's config.pbtxt ``parameters`` may override them."""

    providers: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                  "CPUExecutionProvider")
    intra_op_threads: int = Field(0, ge=0)  # 0: ONNX Runtime decides
    inter_op_threads: int = Field(1, ge=1)
    graph_optimization: str = Field("all", pattern="^(disable|basic|extended|all)$")


class SchedulerSettings(_Section):
    """Defaults for models whose config.pbtxt does not say."""

    max_queue_size: int = Field(256, ge=1)  # requests per model version
    max_queue_bytes: int = Field(1 << 30, ge=1)  # input bytes queued per model version
    default_max_queue_delay_us: int = Field(0, ge=0)
    aging_ms: float = Field(200.0, gt=0)


#: AE titles: 1-16 characters of the default repertoire, no backslash or control characters,
#: not only spaces (PS3.5 Table 6.2-1, VR AE).
_AE_TITLE = r"^ *[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]*$"


class DicomPeer(_Section):
    """A calling AE title allowed to associate, optionally only from one host (name or IP)."""

    ae_title: str = Field(pattern=_AE_TITLE, max_length=16)
    host: str | None = None


class DicomSettings(_Section):
    """The DICOM listener (storage SCP). An empty ``peers`` list accepts any calling AE."""

    port: int = Field(default=11112, ge=0, le=65535)
    ae_title: str = Field(default="MEDEDGE", pattern=_AE_TITLE, max_length=16)
    bind: str | None = None  # None: server.bind
    peers: tuple[DicomPeer, ...] = ()
    require_called_aet: bool = True
    max_pdu: int = Field(default=131072, ge=0)  # 0: unlimited
    max_associations: int = Field(default=16, ge=1)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=30.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    tls: ServerTlsSettings = ServerTlsSettings()  # DICOM TLS (PS3.15 Annex B.1, BCP 195)


class SpoolSettings(_Section):
    """Where received instances are kept, and when the box stops accepting or cleans up."""

    dir: Path | None = None  # None: <server.data_dir>/spool
    ledger: Path | None = None  # None: <server.data_dir>/ledger.sqlite3
    # Below this free space: C-STORE answers A700 and associations are refused.
    min_free_bytes: int = Field(default=2 * 1024**3, ge=0)
    retention_max_age_s: float = Field(default=7 * 86400.0, gt=0)
    retention_min_free_bytes: int = Field(default=10 * 1024**3, ge=0)  # clean-up target


class DispatchSettings(_Section):
    """Delivery of results to destinations (storage SCU) and its retry policy."""

    ae_title: str = Field(default="MEDEDGE", pattern=_AE_TITLE, max_length=16)  # calling AE
    max_pdu: int = Field(default=0, ge=0)  # 0: unlimited (what we are willing to receive)
    connection_timeout_s: float = Field(default=5.0, gt=0)  # TCP connect
    acse_timeout_s: float = Field(default=30.0, gt=0)  # association request/release
    dimse_timeout_s: float = Field(default=60.0, gt=0)  # each C-STORE response
    network_timeout_s: float = Field(default=60.0, gt=0)  # idle connection
    max_batch: int = Field(default=64, ge=1)  # files per association
    max_destinations: int = Field(default=16, ge=1)  # delivery threads (one per destination)
    retry_initial_s: float = Field(default=5.0, gt=0)
    retry_factor: float = Field(default=2.0, ge=1)
    retry_max_s: float = Field(default=600.0, gt=0)
    retry_max_attempts: int = Field(default=20, ge=1)  # about 2 hours of retrying with the defaults
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    tls: ClientTlsSettings = ClientTlsSettings()  # to every destination


class RuleConditions(_Section):
    """What a series must look like for a routing rule to apply; empty fields match anything.

    Lists match when the series' value is one of them (case-insensitive for code strings).
    """

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()  # BodyPartExamined
    sop_class_uid: tuple[str, ...] = ()
    series_description: str | None = None  # a regular expression, searched, case-insensitive
    image_type_contains: tuple[str, ...] = ()  # every value must be in ImageType
    slice_thickness_min: float | None = Field(default=None, ge=0)  # mm, inclusive
    slice_thickness_max: float | None = Field(default=None, ge=0)
    orientation: tuple[Literal["axial", "coronal", "sagittal"], ...] = ()
    calling_ae: tuple[str, ...] = ()

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class RoutingRule(_Section):
    """One declarative rule: a series matching ``when`` runs ``models`` (a pipeline)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    when: RuleConditions = RuleConditions()
    models: tuple[str, ...] = Field(min_length=1)
    outputs: tuple[Literal["seg", "sr"], ...] = ("seg", "sr")
    destinations: tuple[str, ...] = ()  # AET@HOST:PORT; empty: pipeline.destinations
    priority: int = Field(default=0, ge=0)  # scheduler level, 1 highest; 0: from C-STORE


class RoutingSettings(_Section):
    """Routing rules, tried in order. No rules: each model's sidecar applicability decides."""

    rules: tuple[RoutingRule, ...] = ()
    first_match_only: bool = False  # False: every matching rule runs its pipeline


class PipelineSettings(_Section):
    """The orchestration of the DICOM path: series completion, workers, default destinations."""

    destinations: tuple[str, ...] = ()  # AET@HOST:PORT; `mededge serve --destination`
    quiet_period_s: float = Field(default=0.5, ge=0)  # after association release
    # A series found unfinished at start-up waits this long for its sender to retry before it
    # is finished with what arrived (a new association's release ends the wait sooner).
    resume_grace_s: float = Field(default=5.0, ge=0)
    max_wait_s: float = Field(default=300.0, gt=0)  # no release: complete after this idle time
    workers: int = Field(default=2, ge=1)  # decode + preprocess threads
    results_dir: Path | None = None  # None: <server.data_dir>/results
    deadline_s: float = Field(default=300.0, gt=0)  # per slice inference request
    # Heatmaps of positive classifications (models with a ``cam`` output): a Secondary Capture
    # overlay, a Parametric Map, or nothing; for this many of the most suspicious slices.
    cam_output: Literal["sc", "pm", "none"] = "sc"
    cam_slices: int = Field(default=1, ge=0)


class Settings(_Section):
    """Every setting of the service."""

    server: ServerSettings = ServerSettings()
    grpc: GrpcSettings = GrpcSettings()
    http: HttpSettings = HttpSettings()
    auth: AuthSettings = AuthSettings()
    repository: RepositorySettings = RepositorySettings()
    backend: BackendSettings = BackendSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    dicom: DicomSettings = DicomSettings()
    spool: SpoolSettings = SpoolSettings()
    dispatch: DispatchSettings = DispatchSettings()
    routing: RoutingSettings = RoutingSettings()
    pipeline: PipelineSettings = PipelineSettings()


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _describe(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        lines.append(f"{origin}: {key}: {item['msg']}")
    return "; ".join(lines)


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, ``path``, the environment and ``overrides``.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key is unknown or invalid; the
            message names the file and the dotted key.
    """
    data: dict[str, Any] = {}
    origin = "settings"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc
