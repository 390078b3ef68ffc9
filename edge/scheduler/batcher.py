"""Dynamic batching: when to dispatch (one small pure function) and how to stack and split.

Requests carry their own batch axis (axis 0); a batch is the concatenation of compatible
requests along it, and each request gets back views of its rows of every output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPolicy:
    """A model's batching settings (config ``max_batch_size`` and ``dynamic_batching``).

    ``max_items`` 0 means the model has no batch axis: requests run one by one, unstacked.
    ``dynamic`` False runs each request alone even when the model takes batches (Triton's
    default scheduler).
    """

    max_items: int = 0
    dynamic: bool = False
    preferred: tuple[int, ...] = ()
    max_delay_ns: int = 0

    @property
    def batches_requests(self) -> bool:
        return self.dynamic and self.max_items > 1


def plan_batch(pending_items: int, waited_ns: int, policy: BatchPolicy) -> int | None:
    """How many items to dispatch now, or None to keep waiting for more.

    ``pending_items`` is the total batch size waiting (compatible with the head request);
    ``waited_ns`` how long the head request has waited. A full batch goes at once; so does a
    preferred size; otherwise everything goes once the head request has waited
    ``max_delay_ns`` (at once when that is 0, so an idle model adds no delay).
    """
    if pending_items <= 0:
        return None
    if not policy.batches_requests or pending_items >= policy.max_items:
        return min(pending_items, max(policy.max_items, 1))
    if waited_ns >= policy.max_delay_ns:
        return pending_items
    fitting = [p for p in policy.preferred if p <= pending_items]
    return max(fitting) if fitting else None


def shape_key(inputs: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    """What must be equal for two requests to be stacked: every input's shape after axis 0."""
    return tuple(a.shape[1:] for a in inputs.values())


def stack_inputs(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate requests' inputs along axis 0; a single request passes through uncopied."""
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split_outputs(outputs: Mapping[str, np.ndarray], sizes: Sequence[int],
                  wanted: Sequence[Sequence[str]]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of each output it asked for (views, no copies), in order."""
    if len(sizes) == 1:
        return [{name: outputs[name] for name in wanted[0]}]
    result = []
    offset = 0
    for size, names in zip(sizes, wanted, strict=True):
        result.append({name: outputs[name][offset:offset + size] for name in names})
        offset += size
    return result
