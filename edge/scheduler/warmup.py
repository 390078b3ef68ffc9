"""Warm-up: run samples through every instance before a version is reported ready.

The config's ``model_warmup`` entries are used when present (Triton's semantics: zero_data,
random_data, or input_data_file read raw from ``<model>/warmup/``); otherwise one zero batch of
size 1, with every dynamic dimension set to 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.backends.base import Backend
from edge.core.errors import MededgeError, RepositoryError
from edge.core.types import KSERVE_TO_NUMPY, TensorSpec
from edge.repository.model_config import ModelConfig, config_datatype_to_kserve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupSample:
    """One named warm-up input set and how many times to run it."""

    name: str
    inputs: dict[str, np.ndarray]
    count: int = 1
    fatal: bool = True  # False only for a guessed default sample


def warmup_samples(config: ModelConfig, inputs: Sequence[TensorSpec],
                   model_dir: Path) -> list[WarmupSample]:
    """The samples to warm a version with.

    Raises:
        RepositoryError: a ``model_warmup`` entry is malformed or its data file is unreadable;
            the message names the entry and the input.
    """
    batched = config.max_batch_size > 0
    rng = np.random.default_rng(0)
    samples = []
    for index, entry in enumerate(config.model_warmup):
        where = f"{model_dir}/config.pbtxt: model_warmup[{index}]"
        arrays = {}
        for name, spec in entry.inputs.items():
            dtype = KSERVE_TO_NUMPY[config_datatype_to_kserve(spec.data_type)]
            shape = ([max(1, entry.batch_size)] if batched else []) + [int(d) for d in spec.dims]
            kind = spec.WhichOneof("input_data_type")
            if kind == "input_data_file":
                path = model_dir / "warmup" / spec.input_data_file
                try:
                    raw = np.fromfile(path, dtype=dtype)
                except OSError as exc:
                    raise RepositoryError(f"{where}.inputs[{name!r}]: {path}: {exc}") from exc
                one = int(np.prod(shape[1:] if batched else shape))
                if raw.size < one:
                    raise RepositoryError(f"{where}.inputs[{name!r}]: {path} holds {raw.size} "
                                          f"values, needs {one}")
                item = raw[:one].reshape(shape[1:] if batched else shape)
                arrays[name] = np.stack([item] * shape[0]) if batched else item
            elif kind == "random_data":
                arrays[name] = rng.random(shape).astype(dtype) if dtype.kind == "f" else \
                    rng.integers(0, 2, shape).astype(dtype)
            else:
                arrays[name] = np.zeros(shape, dtype)
        samples.append(WarmupSample(entry.name or f"warmup{index}", arrays,
                                    max(1, entry.count)))
    if samples:
        return samples
    batch = [1] if batched else []
    arrays = {s.name: np.zeros(batch + [d if d > 0 else 1 for d in s.shape], s.dtype)
              for s in inputs}
    guessed = any(d <= 0 for s in inputs for d in s.shape)
    return [WarmupSample("zeros", arrays, 1, fatal=not guessed)]


def warm_up(backend: Backend, samples: Sequence[WarmupSample], label: str) -> None:
    """Run every sample through ``backend``.

    A default (zero) sample that fails on a model with dynamic dimensions only logs a warning:
    size 1 is a guess. Everything else is fatal.

    Raises:
        BackendError, InvalidInputError: a warm-up sample failed.
    """
    for sample in samples:
        for _ in range(sample.count):
            try:
                backend.infer(sample.inputs)
            except MededgeError as exc:
                if sample.fatal:
                    raise
                log.warning("%s: default warm-up failed (dynamic dimensions guessed as 1): %s",
                            label, exc)
                return
