"""ModelManager: which model versions are served, loading, reloading and unloading them live.

A (re)load builds and warms the new versions while the old ones keep serving, then swaps the
served table in one assignment; the replaced versions finish what they hold (requests racing
the swap are forwarded to their successor) and are closed. So a reload fails no request.
A version whose files and config did not change is kept as it is. Poll mode rescans the
repository every ``poll_interval_s`` and reloads what changed.
A version served by ONNX Runtime while its TensorRT engine is missing or mismatched gets the
engine built in the background (``EngineBuilds``); when it is on disk the version is reloaded,
which swaps the engine in the same way.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge.backends.engine_manager import EngineBuilds
from edge.backends.registry import backend_options, wants_engine
from edge.core.config import Settings
from edge.core.errors import (
    MededgeError,
    ModelNotFoundError,
    ModelNotReadyError,
    RepositoryError,
)
from edge.repository.loader import list_models, model_fingerprint, read_model
from edge.repository.model_config import ModelConfig
from edge.scheduler.loading import load_version
from edge.scheduler.model import ServedModel

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    """A model version's state, spelled as Triton's repository index spells it."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelIndexEntry:
    """One row of the repository index; ``version`` None: the model as a whole."""

    name: str
    version: int | None
    state: ModelState
    reason: str = ""


class ModelManager:
    """Thread-safe. ``get`` is lock-free: it reads a table that is replaced, never mutated."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._repo = Path(settings.server.model_repository)
        self._served: Mapping[str, Mapping[int, ServedModel]] = {}
        self._latest: Mapping[str, ServedModel] = {}
        self._status: dict[tuple[str, int | None], ModelIndexEntry] = {}
        self._seen: dict[str, str] = {}  # model name -> repository fingerprint at last load
        self._wanted: set[str] = set()  # models the manager was asked to serve
        self._lock = threading.Lock()  # guards the tables above (writers only)
        self._name_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._started = False
        self._closing = False
        self._engines = EngineBuilds()
        self._stale: set[tuple[str, int]] = set()  # versions whose engine became ready

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load every model of the repository (``load_all``) and start polling.

        A model that fails to load is UNAVAILABLE with the reason; the others serve.

        Raises:
            RepositoryError: the repository folder does not exist.
        """
        names = list_models(self._repo)
        if self._settings.repository.load_all:
            for name in names:
                try:
                    self.load(name)
                except MededgeError as exc:
                    log.error("model %s failed to load: %s", name, exc)
        self._started = True
        interval = self._settings.repository.poll_interval_s
        if interval > 0:
            self._poller = threading.Thread(target=self._poll_loop, args=(interval,),
                                            daemon=True, name="repository-poll")
            self._poller.start()

    def close(self, drain_timeout_s: float) -> None:
        """Stop polling, let in-flight requests finish (up to ``drain_timeout_s``), unload all."""
        self._closing = True
        self._stop.set()
        self._engines.close()
        if self._poller is not None:
            self._poller.join(timeout=10)
        for name in list(self._served):
            self._retire(name, self._swap(name, {}), drain_timeout_s, "server shutting down")

    # -- loading ------------------------------------------------------------------------------

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def _set_status(self, name: str, version: int | None, state: ModelState,
                    reason: str = "") -> None:
        with self._lock:
            self._status[(name, version)] = ModelIndexEntry(name, version, state, reason)

    def _swap(self, name: str, versions: Mapping[int, ServedModel]) -> Mapping[int, ServedModel]:
        with self._lock:
            old = self._served.get(name, {})
            served = dict(self._served)
            latest = dict(self._latest)
            if versions:
                served[name] = dict(versions)
                latest[name] = versions[max(versions)]
            else:
                served.pop(name, None)
                latest.pop(name, None)
            self._served, self._latest = served, latest  # readers see old or new, never half
            return old

    def _retire(self, name: str, old: Mapping[int, ServedModel], drain_timeout_s: float,
                reason: str) -> None:
        current = self._served.get(name, {})
        for version, model in old.items():
            if current.get(version) is model:
                continue
            successor = current.get(version) or self._latest.get(name)
            if successor is None:
                self._set_status(name, version, ModelState.UNLOADING, reason)
            model.close(drain_timeout_s, successor)
            if version not in current:
                self._set_status(name, version, ModelState.UNAVAILABLE, reason)

    def load(self, name: str, config_text: str | None = None) -> None:
        """Load or reload ``name`` (``config_text``, protobuf text or JSON, replaces its
        config.pbtxt); no request fails meanwhile. Unchanged versions are kept as they are.

        A version that fails keeps its previous incarnation serving, if it had one.

        Raises:
            RepositoryError: the model's folder, config or files are missing or malformed.
            BackendError, InvalidInputError: a version failed to open or warm up.
        """
        with self._name_lock(name):
            self._wanted.add(name)
            fingerprint = model_fingerprint(self._repo, name)
            self._seen[name] = fingerprint
            try:
                source = read_model(self._repo, name, config_text)
            except RepositoryError as exc:
                self._set_status(name, None, ModelState.UNAVAILABLE, str(exc))
                raise
            with self._lock:
                self._status = {k: v for k, v in self._status.items() if k[0] != name}
            current = self._served.get(name, {})
            fresh: dict[int, ServedModel] = {}
            errors: list[MededgeError] = []
            for version in source.versions:
                number = version.model_id.version
                old = current.get(number)
                stale = (name, number) in self._stale
                self._stale.discard((name, number))
                if old is not None and not stale and old.fingerprint == \
                        f"{source.config_fingerprint}:{version.fingerprint}":
                    old.sidecar = source.sidecar
                    fresh[number] = old
                    continue
                self._set_status(name, number, ModelState.LOADING)
                try:
                    fresh[number] = load_version(source, version, self._settings)
                    log.info("%s ready (%s)", version.model_id, fresh[number].backend_description)
                    self._ensure_engine(source.config, source.platform, version.directory,
                                        name, number)
                except MededgeError as exc:
                    errors.append(exc)
                    self._set_status(name, number, ModelState.UNAVAILABLE, str(exc))
                    if old is not None:
                        fresh[number] = old
                    continue
                with self._lock:
                    self._status.pop((name, number), None)
            for number in source.missing:
                self._set_status(name, number, ModelState.UNAVAILABLE,
                                 f"version {number} named by version_policy is not in "
                                 f"{source.directory}")
            if not source.versions and not source.missing:
                self._set_status(name, None, ModelState.UNAVAILABLE,
                                 f"{source.directory}: no version folders")
            old_table = self._swap(name, fresh)
            self._retire(name, old_table, self._settings.server.drain_timeout_s,
                         "unloaded: not selected by version_policy")
            if len(errors) == 1:
                raise errors[0]
            if errors:
                raise RepositoryError(f"{name}: " + "; ".join(str(e) for e in errors))
            if not fresh:
                raise RepositoryError(f"{name}: no version could be loaded from "
                                      f"{source.directory}")

    def _ensure_engine(self, config: ModelConfig, platform: str, directory: Path, name: str,
                       number: int) -> None:
        """Start a background TensorRT build when the version wants an engine and lacks one."""
        options = backend_options(config, self._settings.backend)
        if not wants_engine(platform, options):
            return
        try:
            status = self._engines.ensure(directory, options,
                                          lambda: self._engine_ready(name, number))
        except MededgeError as exc:
            status = f"no engine build: {exc}"
        log.info("%s:%d: %s", name, number, status)

    def _engine_ready(self, name: str, number: int) -> None:
        """Called from the build thread: reload the version so the engine is swapped in."""
        if self._closing or name not in self._wanted:
            return
        self._stale.add((name, number))
        try:
            self.load(name)
        except MededgeError as exc:
            log.error("%s:%d: reload with the new TensorRT engine failed: %s", name, number, exc)

    def unload(self, name: str) -> None:
        """Stop serving ``name``: queued and executing requests finish first.

        Raises:
            ModelNotFoundError: the manager never knew ``name``.
        """
        with self._name_lock(name):
            if name not in self._wanted and name not in self._served:
                raise ModelNotFoundError(f"{name}: unknown model")
            self._wanted.discard(name)  # polling leaves it unloaded until its files change
            self._retire(name, self._swap(name, {}), self._settings.server.drain_timeout_s,
                         "unloaded")
            self._set_status(name, None, ModelState.UNAVAILABLE, "unloaded")

    # -- polling ------------------------------------------------------------------------------

    def _poll_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.poll_once()
            except MededgeError as exc:
                log.error("repository poll failed: %s", exc)

    def poll_once(self) -> None:
        """Compare the repository with what was loaded; load, reload or unload the difference.

        Failures are logged and shown in the index; they do not stop the others.

        Raises:
            RepositoryError: the repository folder itself is gone.
        """
        names = set(list_models(self._repo))
        candidates = names if self._settings.repository.load_all else names & self._wanted
        for name in sorted(candidates):
            if self._seen.get(name) == model_fingerprint(self._repo, name):
                continue
            try:
                self.load(name)
            except MededgeError as exc:
                log.error("model %s failed to (re)load: %s", name, exc)
        for name in sorted(set(self._wanted) - names):
            log.info("model %s removed from the repository; unloading", name)
            self.unload(name)

    # -- queries ------------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The served ``name`` (its latest ready version when ``version`` is None).

        Raises:
            ModelNotFoundError: no such model, or no such version folder.
            ModelNotReadyError: it exists but is not loaded (failed, loading, unloaded).
        """
        if version is None:
            model = self._latest.get(name)
        else:
            versions = self._served.get(name)
            model = versions.get(version) if versions else None
        if model is not None:
            return model
        model_dir = self._repo / name
        if not model_dir.is_dir() and name not in self._wanted:
            raise ModelNotFoundError(f"{name}: unknown model")
        if version is not None and not (model_dir / str(version)).is_dir() \
                and (name, version) not in self._status:
            raise ModelNotFoundError(f"{name}: unknown version {version}")
        status = self._status.get((name, version)) or self._status.get((name, None))
        if status is None and version is None:  # the newest version's reason
            known = sorted(k[1] for k in self._status if k[0] == name and k[1] is not None)
            status = self._status.get((name, known[-1])) if known else None
        reason = f": {status.reason}" if status and status.reason else ""
        label = name if version is None else f"{name}:{version}"
        raise ModelNotReadyError(f"{label} is not ready{reason}")

    def is_ready(self, name: str, version: int | None = None) -> bool:
        """Whether ``get(name, version)`` would return a model."""
        if version is None:
            return name in self._latest
        return version in self._served.get(name, {})

    def ready(self) -> bool:
        """Server readiness: started, not closing, and (strict readiness) every model the
        manager was asked to serve has a ready version."""
        if not self._started or self._closing:
            return False
        if not self._settings.repository.strict_readiness:
            return True
        return all(name in self._latest for name in self._wanted)

    def index(self) -> list[ModelIndexEntry]:
        """Every model of the repository and every version known, with state and reason."""
        rows: dict[tuple[str, int | None], ModelIndexEntry] = dict(self._status)
        for name, versions in self._served.items():
            rows.pop((name, None), None)
            for number in versions:
                rows[(name, number)] = ModelIndexEntry(name, number, ModelState.READY)
        try:
            on_disk = list_models(self._repo)
        except RepositoryError:
            on_disk = []
        for name in on_disk:
            if not any(key[0] == name for key in rows):
                rows[(name, None)] = ModelIndexEntry(name, None, ModelState.UNAVAILABLE,
                                                     "not loaded")
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] or 0))]
