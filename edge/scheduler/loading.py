"""Turning one repository version into a warmed ServedModel.

Steps: verify file sha256s (when the sidecar records them), open one backend per instance
(``instance_group`` counts; parameter ``share_session: "true"`` shares one session, parameter
``adaptive_threads: "true"`` adds one shared session with every core for batches that run
alone, see ``edge.backends.adaptive_threads``), complete
a config that gives no inputs/outputs from the model itself (Triton's auto-complete), check the
config against the model, warm every instance up.
"""

from __future__ import annotations

import os
from dataclasses import replace

from edge.backends.adaptive_threads import AdaptiveThreadsBackend, ExecutionGauge
from edge.backends.base import Backend
from edge.backends.registry import backend_options, open_backend
from edge.core.config import Settings
from edge.core.errors import RepositoryError
from edge.core.types import TensorSpec
from edge.repository.loader import ModelSource, VersionSource, verify_version
from edge.repository.model_config import (
    CONFIG_NAME,
    ModelConfig,
    config_tensor_specs,
    kserve_to_config_datatype,
)
from edge.scheduler.model import ServedModel
from edge.scheduler.warmup import warm_up, warmup_samples


def instance_count(config: ModelConfig) -> int:
    """How many instances ``instance_group`` asks for (Triton: count defaults to 1)."""
    return sum(max(1, g.count) for g in config.instance_group) or 1


def _merge_specs(kind: str, declared: tuple[TensorSpec, ...], actual: tuple[TensorSpec, ...],
                 where: str, require_all: bool) -> tuple[TensorSpec, ...]:
    by_name = {s.name: s for s in actual}
    merged = []
    for index, spec in enumerate(declared):
        real = by_name.get(spec.name)
        if real is None:
            raise RepositoryError(f"{where}: {kind}[{index}].name: {spec.name!r} is not a model "
                                  f"{kind}; the model has {sorted(by_name)}")
        if real.datatype != spec.datatype:
            raise RepositoryError(f"{where}: {kind}[{index}].data_type: TYPE_{spec.datatype}, "
                                  f"the model's {spec.name!r} is TYPE_{real.datatype}")
        if len(real.shape) != len(spec.shape) or any(
                a != b and -1 not in (a, b) for a, b in zip(real.shape, spec.shape, strict=True)):
            raise RepositoryError(f"{where}: {kind}[{index}].dims: {list(spec.shape)} does not "
                                  f"match the model's {list(real.shape)} (batch axis excluded "
                                  "when max_batch_size > 0)")
        shape = tuple(a if a != -1 else b for a, b in zip(spec.shape, real.shape, strict=True))
        merged.append(TensorSpec(spec.name, spec.datatype, shape))
    if require_all:
        undeclared = sorted(set(by_name) - {s.name for s in declared})
        if undeclared:
            raise RepositoryError(f"{where}: {kind}: the model's {undeclared} are not declared")
    return tuple(merged)


def _complete(config: ModelConfig, backend: Backend) -> None:
    for spec in backend.inputs:
        item = config.input.add(name=spec.name, data_type=kserve_to_config_datatype(spec.datatype))
        item.dims.extend(spec.shape)
    for spec in backend.outputs:
        out = config.output.add(name=spec.name, data_type=kserve_to_config_datatype(spec.datatype))
        out.dims.extend(spec.shape)


def _flag(config: ModelConfig, key: str) -> bool:
    return key in config.parameters and \
        config.parameters[key].string_value.lower() in ("1", "true")


def _batchable(backend: Backend) -> bool:
    tensors = backend.inputs + backend.outputs
    return bool(tensors) and all(s.shape and s.shape[0] == -1 for s in tensors)


def load_version(source: ModelSource, version: VersionSource, settings: Settings) -> ServedModel:
    """Open, check and warm ``version`` of ``source``; the caller owns the result.

    Raises:
        RepositoryError: a file is missing or modified, or the config contradicts the model;
            the message names the file and the field.
        BackendError, InvalidInputError: the runtime failed to open or warm the model.
    """
    if settings.repository.verify_sha256:
        verify_version(version, source.sidecar)
    where = str(source.directory / CONFIG_NAME)
    config = ModelConfig()
    config.CopyFrom(source.config)
    options = backend_options(config, settings.backend, where)
    wide_options = options
    count = instance_count(config)
    shared = _flag(config, "share_session")
    if shared and _flag(config, "adaptive_threads"):
        raise RepositoryError(f"{where}: parameters['adaptive_threads'] and "
                              "parameters['share_session'] exclude each other (adaptive "
                              "instances have a session each, plus one they share)")
    adaptive = count > 1 and _flag(config, "adaptive_threads")
    if count > 1 and (options.intra_op_threads == 0 or adaptive):
        # N sessions each taking every core oversubscribe the CPU; share the cores out (the
        # intra-op threads asked for, or every core). Adaptive instances keep them all for a
        # batch that runs alone.
        total = options.intra_op_threads or os.cpu_count() or 1
        options = replace(options, intra_op_threads=max(1, total // count))
    backends: list[Backend] = []
    opened: list[Backend] = []  # what runs the model, each once (instances may wrap or share)
    try:
        first = open_backend(source.platform, version.model_path, options)
        backends.append(first)
        if not config.input and not config.output:
            default_batch = settings.repository.default_max_batch_size
            if config.max_batch_size == 0 and default_batch > 0 and _batchable(first):
                first.close()
                backends.clear()
                config.max_batch_size = default_batch
                if config.WhichOneof("scheduling_choice") is None:
                    config.dynamic_batching.SetInParent()
                options = replace(options, batched=True)
                first = open_backend(source.platform, version.model_path, options)
                backends.append(first)
            _complete(config, first)
        declared_in, declared_out = config_tensor_specs(config, where)
        inputs = _merge_specs("input", declared_in, first.inputs, where, require_all=True)
        outputs = _merge_specs("output", declared_out, first.outputs, where, require_all=False)
        for _ in range(count - 1):
            backends.append(first if shared else
                            open_backend(source.platform, version.model_path, options))
        opened = list({id(b): b for b in backends}.values())
        if adaptive:
            wide = open_backend(source.platform, version.model_path,
                                replace(wide_options, batched=options.batched))
            opened.append(wide)
            gauge = ExecutionGauge()
            backends = [AdaptiveThreadsBackend(narrow, wide, gauge, owns_wide=i == 0)
                        for i, narrow in enumerate(backends)]
        if settings.repository.warmup:
            samples = warmup_samples(config, inputs, source.directory)
            for backend in opened:
                warm_up(backend, samples, str(version.model_id))
        return ServedModel(version.model_id, config, source.platform, source.sidecar, inputs,
                           outputs, backends, settings.scheduler,
                           fingerprint=f"{source.config_fingerprint}:{version.fingerprint}",
                           directory=version.directory)
    except BaseException:
        for backend in {id(b): b for b in [*opened, *backends]}.values():
            backend.close()
        raise
